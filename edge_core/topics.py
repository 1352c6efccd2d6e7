"""MQTT topic layout: one prefix, one subtree per device.

    {prefix}/devices/{device_id}/desired     retained, written by the operator: the signed manifest
    {prefix}/devices/{device_id}/status      retained, written by the device: the status document
    {prefix}/devices/{device_id}/online      retained, written by the device; its last will says offline
    {prefix}/devices/{device_id}/inventory   retained, written by the device on every connect
    {prefix}/devices/{device_id}/heartbeat   written by the device: small periodic summary

The broker's ACL lets a device read only its ``desired`` topic and write only the others of its own
subtree (:func:`mosquitto_device_acl`); operators, on a listener of their own, read and write the whole
prefix (:func:`mosquitto_operator_acl`).

Fleet provisioning (docs/control-plane.md, "Fleet provisioning") adds, for a claim certificate whose
CN is ``claim-NAME`` (that CN is also its username and its client id on the device listener):

    {prefix}/provisioning/{claim CN}/request            written by the claim: a CSR and a nonce
    {prefix}/provisioning/{claim CN}/response/{nonce}   written by the operator: the certificate, or a refusal

``%u`` in the patterns keeps one claim out of every other claim's topics; the nonce, chosen at random
by the device, keeps one device from guessing another's exact answer topic.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "edge"
DEVICE_WRITES = ("status", "online", "inventory", "heartbeat")
DEVICE_READS = ("desired",)
#: Every claim certificate's CN starts so; a provisioned device id never may (see deploy/provision.py).
CLAIM_PREFIX = "claim-"


def provisioning_request(prefix: str, claim_cn: str) -> str:
    return f"{prefix}/provisioning/{claim_cn}/request"


def provisioning_response(prefix: str, claim_cn: str, nonce: str) -> str:
    return f"{prefix}/provisioning/{claim_cn}/response/{nonce}"


def provisioning_acl_lines(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The device listener's patterns for claims: write the own request topic, read the own answers.

    A real device's CN matches ``%u`` too, which grants it nothing useful: the control plane answers
    only CNs its policy names as claims, and device ids may not start with :data:`CLAIM_PREFIX`.
    """
    return [
        "# claims (fleet provisioning): each claim CN its own request topic and answer topics",
        f"pattern write {prefix}/provisioning/%u/request",
        f"pattern read {prefix}/provisioning/%u/response/+",
    ]


@dataclass(frozen=True)
class Topics:
    prefix: str
    device_id: str

    def _t(self, leaf: str) -> str:
        return f"{self.prefix}/devices/{self.device_id}/{leaf}"

    @property
    def desired(self) -> str:
        return self._t("desired")

    @property
    def status(self) -> str:
        return self._t("status")

    @property
    def online(self) -> str:
        return self._t("online")

    @property
    def inventory(self) -> str:
        return self._t("inventory")

    @property
    def heartbeat(self) -> str:
        return self._t("heartbeat")


def mosquitto_device_acl(prefix: str = DEFAULT_PREFIX) -> str:
    """The device listener's mosquitto ACL: patterns only, ``%u`` being the certificate's CN.

    No ``user`` line: an operator certificate on this listener can do nothing, so the operators'
    grants live only on the operator listener (:func:`mosquitto_operator_acl`).
    """
    lines = ["# devices: each reads its own desired state and writes its own reports"]
    lines += [f"pattern read {prefix}/devices/%u/{leaf}" for leaf in DEVICE_READS]
    lines += [f"pattern write {prefix}/devices/%u/{leaf}" for leaf in DEVICE_WRITES]
    lines += provisioning_acl_lines(prefix)
    return "\n".join(lines) + "\n"


def mosquitto_operator_acl(prefix: str = DEFAULT_PREFIX, operators: tuple[str, ...] = ("operator",)) -> str:
    """The operator listener's mosquitto ACL: each operator CN reads and writes the whole prefix.

    No patterns: a certificate that is not an operator's gets nothing on this listener.
    """
    lines: list[str] = []
    for op in operators:
        lines += ["# operator identity: writes desired state, reads every report", f"user {op}"]
        lines += [f"topic readwrite {prefix}/#", ""]
    return "\n".join(lines)
