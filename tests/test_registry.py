"""The control plane's registry (deploy/registry/) over a real SQLite file and a real PostgreSQL
database (the ``registry_location`` fixture runs each test on both): versions, searches,
refusals and their codes, devices, deployments, leases, heartbeats and migrations.

Images are registered with a fake ``build``: these are tests of the registry, not of the bundle builder.
"""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from deploy.registry import (
    HEARTBEAT_RETENTION_S,
    MIGRATIONS,
    Image,
    Model,
    Registry,
    check_name,
    parse_ref,
    parse_tags,
)
from edge_core.errors import ControlPlaneError, ErrorCode


@pytest.fixture
def reg(registry_location: Path | str) -> Iterator[Registry]:
    r = Registry(registry_location)
    yield r
    r.close()


def _sha(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def add_model(reg: Registry, name: str, tags: Mapping[str, str] | None = None, **kw: Any) -> Model:
    return reg.add_model(
        name,
        sha256=kw.pop("sha256", _sha("model", name, time.monotonic_ns())),
        size=kw.pop("size", 1234),
        artifact_for=kw.pop("artifact_for", lambda v: f"models/{name}/{v}"),
        inputs=kw.pop("inputs", []),
        outputs=kw.pop("outputs", []),
        tags=tags,
        **kw,
    )


Build = Callable[[int], tuple[str, int, str, dict[str, Any]]]


def fake_build(name: str, meta: Mapping[str, Any] | None = None) -> Build:
    def build(version: int) -> tuple[str, int, str, dict[str, Any]]:
        return (
            _sha("image", name, version),
            4096 + version,
            f"images/{name}/{version}.tar.gz",
            dict(meta or {}),
        )

    return build


def add_image(reg: Registry, name: str, models: Mapping[str, Model], **kw: Any) -> Image:
    return reg.add_image(name, build=kw.pop("build", fake_build(name)), models=models, **kw)


def refused(code: ErrorCode, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ControlPlaneError:
    with pytest.raises(ControlPlaneError) as ei:
        fn(*args, **kwargs)
    assert ei.value.code == code, ei.value
    return ei.value


def start_deployment(
    reg: Registry, dep_id: str, image: Image, devices: list[str], waves: list[int] | None = None
) -> None:
    reg.create_deployment(
        dep_id,
        image,
        {"devices": devices},
        devices,
        {"canary": 1},
        {},
        waves if waves is not None else [len(devices)],
    )


# -- models --------------------------------------------------------------------------------------------


def test_model_versions_increment_per_name(reg: Registry) -> None:
    calls: list[int] = []

    def artifact_for(name: str) -> Callable[[int], str]:
        def store(v: int) -> str:
            calls.append(v)
            return f"models/{name}/{v}"

        return store

    a1 = add_model(reg, "a", artifact_for=artifact_for("a"))
    a2 = add_model(reg, "a", artifact_for=artifact_for("a"))
    b1 = add_model(reg, "b", artifact_for=artifact_for("b"))
    assert (a1.name, a1.version, a1.ref) == ("a", 1, "a:1")
    assert (a2.version, a2.ref) == (2, "a:2")
    assert (b1.name, b1.version) == ("b", 1)
    assert calls == [1, 2, 1]
    assert [a1.artifact, a2.artifact, b1.artifact] == ["models/a/1", "models/a/2", "models/b/1"]
    assert reg.model("a") == a2  # the latest
    assert reg.model("a", 1) == a1


def test_model_fields_round_trip(reg: Registry) -> None:
    inputs = [{"name": "x", "type": "float32", "shape": [None, 4]}]
    outputs = [{"name": "y", "type": "int64", "shape": [None]}]
    m = reg.add_model(
        "iris",
        sha256="ab" * 32,
        size=999,
        artifact_for=lambda v: f"models/iris/{v}",
        inputs=inputs,
        outputs=outputs,
        tags={"team": "ml"},
        properties={"accuracy": 0.97, "notes": ["a", "b"]},
    )
    got = reg.model("iris", 1)
    assert got == m
    assert (got.sha256, got.size, got.artifact) == ("ab" * 32, 999, "models/iris/1")
    assert got.inputs == inputs
    assert got.outputs == outputs
    assert got.tags == {"team": "ml"}
    assert got.properties == {"accuracy": 0.97, "notes": ["a", "b"]}
    assert got.as_dict()["ref"] == "iris:1"


def test_failed_artifact_upload_registers_nothing(reg: Registry) -> None:
    calls: list[int] = []

    def failing(v: int) -> str:
        calls.append(v)
        raise OSError("upload failed")

    add_model(reg, "a")
    with pytest.raises(OSError, match="upload failed"):
        add_model(reg, "a", artifact_for=failing)
    with pytest.raises(OSError):
        add_model(reg, "fresh", artifact_for=failing)
    assert calls == [2, 1]
    assert [m.ref for m in reg.models()] == ["a:1"]
    refused(ErrorCode.MODEL_NOT_FOUND, reg.model, "fresh")
    again = add_model(reg, "a")
    assert again.version == 2
    assert add_model(reg, "fresh").version == 1


def test_failed_image_build_registers_nothing(reg: Registry) -> None:
    m = add_model(reg, "m")

    def failing(v: int) -> tuple[str, int, str, dict[str, Any]]:
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        add_image(reg, "img", {"m": m}, build=failing)
    assert reg.images() == []
    assert reg.images(model=("m", None)) == []
    assert add_image(reg, "img", {"m": m}).version == 1


def test_add_model_refuses_a_bad_name(reg: Registry) -> None:
    refused(ErrorCode.INVALID_ARGUMENT, add_model, reg, "bad name")
    assert reg.models() == []


def test_models_search(reg: Registry) -> None:
    add_model(reg, "a", {"env": "prod", "team": "x"})
    add_model(reg, "a", {"env": "dev", "team": "x"})
    add_model(reg, "b", {"env": "prod", "team": "y"})
    add_model(reg, "c")

    def refs(models: list[Model]) -> list[str]:
        return [m.ref for m in models]

    assert refs(reg.models()) == ["a:1", "a:2", "b:1", "c:1"]
    assert refs(reg.models(name="a")) == ["a:1", "a:2"]
    assert refs(reg.models(name="zzz")) == []
    assert refs(reg.models(version=1)) == ["a:1", "b:1", "c:1"]
    assert refs(reg.models(name="a", version=2)) == ["a:2"]
    assert refs(reg.models(tags={"env": "prod"})) == ["a:1", "b:1"]
    assert refs(reg.models(tags={"team": "x"})) == ["a:1", "a:2"]
    assert refs(reg.models(tags={"env": "prod", "team": "x"})) == ["a:1"]
    assert refs(reg.models(tags={"env": "prod", "team": "z"})) == []
    assert refs(reg.models(tags={"env": "prod", "team": "y"}, name="a")) == []
    assert refs(reg.models(tags={"missing": "x"})) == []


def test_model_not_found_lists_versions(reg: Registry) -> None:
    add_model(reg, "a")
    add_model(reg, "a")
    err = refused(ErrorCode.MODEL_NOT_FOUND, reg.model, "a", 9)
    assert "a:9" in err.message
    assert "versions: 1, 2" in err.message
    err = refused(ErrorCode.MODEL_NOT_FOUND, reg.model, "nope")
    assert "nope" in err.message
    assert "versions" not in err.message
    refused(ErrorCode.INVALID_ARGUMENT, reg.model, "not a name")


def test_unknown_records_are_refused_with_their_codes(reg: Registry) -> None:
    err = refused(ErrorCode.IMAGE_NOT_FOUND, reg.image, "img")
    assert "img" in err.message
    err = refused(ErrorCode.IMAGE_NOT_FOUND, reg.image, "img", 3)
    assert "img:3" in err.message
    err = refused(ErrorCode.DEVICE_NOT_FOUND, reg.device, "dev-1")
    assert "dev-1" in err.message
    err = refused(ErrorCode.DEPLOYMENT_NOT_FOUND, reg.deployment, "dep-1")
    assert "dep-1" in err.message
    refused(ErrorCode.DEVICE_NOT_FOUND, reg.tag_device, "dev-1", {"a": "b"})
    refused(ErrorCode.MODEL_NOT_FOUND, reg.delete_model, "a", 1)
    refused(ErrorCode.IMAGE_NOT_FOUND, reg.delete_image, "img", 1)


# -- images --------------------------------------------------------------------------------------------


def test_image_versions_and_fields(reg: Registry) -> None:
    m = add_model(reg, "m")
    i1 = add_image(
        reg, "img", {"clf": m}, build=fake_build("img", {"entry_script": "score.py"}), tags={"t": "1"}
    )
    i2 = add_image(reg, "img", {"clf": m})
    other = add_image(reg, "other", {"clf": m})
    assert (i1.ref, i2.ref, other.ref) == ("img:1", "img:2", "other:1")
    assert i1.sha256 == _sha("image", "img", 1)
    assert (i1.size, i1.artifact) == (4097, "images/img/1.tar.gz")
    assert i1.has_score is True
    assert i2.has_score is False
    assert i1.meta == {"entry_script": "score.py"}
    assert i1.tags == {"t": "1"}
    assert i1.models == ("m:1",)
    assert reg.image("img") == i2
    assert reg.image_by_id(i1.id) == i1
    assert reg.image_by_sha(i1.sha256) == i1
    assert reg.image_by_sha("00" * 32) is None
    assert [i.ref for i in reg.images(tags={"t": "1"})] == ["img:1"]
    assert [i.ref for i in reg.images(name="img", version=2)] == ["img:2"]


def test_images_by_model(reg: Registry) -> None:
    m1 = add_model(reg, "m")
    m2 = add_model(reg, "m")
    n1 = add_model(reg, "n")
    add_image(reg, "one", {"clf": m1})
    add_image(reg, "two", {"clf": m2})
    add_image(reg, "three", {"other": n1})
    add_image(reg, "both", {"clf": m1, "other": n1})

    def refs(images: list[Image]) -> list[str]:
        return [i.ref for i in images]

    assert refs(reg.images(model=("m", 1))) == ["both:1", "one:1"]
    assert refs(reg.images(model=("m", 2))) == ["two:1"]
    assert refs(reg.images(model=("m", None))) == ["both:1", "one:1", "two:1"]
    assert refs(reg.images(model=("n", None))) == ["both:1", "three:1"]
    assert refs(reg.images(model=("m", 3))) == []
    assert refs(reg.images(model=("zzz", None))) == []
    assert refs(reg.images(name="one", model=("m", 2))) == []
    assert reg.image("both").models == ("m:1", "n:1")


def test_delete_model_refused_while_an_image_uses_it(reg: Registry) -> None:
    m = add_model(reg, "m")
    add_image(reg, "img", {"clf": m})
    err = refused(ErrorCode.IN_USE, reg.delete_model, "m", 1)
    assert "img:1" in err.message
    assert "m:1" in err.message
    assert reg.model("m", 1) == m  # nothing deleted
    deleted = reg.delete_image("img", 1)
    assert deleted.ref == "img:1"
    refused(ErrorCode.IMAGE_NOT_FOUND, reg.image, "img", 1)
    assert reg.delete_model("m", 1) == m
    refused(ErrorCode.MODEL_NOT_FOUND, reg.model, "m", 1)
    assert reg.models() == []


def test_delete_image_refused_while_a_deployment_names_it(reg: Registry) -> None:
    m = add_model(reg, "m")
    img = add_image(reg, "img", {"clf": m})
    reg.observe_device("d1", "online", {"online": True})
    start_deployment(reg, "dep-1", img, ["d1"])
    err = refused(ErrorCode.IN_USE, reg.delete_image, "img", 1)
    assert "dep-1 (running)" in err.message
    # finished deployments keep their history: still refused
    reg.update_deployment("dep-1", state="succeeded")
    err = refused(ErrorCode.IN_USE, reg.delete_image, "img", 1)
    assert "dep-1 (succeeded)" in err.message
    assert reg.image("img", 1) == img


def test_delete_image_refused_while_a_live_deployment_may_revert_to_it(reg: Registry) -> None:
    m = add_model(reg, "m")
    old = add_image(reg, "old", {"clf": m})
    new = add_image(reg, "new", {"clf": m})
    start_deployment(reg, "dep-1", new, ["d1"])
    reg.update_member("dep-1", "d1", state="active", previous={"name": "old", "sha256": old.sha256})
    assert reg.members("dep-1")[0]["previous"] == {"name": "old", "sha256": old.sha256}
    err = refused(ErrorCode.IN_USE, reg.delete_image, "old", 1)
    assert "dep-1 (running)" in err.message
    reg.update_deployment("dep-1", state="succeeded")
    assert reg.delete_image("old", 1).ref == "old:1"


# -- name, tag and reference parsing -------------------------------------------------------------------


def test_parse_tags() -> None:
    assert parse_tags([]) == {}
    assert parse_tags(["a=1", " b = 2 ", "c=", "k=v=w", "x.y/z-1=ok"]) == {
        "a": "1",
        "b": "2",
        "c": "",
        "k": "v=w",
        "x.y/z-1": "ok",
    }


@pytest.mark.parametrize(
    ("items", "words"),
    [
        (["noequals"], "is not KEY=VALUE"),
        (["=value"], "is not KEY=VALUE"),
        (["bad key=1"], "is not KEY=VALUE"),
        (["-lead=1"], "is not KEY=VALUE"),
        (["a=1", "a=2"], "given twice"),
        (["a=1", " a =1"], "given twice"),
    ],
)
def test_parse_tags_refusals(items: list[str], words: str) -> None:
    with pytest.raises(ControlPlaneError) as ei:
        parse_tags(items, "label")
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    assert words in ei.value.message
    assert ei.value.message.startswith("label ")


def test_parse_ref() -> None:
    assert parse_ref("model", "model") == ("model", None)
    assert parse_ref("model:3", "model") == ("model", 3)
    assert parse_ref("m.v2_x-y:12", "model") == ("m.v2_x-y", 12)


@pytest.mark.parametrize("ref", ["name:0", "name:x", "name:", "name:-1", "name:1.5", "name: 1"])
def test_parse_ref_refuses_bad_versions(ref: str) -> None:
    with pytest.raises(ControlPlaneError) as ei:
        parse_ref(ref, "image")
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    assert "positive integer" in ei.value.message


@pytest.mark.parametrize("ref", [":1", "-name:1", "a b", "a/b:1", ""])
def test_parse_ref_refuses_bad_names(ref: str) -> None:
    with pytest.raises(ControlPlaneError) as ei:
        parse_ref(ref, "image")
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    assert "not a valid name" in ei.value.message


@pytest.mark.parametrize("name", ["", "-x", ".x", "_x", "a b", "a/b", "a:b", "é", "a" * 129, None, 12])
def test_check_name_refusals(name: Any) -> None:
    with pytest.raises(ControlPlaneError) as ei:
        check_name(name, "model name")
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    assert ei.value.message.startswith("model name ")


@pytest.mark.parametrize("name", ["a", "A1", "0abc", "a.b_c-d", "a" * 128])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name, "model name") == name


# -- devices -------------------------------------------------------------------------------------------


def test_observe_device_learns_each_report(reg: Registry) -> None:
    reg.observe_device("d1", "inventory", {"arch": "aarch64", "cpus": 4})
    d = reg.device("d1")
    assert d["inventory"] == {"arch": "aarch64", "cpus": 4}
    assert d["online"] is False
    assert d["last_seen"] is not None
    assert d["status"] is None
    assert d["active"] is None
    assert d["tags"] == {}

    reg.observe_device("d1", "online", {"online": True})
    assert reg.device("d1")["online"] is True
    active = {"name": "img", "version": "1", "sha256": "ab" * 32}
    reg.observe_device("d1", "status", {"state": "active", "generation": 7, "active": active})
    d = reg.device("d1")
    assert d["status"]["generation"] == 7
    assert d["active"] == active
    assert d["inventory"] == {"arch": "aarch64", "cpus": 4}  # earlier reports are kept
    reg.observe_device("d1", "online", {"online": False})
    assert reg.device("d1")["online"] is False

    # a status first: the device is learned from it too
    reg.observe_device("d2", "status", {"state": "idle"})
    assert reg.device("d2")["status"] == {"state": "idle"}
    assert [d["id"] for d in reg.devices()] == ["d1", "d2"]


def test_ingest(reg: Registry) -> None:
    now = time.time()
    beat = {"models": {"clf": {"model": "m", "version": "1", "requests": 10, "errors": 1, "p99_ms": 5.0}}}
    reg.ingest(
        [
            ("d1", "inventory", now, {"arch": "x86_64", "n": 1}),
            ("d1", "inventory", now, {"arch": "x86_64", "n": 2}),  # the latest one wins
            ("d1", "online", now, {"online": True}),
            ("d1", "status", now, {"state": "active", "generation": 42}),
            ("d1", "heartbeat", now, beat),
            ("d2", "online", now, {"online": True}),
            ("d3", "heartbeat", now, beat),  # heartbeats alone do not make a device
        ]
    )
    assert [d["id"] for d in reg.devices()] == ["d1", "d2"]
    d1 = reg.device("d1")
    assert d1["inventory"] == {"arch": "x86_64", "n": 2}
    assert d1["online"] is True
    assert d1["status"] == {"state": "active", "generation": 42}
    rows = reg.heartbeats(["d1", "d3"], now - 1, now + 1)
    assert [(r["device_id"], r["model"], r["version"], r["requests"], r["errors"]) for r in rows] == [
        ("d1", "m", "1", 10, 1),
        ("d3", "m", "1", 10, 1),
    ]
    assert reg.next_generation("d1") > 42


def test_tag_device(reg: Registry) -> None:
    for d in ("d1", "d2", "d3"):
        reg.observe_device(d, "online", {"online": True})
    assert reg.tag_device("d1", {"site": "a", "tier": "edge"})["tags"] == {"site": "a", "tier": "edge"}
    reg.tag_device("d2", {"site": "a", "tier": "core"})
    reg.tag_device("d3", {"site": "b", "tier": "edge"})

    def ids(tags: Mapping[str, str] | None = None) -> list[str]:
        return [d["id"] for d in reg.devices(tags)]

    assert ids() == ["d1", "d2", "d3"]
    assert ids({"site": "a"}) == ["d1", "d2"]
    assert ids({"tier": "edge"}) == ["d1", "d3"]
    assert ids({"site": "a", "tier": "edge"}) == ["d1"]
    assert ids({"site": "c"}) == []

    # set one, overwrite one, remove one
    d1 = reg.tag_device("d1", {"site": "b", "new": "x"}, remove=["tier"])
    assert d1["tags"] == {"site": "b", "new": "x"}
    assert reg.device("d1")["tags"] == {"site": "b", "new": "x"}
    assert ids({"site": "b"}) == ["d1", "d3"]
    assert ids({"tier": "edge"}) == ["d3"]
    assert reg.tag_device("d1", {}, remove=["new", "absent"])["tags"] == {"site": "b"}
    # later reports do not touch the operator's tags
    reg.observe_device("d1", "inventory", {"arch": "x86_64"})
    assert reg.device("d1")["tags"] == {"site": "b"}


def test_next_generation_strictly_increasing(reg: Registry) -> None:
    reg.observe_device("d1", "online", {"online": True})
    gens = [reg.next_generation("d1") for _ in range(50)]
    assert all(b > a for a, b in itertools.pairwise(gens))
    assert gens[0] >= int(time.time() * 1000) - 60_000  # the clock, in milliseconds


def test_next_generation_above_a_reported_generation(reg: Registry) -> None:
    reg.observe_device("d1", "status", {"generation": 10**15, "state": "active"})
    g1 = reg.next_generation("d1")
    assert g1 > 10**15
    # a report of an older generation does not lower it
    reg.observe_device("d1", "status", {"generation": 5, "state": "active"})
    g2 = reg.next_generation("d1")
    assert g2 > g1
    # nor does a report of a non-integer one
    reg.observe_device("d1", "status", {"generation": "99999999999999999999"})
    assert reg.next_generation("d1") == g2 + 1


def test_next_generation_survives_reopen(registry_location: Path | str) -> None:
    path = registry_location
    r = Registry(path)
    r.observe_device("d1", "status", {"generation": 10**15})
    g = r.next_generation("d1")
    r.close()
    r = Registry(path)
    try:
        assert r.next_generation("d1") == g + 1
    finally:
        r.close()


# -- deployments ---------------------------------------------------------------------------------------


@pytest.fixture
def image(reg: Registry) -> Image:
    for d in ("d1", "d2", "d3"):
        reg.observe_device(d, "online", {"online": True})
    return add_image(reg, "img", {"clf": add_model(reg, "m")})


def test_create_deployment(reg: Registry, image: Image) -> None:
    reg.create_deployment(
        "dep-1", image, {"tags": {"site": "a"}}, ["d1", "d2", "d3"], {"canary": 1}, {"runtime": {}}, [1, 2]
    )
    dep = reg.deployment("dep-1")
    assert dep["state"] == "running"
    assert dep["image_id"] == image.id
    assert dep["target"] == {"tags": {"site": "a"}}
    assert dep["policy"] == {"canary": 1}
    assert dep["wave"] == 0
    members = reg.members("dep-1")
    assert [(m["device_id"], m["wave"], m["state"]) for m in members] == [
        ("d1", 1, "pending"),
        ("d2", 2, "pending"),
        ("d3", 2, "pending"),
    ]
    events = reg.events("dep-1")
    assert [e["kind"] for e in events] == ["created"]
    assert events[0]["detail"] == {"image": "img:1", "target": {"tags": {"site": "a"}}, "waves": [1, 2]}
    assert [d["id"] for d in reg.deployments(device="d2")] == ["dep-1"]
    assert [d["id"] for d in reg.deployments(model=("m", 1))] == ["dep-1"]
    assert reg.deployments(model=("m", 2)) == []
    assert [d["id"] for d in reg.deployments(image=("img", None), state="running")] == ["dep-1"]
    assert reg.busy_devices(["d1", "d3", "zz"]) == {"d1": "dep-1", "d3": "dep-1"}


@pytest.mark.parametrize("state", ["running", "paused", "rolling_back"])
def test_create_deployment_refuses_busy_devices(reg: Registry, image: Image, state: str) -> None:
    start_deployment(reg, "dep-1", image, ["d1", "d2"])
    reg.update_deployment("dep-1", state=state)
    err = refused(ErrorCode.DEVICE_BUSY, start_deployment, reg, "dep-2", image, ["d2", "d3"])
    assert "d2" in err.message
    assert "d3" not in err.message
    assert "dep-1" in err.message
    # nothing was written
    refused(ErrorCode.DEPLOYMENT_NOT_FOUND, reg.deployment, "dep-2")
    assert reg.members("dep-2") == []
    assert reg.events("dep-2") == []
    # a device of no live deployment is free
    start_deployment(reg, "dep-3", image, ["d3"])
    assert reg.deployment("dep-3")["state"] == "running"


@pytest.mark.parametrize("state", ["succeeded", "aborted", "rolled_back"])
def test_create_deployment_allowed_once_the_owner_finished(reg: Registry, image: Image, state: str) -> None:
    start_deployment(reg, "dep-1", image, ["d1", "d2"])
    refused(ErrorCode.DEVICE_BUSY, start_deployment, reg, "dep-2", image, ["d2"])
    reg.update_deployment("dep-1", state=state)
    assert reg.busy_devices(["d1", "d2"]) == {}
    start_deployment(reg, "dep-2", image, ["d2", "d3"])
    assert reg.busy_devices(["d1", "d2", "d3"]) == {"d2": "dep-2", "d3": "dep-2"}
    assert [m["device_id"] for m in reg.members("dep-2")] == ["d2", "d3"]


def test_update_deployment_and_member(reg: Registry, image: Image) -> None:
    start_deployment(reg, "dep-1", image, ["d1"])
    before = reg.deployment("dep-1")["updated_at"]
    reg.update_deployment("dep-1", state="paused", reason="held", wave=1)
    dep = reg.deployment("dep-1")
    assert (dep["state"], dep["reason"], dep["wave"]) == ("paused", "held", 1)
    assert dep["updated_at"] >= before
    reg.update_member("dep-1", "d1", state="failed", generation=5, error={"code": "timeout"})
    (m,) = reg.members("dep-1")
    assert (m["state"], m["generation"], m["error"]) == ("failed", 5, {"code": "timeout"})


def test_take_lease(reg: Registry, image: Image) -> None:
    start_deployment(reg, "dep-1", image, ["d1"])
    assert reg.take_lease("dep-1", "a", 30.0) is True
    assert reg.take_lease("dep-1", "b", 30.0) is False
    assert reg.take_lease("dep-1", "a", 30.0) is True  # the owner renews it
    reg.release_lease("dep-1", "b")  # not b's to release
    assert reg.take_lease("dep-1", "b", 30.0) is False
    assert reg.deployment("dep-1")["lease_owner"] == "a"
    reg.release_lease("dep-1", "a")
    assert reg.deployment("dep-1")["lease_owner"] is None
    assert reg.take_lease("dep-1", "b", 30.0) is True
    assert reg.take_lease("dep-1", "a", 30.0) is False
    assert reg.take_lease("no-such-deployment", "a", 30.0) is False


def test_expired_lease_can_be_taken(reg: Registry, image: Image) -> None:
    start_deployment(reg, "dep-1", image, ["d1"])
    assert reg.take_lease("dep-1", "a", -1.0) is True  # already expired
    assert reg.take_lease("dep-1", "b", 30.0) is True
    assert reg.deployment("dep-1")["lease_owner"] == "b"


def test_newer_deployments(reg: Registry, image: Image) -> None:
    start_deployment(reg, "dep-1", image, ["d1", "d2"])
    reg.update_member("dep-1", "d1", state="active")
    reg.update_deployment("dep-1", state="succeeded")
    assert reg.newer_deployments("dep-1") == set()
    time.sleep(0.01)
    start_deployment(reg, "dep-2", image, ["d1"])
    assert reg.newer_deployments("dep-1") == set()  # dep-2 has not published yet
    reg.update_member("dep-2", "d1", state="updating")
    assert reg.newer_deployments("dep-1") == {"dep-2"}
    assert reg.newer_deployments("dep-2") == set()


# -- heartbeats ----------------------------------------------------------------------------------------


def _beat(requests: int, errors: int = 0, p99: float | None = 10.0, model: str = "m") -> dict[str, Any]:
    return {
        "models": {
            model: {"model": model, "version": "1", "requests": requests, "errors": errors, "p99_ms": p99}
        }
    }


def test_heartbeats_within_the_time_range(reg: Registry) -> None:
    now = time.time()
    reg.add_heartbeats(
        [
            ("d1", now - 300, _beat(1)),
            ("d1", now - 200, _beat(2)),
            ("d2", now - 150, _beat(3, errors=1, p99=None)),
            ("d1", now - 100, _beat(4)),
            ("d3", now - 150, _beat(5)),
            ("d1", now - 10, _beat(6)),
        ]
    )
    rows = reg.heartbeats(["d1", "d2"], now - 250, now - 50)
    assert [(r["device_id"], r["requests"]) for r in rows] == [("d1", 2), ("d2", 3), ("d1", 4)]
    assert rows[1]["errors"] == 1
    assert rows[1]["p99_ms"] is None
    assert rows[0]["p99_ms"] == 10.0
    assert rows[0]["ts"] == pytest.approx(now - 200)
    # bounds are inclusive
    assert [r["requests"] for r in reg.heartbeats(["d1"], now - 200, now - 100)] == [2, 4]
    assert [r["requests"] for r in reg.heartbeats(["d3"], now - 1000, now)] == [5]
    assert reg.heartbeats([], now - 1000, now) == []
    assert reg.heartbeats(["d9"], now - 1000, now) == []


def test_heartbeat_windows_per_model(reg: Registry) -> None:
    now = time.time()
    beat = {
        "models": {
            "a": {"model": "a", "version": "2", "requests": 7, "errors": 0, "p99_ms": 1.5},
            "b": {"model": "b", "version": "3", "requests": None, "errors": None, "p99_ms": 2.5},
            "junk": "not a window",
        }
    }
    reg.add_heartbeats([("d1", now, beat), ("d1", now, {}), ("d1", now, {"models": None})])
    rows = reg.heartbeats(["d1"], now - 1, now + 1)
    assert sorted((r["model"], r["version"], r["requests"], r["errors"]) for r in rows) == [
        ("a", "2", 7, 0),
        ("b", "3", 0, 0),
    ]


def test_old_heartbeats_are_dropped(reg: Registry) -> None:
    now = time.time()
    reg.add_heartbeats([("d1", now - HEARTBEAT_RETENTION_S - 3600, _beat(1)), ("d1", now - 60, _beat(2))])
    rows = reg.heartbeats(["d1"], 0, now + 1)
    assert [r["requests"] for r in rows] == [2]


# -- migrations ----------------------------------------------------------------------------------------


def test_registry_too_new_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    err = refused(ErrorCode.REGISTRY_TOO_NEW, Registry, path)
    assert "99" in err.message
    assert str(len(MIGRATIONS)) in err.message
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 99
        assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == []
    finally:
        conn.close()


def test_new_registry_has_the_latest_schema(tmp_path: Path) -> None:
    r = Registry(tmp_path / "sub" / "dir" / "registry.db")
    try:
        assert r.schema_version == len(MIGRATIONS)
        tables = set(r.db.table_names())
        assert {"models", "images", "image_models", "devices", "deployments", "deployment_devices"} <= tables
        assert {"events", "heartbeats"} <= tables
    finally:
        r.close()


def test_reopen_keeps_data(registry_location: Path | str) -> None:
    path = registry_location
    r = Registry(path)
    m = add_model(r, "m", {"k": "v"})
    img = add_image(r, "img", {"clf": m})
    r.observe_device("d1", "online", {"online": True})
    r.tag_device("d1", {"site": "a"})
    start_deployment(r, "dep-1", img, ["d1"])
    r.close()

    r = Registry(path)
    try:
        assert r.schema_version == len(MIGRATIONS)
        assert r.model("m", 1) == m
        assert r.image("img", 1) == img
        assert r.device("d1")["tags"] == {"site": "a"}
        assert r.deployment("dep-1")["state"] == "running"
        assert add_model(r, "m").version == 2
    finally:
        r.close()
