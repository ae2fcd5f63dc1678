"""The import graph: no module of voxeldose/ or service/ takes part in an import circle (imports inside functions
count too, as they do at run time).  The layer contracts themselves are import-linter's (``lint-imports``)."""

from __future__ import annotations

import grimp


def _cycles(graph: grimp.ImportGraph, packages: tuple[str, ...]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan 1972), among our own modules."""
    nodes = sorted(m for m in graph.modules if m.split(".")[0] in packages)
    # a package's __init__ importing its own submodules is not a circle; a module importing its parent package is
    edges = {m: sorted(n for n in graph.find_modules_directly_imported_by(m) if n in nodes) for m in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            strong(v)
    return out


def test_no_import_circles() -> None:
    graph = grimp.build_graph("voxeldose", "service", include_external_packages=False)
    assert _cycles(graph, ("voxeldose", "service")) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    """The check above can fail: a graph with a → b → a has one circle."""
    graph = grimp.ImportGraph()
    for m in ("voxeldose", "voxeldose.a", "voxeldose.b", "voxeldose.c"):
        graph.add_module(m)
    graph.add_import(importer="voxeldose.a", imported="voxeldose.b")
    graph.add_import(importer="voxeldose.b", imported="voxeldose.a")
    graph.add_import(importer="voxeldose.c", imported="voxeldose.a")
    assert _cycles(graph, ("voxeldose",)) == [["voxeldose.a", "voxeldose.b"]]
