"""The documented contracts and the code agree."""

from __future__ import annotations

from pathlib import Path

from agent.update.deployer import TRANSITIONS
from edge_core.errors import ErrorCode

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_error_code_is_documented() -> None:
    text = (DOCS / "errors.md").read_text()
    missing = [c.value for c in ErrorCode if f"`{c.value}`" not in text]
    assert not missing, f"add these codes to docs/errors.md: {missing}"


def test_the_documented_state_table_is_the_code_table() -> None:
    rows = set()
    for line in (DOCS / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("state", "---"):
            rows.add((cells[0], cells[1], cells[2]))
    assert rows == {(s.value, e.value, n.value) for (s, e), n in TRANSITIONS.items()}


def test_the_documented_rollout_table_is_the_code_table() -> None:
    from deploy.rollout import TRANSITIONS as ROLLOUT

    text = (DOCS / "control-plane.md").read_text()
    table = text[text.index("### The deployment's states") :]
    rows = set()
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0] not in ("state", "---"):
            rows.add((cells[0], cells[1], cells[2]))
    assert rows == {(s, e, n) for (s, e), n in ROLLOUT.items()}
