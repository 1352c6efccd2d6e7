"""The doctor's results: one per finding, each a check name, a verdict, a message and a hint; and how
they are printed (``--json`` prints :meth:`Result.as_dict`) and turned into the exit code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Result:
    check: str
    verdict: Verdict
    message: str
    hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "verdict": self.verdict,
            "message": self.message,
            "hint": self.hint or None,
        }


def exit_code(results: list[Result]) -> int:
    return 1 if any(r.verdict == "fail" for r in results) else 0


def format_human(results: list[Result]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r.verdict:<6}{r.check:<15}{r.message}")
        if r.hint and r.verdict != "ok":
            lines.append(f"{'':<21}hint: {r.hint}")
    return "\n".join(lines)


def size_text(n: float) -> str:
    """A byte count for a message: 512 B, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns
