"""The house plan holds: no import cycle between any two modules of the product, and no module of
agent/ or deploy/ over 600 lines unless docs/architecture.md says why. The layers between folders
and wings are import-linter's contracts (pyproject.toml), run by .ci/run; this adds what a layer
contract cannot see: cycles inside one wing."""

from __future__ import annotations

from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_core", "cloud_sync", "agent", "deploy", "simulators")
MAX_LINES = 600


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back() -> None:
    graph = grimp.build_graph(*PACKAGES)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert cycles(edges) == []


def test_no_oversized_module_without_a_reason() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    big = [
        str(p.relative_to(ROOT))
        for folder in ("agent", "deploy")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if len(p.read_text().splitlines()) > MAX_LINES
    ]
    unexplained = [p for p in big if p not in doc]
    assert not unexplained, f"over {MAX_LINES} lines with no word in docs/architecture.md: {unexplained}"
