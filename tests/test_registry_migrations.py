"""The registry's schema migrations (deploy/registry/migrate.py, deploy/registry/migrations/*.sql).

A file made by edge-deploy before its migrations were SQL files (schema version 1 in
``PRAGMA user_version``, no ``schema_migrations``) is written here by hand, statement for statement
as that code's sqlite-utils wrote it. Later migrations are injected through ``migrate()``. The last
tests run on both databases: a SQLite file and a fresh PostgreSQL database (tests/conftest_pg.py).
"""

from __future__ import annotations

import fnmatch
import sqlite3
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from deploy.registry import MIGRATIONS, Migration, Registry, migrate
from deploy.registry.backend import Db, SqliteDb
from deploy.registry.backend import connect as connect_db
from deploy.registry.migrate import LEDGER, check_sequence, load_migrations, recorded, schema_version
from edge_core.errors import ControlPlaneError, ErrorCode

ROOT = Path(__file__).resolve().parent.parent

#: The schema as the code before SQL migrations created it (sqlite-utils' own DDL), version 1.
OLD_SCHEMA = [
    """CREATE TABLE "models" ("id" INTEGER PRIMARY KEY, "name" TEXT NOT NULL, "version" INTEGER NOT NULL,
       "sha256" TEXT NOT NULL, "size" INTEGER, "artifact" TEXT NOT NULL, "inputs" TEXT, "outputs" TEXT,
       "tags" TEXT, "properties" TEXT, "created_at" REAL)""",
    'CREATE UNIQUE INDEX "idx_models_name_version" ON "models" ("name", "version")',
    """CREATE TABLE "images" ("id" INTEGER PRIMARY KEY, "name" TEXT NOT NULL, "version" INTEGER NOT NULL,
       "sha256" TEXT NOT NULL, "size" INTEGER, "artifact" TEXT NOT NULL, "has_score" INTEGER,
       "tags" TEXT, "properties" TEXT, "meta" TEXT, "created_at" REAL)""",
    'CREATE UNIQUE INDEX "idx_images_name_version" ON "images" ("name", "version")',
    'CREATE INDEX "idx_images_sha256" ON "images" ("sha256")',
    """CREATE TABLE "image_models" ("image_id" INTEGER REFERENCES "images"("id"),
       "model_id" INTEGER REFERENCES "models"("id"), "alias" TEXT, PRIMARY KEY ("image_id", "model_id"))""",
    """CREATE TABLE "devices" ("id" TEXT PRIMARY KEY, "tags" TEXT, "online" INTEGER, "last_seen" REAL,
       "inventory" TEXT, "status" TEXT, "last_generation" INTEGER, "created_at" REAL)""",
    """CREATE TABLE "deployments" ("id" TEXT PRIMARY KEY, "image_id" INTEGER REFERENCES "images"("id"),
       "target" TEXT, "policy" TEXT, "sections" TEXT, "state" TEXT, "reason" TEXT, "command" TEXT,
       "wave" INTEGER, "phase" TEXT, "phase_since" REAL, "lease_owner" TEXT, "lease_until" REAL,
       "created_at" REAL, "updated_at" REAL)""",
    'CREATE INDEX "idx_deployments_image_id" ON "deployments" ("image_id")',
    """CREATE TABLE "deployment_devices" ("deployment_id" TEXT REFERENCES "deployments"("id"),
       "device_id" TEXT, "wave" INTEGER, "state" TEXT, "generation" INTEGER, "manifest_sha256" TEXT,
       "previous" TEXT, "revert_generation" INTEGER, "published_at" REAL, "finished_at" REAL,
       "error" TEXT, PRIMARY KEY ("deployment_id", "device_id"))""",
    'CREATE INDEX "idx_deployment_devices_device_id" ON "deployment_devices" ("device_id")',
    """CREATE TABLE "events" ("id" INTEGER PRIMARY KEY, "deployment_id" TEXT, "ts" REAL, "kind" TEXT,
       "detail" TEXT)""",
    'CREATE INDEX "idx_events_deployment_id_id" ON "events" ("deployment_id", "id")',
    """CREATE TABLE "heartbeats" ("device_id" TEXT, "ts" REAL, "model" TEXT, "version" TEXT,
       "requests" INTEGER, "errors" INTEGER, "p99_ms" REAL)""",
    'CREATE INDEX "idx_heartbeats_device_id_ts" ON "heartbeats" ("device_id", "ts")',
]

#: Rows as that code wrote them: JSON as text, ids from SQLite's rowid.
OLD_ROWS = [
    "INSERT INTO models VALUES (1, 'm', 1, 'aa', 3, 'models/m/1/m.onnx', '[]', '[]', '{\"k\":\"v\"}',"
    " '{}', 1.5)",
    "INSERT INTO images VALUES (1, 'img', 1, 'bb', 10, 'images/img/1.tar', 1, '{}', '{}', '{}', 2.5)",
    "INSERT INTO image_models VALUES (1, 1, 'clf')",
    "INSERT INTO devices VALUES ('d1', '{}', 1, 3.5, NULL, NULL, 1700000000000, 3.5)",
    "INSERT INTO deployments VALUES ('dep-1', 1, '{}', '{}', '{}', 'running', NULL, NULL, 0, 'start', 4.5,"
    " NULL, 0.0, 4.5, 4.5)",
    "INSERT INTO deployment_devices (deployment_id, device_id, wave, state)"
    " VALUES ('dep-1', 'd1', 1, 'pending')",
    "INSERT INTO events VALUES (1, 'dep-1', 4.5, 'created', '{\"image\":\"img:1\"}')",
]


def connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    path = tmp_path / "registry.db"
    conn = connect(path)
    try:
        for sql in [*OLD_SCHEMA, *OLD_ROWS]:
            conn.execute(sql)
        conn.execute("PRAGMA user_version = 1")
    finally:
        conn.close()
    return path


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = connect(tmp_path / "fresh.db")
    yield c
    c.close()


def tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0] for r in rows}


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def ledger(conn: sqlite3.Connection | Db) -> list[tuple[int, str]]:
    return [(v, n) for v, n, _ in recorded(conn)]


def affinity(declared: str) -> str:
    """SQLite's rules (datatype3.html, 3.1): what decides how a column stores its values."""
    t = declared.upper()
    if "INT" in t:
        return "INTEGER"
    if any(s in t for s in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if not t or "BLOB" in t:
        return "BLOB"
    if any(s in t for s in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def shape(conn: sqlite3.Connection) -> dict[str, Any]:
    """Everything about the schema that behaves: columns (affinity, NOT NULL, key), rowid aliases,
    indexes and foreign keys. Not the DDL's text: quoting and type spellings differ on purpose."""
    out: dict[str, Any] = {}
    for table in sorted(tables(conn) - {LEDGER}):
        # an INTEGER PRIMARY KEY is the rowid: then the key is the table's order, as before
        info = conn.execute(f"PRAGMA table_info({table})").fetchall()
        rowid_alias = [name for _, name, decl, _, _, pk in info if pk and decl == "INTEGER"]
        indexes = sorted(
            (name, unique, tuple(r[2] for r in conn.execute(f"PRAGMA index_info({name})")))
            for _, name, unique, *_ in conn.execute(f"PRAGMA index_list({table})")
        )
        fks = sorted(tuple(r[2:5]) for r in conn.execute(f"PRAGMA foreign_key_list({table})"))
        cols = [(name, affinity(decl), notnull, pk) for _, name, decl, notnull, _, pk in info]
        out[table] = {"columns": cols, "rowid": rowid_alias, "indexes": indexes, "fks": fks}
    return out


def failing(version: int) -> Migration:
    """A migration that creates a table, alters another, then fails on its third statement."""
    return Migration(
        version,
        "breaks_midway",
        "-- fails on purpose\n"
        "CREATE TABLE half_made (x INTEGER);\n"
        "ALTER TABLE models ADD COLUMN half_column TEXT;\n"
        "INSERT INTO no_such_table VALUES (1);\n",
    )


#: the shipped schema's version; the migrations the tests inject come after it
N = len(MIGRATIONS)
#: the ledger of a registry at the shipped version
SHIPPED = [(m.version, m.name) for m in MIGRATIONS]
ADD_NOTE = Migration(N + 1, "model_notes", "ALTER TABLE models ADD COLUMN note TEXT;\n")


# -- the shipped migrations ----------------------------------------------------------------------------


def test_the_migrations_ship_as_package_data() -> None:
    assert MIGRATIONS[0].label == "0001_initial"
    files = sorted(p.name for p in (ROOT / "deploy" / "registry" / "migrations").glob("*.sql"))
    assert files == [f"{m.label}.sql" for m in MIGRATIONS]
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in files:
        assert any(fnmatch.fnmatch(f"registry/migrations/{name}", g) for g in globs["deploy"]), name


def test_the_migration_files_keep_to_portable_sql() -> None:
    for m in MIGRATIONS:
        code = "\n".join(line.split("--")[0] for line in m.sql.splitlines()).upper()
        for word in ("AUTOINCREMENT", "INSERT OR", "REPLACE INTO", "PRAGMA", "WITHOUT ROWID", "[", "`"):
            assert word not in code, f"{m.label}: {word}"
        assert m.sql.startswith("-- "), f"{m.label}: say at the top what differs on PostgreSQL"


def test_a_new_registry_records_every_migration(tmp_path: Path) -> None:
    before = time.time()
    r = Registry(tmp_path / "registry.db")
    try:
        assert isinstance(r.db, SqliteDb)
        conn = r.db.conn
        assert ledger(conn) == [(m.version, m.name) for m in MIGRATIONS]
        assert all(before <= t <= time.time() for _, _, t in recorded(conn))
        assert user_version(conn) == r.schema_version == len(MIGRATIONS)
    finally:
        r.close()


def test_each_migration_is_recorded_in_its_own_transaction(conn: sqlite3.Connection) -> None:
    extra = [ADD_NOTE, Migration(N + 2, "model_owners", "ALTER TABLE models ADD COLUMN owner TEXT;\n")]
    assert migrate(conn, [*MIGRATIONS, *extra]) == list(range(1, N + 3))
    assert ledger(conn) == [*SHIPPED, (N + 1, "model_notes"), (N + 2, "model_owners")]
    assert user_version(conn) == schema_version(conn) == N + 2
    # nothing left to do: nothing applied, nothing recorded twice
    assert migrate(conn, [*MIGRATIONS, *extra]) == []
    assert len(ledger(conn)) == N + 2


def test_the_initial_migration_is_the_schema_the_old_code_made(
    old_file: Path, conn: sqlite3.Connection
) -> None:
    migrate(conn, MIGRATIONS[:1])  # 0001 alone: the later ones change the schema on purpose
    old = connect(old_file)
    try:
        assert shape(conn) == shape(old)
    finally:
        old.close()


# -- a registry made before the migrations were SQL files ----------------------------------------------


def test_an_old_registry_opens_keeps_its_data_and_is_adopted(old_file: Path) -> None:
    r = Registry(old_file)
    try:
        # adopted as version 1, then brought up to date
        assert ledger(r.db) == SHIPPED
        assert r.schema_version == N
        assert r.model("m", 1).tags == {"k": "v"}
        assert r.image("img").models == ("m:1",)
        assert r.deployment("dep-1")["state"] == "running"
        assert [e["kind"] for e in r.events("dep-1")] == ["created"]
        assert r.next_generation("d1") > 1700000000000
        # ids continue after the old rowids
        added = r.add_model(
            "m", sha256="cc", size=1, artifact_for=lambda v: f"models/m/{v}/m.onnx", inputs=[], outputs=[]
        )
        assert (added.id, added.version) == (2, 2)
        r.event("dep-1", "paused")
        assert [e["kind"] for e in r.events("dep-1")] == ["created", "paused"]
    finally:
        r.close()
    # and the old code, which reads user_version only, sees a version above its own and refuses it
    conn = connect(old_file)
    try:
        assert user_version(conn) == N
    finally:
        conn.close()


def test_an_old_registry_upgrades_through_a_later_migration(old_file: Path) -> None:
    conn = connect(old_file)
    try:
        assert migrate(conn, [*MIGRATIONS, ADD_NOTE]) == list(range(2, N + 2))
        assert ledger(conn) == [*SHIPPED, (N + 1, "model_notes")]
        assert user_version(conn) == N + 1
        assert "note" in columns(conn, "models")
        assert conn.execute("SELECT name, version, note FROM models").fetchall() == [("m", 1, None)]
    finally:
        conn.close()
    # this edge-deploy knows version N only: the upgraded file is now too new for it
    with pytest.raises(ControlPlaneError) as exc:
        Registry(old_file)
    assert exc.value.code == ErrorCode.REGISTRY_TOO_NEW


# -- a migration that fails ----------------------------------------------------------------------------


def test_a_migration_that_fails_midway_leaves_the_old_version(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    Registry(path).close()
    conn = connect(path)
    try:
        before = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
        with pytest.raises(sqlite3.OperationalError, match="no_such_table") as exc:
            migrate(conn, [*MIGRATIONS, failing(N + 1)], where="the test registry")
        label = f"{N + 1:04d}_breaks_midway"
        assert any(label in n and f"version {N}" in n for n in exc.value.__notes__)
        assert not conn.in_transaction
        assert "half_made" not in tables(conn)
        assert "half_column" not in columns(conn, "models")
        assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == before
        assert ledger(conn) == SHIPPED
        assert user_version(conn) == N
    finally:
        conn.close()
    Registry(path).close()


def test_migrations_applied_before_the_failing_one_stay(conn: sqlite3.Connection) -> None:
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, [*MIGRATIONS, ADD_NOTE, failing(N + 2)])
    assert ledger(conn) == [*SHIPPED, (N + 1, "model_notes")]
    assert user_version(conn) == N + 1
    assert "half_made" not in tables(conn)


def test_a_failing_first_migration_leaves_an_empty_file(conn: sqlite3.Connection) -> None:
    broken = Migration(1, "initial", MIGRATIONS[0].sql + "INSERT INTO no_such_table VALUES (1);\n")
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, [broken])
    # not even the ledger: it is created in the first migration's transaction
    assert tables(conn) == set()
    assert user_version(conn) == 0


def test_a_failure_after_adopting_an_old_registry_leaves_it_as_it_was(old_file: Path) -> None:
    conn = connect(old_file)
    try:
        with pytest.raises(sqlite3.OperationalError):
            # 0001 alone: adopting it and the failing 0002 are one transaction
            migrate(conn, [MIGRATIONS[0], failing(2)])
        assert LEDGER not in tables(conn)
        assert "half_made" not in tables(conn)
        assert user_version(conn) == 1
    finally:
        conn.close()


# -- a registry newer than the code --------------------------------------------------------------------


def too_new(path: Path | str) -> ControlPlaneError:
    with pytest.raises(ControlPlaneError) as exc:
        Registry(path)
    assert exc.value.code == ErrorCode.REGISTRY_TOO_NEW
    return exc.value


def test_a_registry_with_a_newer_recorded_migration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    conn = connect(path)
    try:
        migrate(conn, [*MIGRATIONS, ADD_NOTE])
        before = conn.execute("SELECT * FROM sqlite_master").fetchall()
    finally:
        conn.close()
    err = too_new(path)
    assert f"schema version {N + 1}; this edge-deploy knows up to {N}" in err.message
    assert str(path) in err.message
    conn = connect(path)
    try:
        assert conn.execute("SELECT * FROM sqlite_master").fetchall() == before
        assert ledger(conn) == [*SHIPPED, (N + 1, "model_notes")]
    finally:
        conn.close()


def test_a_newer_ledger_is_refused_even_when_user_version_lags(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    conn = connect(path)
    try:
        migrate(conn, [*MIGRATIONS, ADD_NOTE])
        conn.execute("PRAGMA user_version = 1")
    finally:
        conn.close()
    too_new(path)


def test_a_newer_pre_ledger_registry_is_refused_and_not_adopted(old_file: Path) -> None:
    conn = connect(old_file)
    try:
        conn.execute("PRAGMA user_version = 7")
    finally:
        conn.close()
    assert "schema version 7" in too_new(old_file).message
    conn = connect(old_file)
    try:
        assert LEDGER not in tables(conn)
    finally:
        conn.close()


# -- the runner's own checks ---------------------------------------------------------------------------


def test_statements_are_split_where_sqlite_says_they_end() -> None:
    m = Migration(
        1,
        "x",
        "-- a comment; with a semicolon\nCREATE TABLE a (\n  x TEXT -- why; here\n);\n"
        "CREATE INDEX i ON a (x); -- trailing\n-- the end\n",
    )
    assert [s.splitlines()[-1] for s in m.statements()] == [");", "CREATE INDEX i ON a (x); -- trailing"]
    with pytest.raises(ValueError, match="missing ';'"):
        Migration(1, "x", "CREATE TABLE a (x TEXT)\n").statements()


@pytest.mark.parametrize(
    ("names", "error"),
    [
        (["0001_a.sql", "0003_c.sql"], "numbered 1..2"),
        (["0002_b.sql"], "numbered 1..1"),
        (["0001_a.sql", "1_b.sql"], "NNNN_name.sql"),
        (["0001_a.sql", "0002_Bad-Name.sql"], "NNNN_name.sql"),
    ],
)
def test_migration_files_are_numbered_without_gaps(tmp_path: Path, names: Sequence[str], error: str) -> None:
    for n in names:
        (tmp_path / n).write_text("CREATE TABLE t (x TEXT);\n")
    (tmp_path / "README.txt").write_text("not a migration\n")
    with pytest.raises(ValueError, match=error):
        load_migrations(tmp_path)


def test_load_migrations_reads_a_folder(tmp_path: Path) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE t (x TEXT);\n")
    (tmp_path / "0002_second.sql").write_text("CREATE TABLE u (x TEXT);\n")
    loaded = load_migrations(tmp_path)
    assert [m.label for m in loaded] == ["0001_first", "0002_second"]
    check_sequence(loaded)


def test_migrate_needs_an_autocommit_connection(tmp_path: Path) -> None:
    legacy = sqlite3.connect(tmp_path / "x.db")
    try:
        with pytest.raises(ValueError, match="autocommit"):
            migrate(legacy)
    finally:
        legacy.close()
    conn = connect(tmp_path / "y.db")
    try:
        with pytest.raises(ValueError, match="numbered"):
            migrate(conn, [ADD_NOTE])
        assert tables(conn) == set()
    finally:
        conn.close()


# -- on both databases (the registry_location fixture: a SQLite file, a fresh PostgreSQL database) ------


def test_replicas_opening_one_registry_at_once_apply_each_migration_once(
    registry_location: Path | str,
) -> None:
    """Replicas starting together: each migration applied and recorded once, none of them failing
    (PostgreSQL: the runner's advisory lock; SQLite: BEGIN IMMEDIATE)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_one() -> None:
        try:
            barrier.wait()
            Registry(registry_location).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    db = connect_db(registry_location)
    try:
        assert ledger(db) == SHIPPED
        assert schema_version(db) == N
    finally:
        db.close()


def test_a_failing_migration_leaves_the_old_version_on_both(registry_location: Path | str) -> None:
    Registry(registry_location).close()
    db = connect_db(registry_location)
    try:
        with pytest.raises(db.errors) as exc:
            migrate(db, [*MIGRATIONS, failing(N + 1)], where="the test registry")
        assert any(f"{N + 1:04d}_breaks_midway" in n for n in exc.value.__notes__)
        assert not db.in_transaction
        assert "half_made" not in db.table_names()
        assert ledger(db) == SHIPPED
        # and a later migration that works is applied
        assert migrate(db, [*MIGRATIONS, ADD_NOTE]) == [N + 1]
    finally:
        db.close()
    err = too_new(registry_location)
    assert f"schema version {N + 1}" in err.message
