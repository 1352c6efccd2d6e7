"""The ``trust-keys`` check: every trusted key is an Ed25519 public key the agent can load; it refuses
to start otherwise."""

from __future__ import annotations

from agent.config import AgentConfig
from agent.ops import status as status_mod
from agent.ops.doctor.report import Result


def check_trust_keys(cfg: AgentConfig) -> list[Result]:
    from edge_core import manifest as mf

    ids: list[str] = []
    results: list[Result] = []
    for i, path in enumerate(cfg.trust.keys):
        field = f"trust.keys[{i}]"
        try:
            ids.append(mf.key_id(mf.load_public_key(path.read_bytes()))[:16])
        except OSError as exc:
            results.append(
                Result(
                    "trust-keys",
                    "fail",
                    f"cannot read {field} {path} as {status_mod.current_user()}: {exc.strerror}",
                    status_mod.run_as_hint(path, "doctor"),
                )
            )
        except Exception as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
            results.append(
                Result(
                    "trust-keys",
                    "fail",
                    f"{field} {path} is not an Ed25519 public key in PEM: {exc}",
                    "use the control plane's signing.pub (`edge-deploy keys create` writes it); the agent "
                    "refuses to start with this file",
                )
            )
    if results:
        return results
    return [Result("trust-keys", "ok", f"{len(ids)} Ed25519 key(s) trusted: keyid {', '.join(ids)}")]
