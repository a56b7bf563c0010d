"""specrun's layers, as the README's Layout section states them, checked against every import.

Each module sits on one floor; a module imports only modules on floors below its
own, or (inside one package) on its own floor, and no chain of imports comes back
to where it started. An import inside a function counts like one at the top: it
is still a dependency, only a later one. The table below is the single statement
of the layering; the README's Layout section must state the same floors.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Floors, top first. A floor holds module names or packages (a package's prefix and ".*").
FLOORS: tuple[tuple[str, ...], ...] = (
    ("specrun.__main__",),
    ("specrun.cli.*",),
    ("specrun.bench_workers", "specrun.plot", "specrun.server.*"),
    ("specrun.bench_report",),
    ("specrun.bench", "specrun.bench_batch", "specrun.chat"),
    ("specrun.pulls", "specrun.file_identity"),
    ("specrun.store",),
    ("specrun.catalog", "specrun.workloads.*", "specrun.peers"),
    ("specrun.session",),
    ("specrun.calibrate", "specrun.planner_memory", "specrun.corpus", "specrun.batched"),
    ("specrun.generate",),
    ("specrun.speculate.*",),
    ("specrun.engines.*",),
    ("specrun.kernels.*",),
    ("specrun.model_dir", "specrun.memory_cgroup"),
    ("specrun.gguf_file", "specrun.files", "specrun.sampling", "specrun.memory_limit"),
    ("specrun.errors",),
)
FACE = ("specrun",)  # the package's face (its version) sits with the bottom floor


def floor_of(module: str) -> int:
    """The floor a module sits on (0 is the top); KeyError for a module the table forgets."""
    for i, floor in enumerate(FLOORS + (FACE,) if module in FACE else FLOORS):
        for place in floor:
            if module == place or (place.endswith(".*") and (module + ".").startswith(place[:-1])):
                return len(FLOORS) - 1 if module in FACE else i
    raise KeyError(module)


def package_of(module: str) -> str:
    """The table's entry a module belongs to: a package's modules share one."""
    for floor in FLOORS:
        for place in floor:
            if place.endswith(".*") and (module + ".").startswith(place[:-1]):
                return place
    return module


def sources(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """Every module's (source, whether it is a package's __init__) by its import name
    (kernels/ ships as specrun.kernels)."""
    found = {}
    for base, prefix in ((root / "specrun", "specrun"), (root / "kernels", "specrun.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            package = parts[-1] == "__init__"
            name = ".".join([prefix, *(parts[:-1] if package else parts)])
            found[name] = (path.read_text(), package)
    return found


def imports(module: str, source: str, package: bool, known: set[str]) -> set[str]:
    """The specrun modules `module` imports: at the top, inside functions, or for type checking
    alone (each is a dependency all the same)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package up
                parent = module.split(".") if package else module.split(".")[:-1]
                base = ".".join(parent[:len(parent) - (node.level - 1)] + ([node.module] if node.module else []))
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a module a.b.c, else its package
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph(found: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    known = set(found)
    return {m: imports(m, src, package, known) for m, (src, package) in found.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that goes up (or sideways between entries of one floor)."""
    wrong = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            up = floor_of(dst) < floor_of(src)
            sideways = floor_of(dst) == floor_of(src) and package_of(dst) != package_of(src)
            if up or sideways:
                wrong.append(f"{src} imports {dst} ({'upward' if up else 'across its floor'})")
    return wrong


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def readme_floors(text: str) -> list[list[str]]:
    """The floors the README's Layout section states: the lines of its ```layers block, top
    first, each a floor's entries separated by commas (module paths as specrun's files name them)."""
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "README's Layout section has no ```layers block"
    return [[e.strip() for e in line.split(":", 1)[-1].split(",") if e.strip()]
            for line in block.group(1).strip().splitlines()]


def test_every_module_sits_on_a_floor() -> None:
    missing = [m for m in sources() if not _placed(m)]
    assert not missing, f"modules the layer table forgets: {missing}"


def _placed(module: str) -> bool:
    try:
        floor_of(module)
    except KeyError:
        return False
    return True


def test_no_module_imports_upward_or_across_its_floor() -> None:
    assert violations(graph(sources())) == []


def test_no_import_cycles() -> None:
    assert cycles(graph(sources())) == []


def test_the_checks_catch_a_forbidden_import() -> None:
    """The tests above fail when the code breaks the table: an import up from the bottom floor,
    one across a floor, and a cycle inside one package."""
    found = sources()
    up = dict(found, **{"specrun.files": (found["specrun.files"][0] + "\nfrom specrun.cli import app\n", False)})
    assert violations(graph(up)) == ["specrun.files imports specrun.cli.app (upward)"]
    across = dict(found, **{"specrun.catalog": (found["specrun.catalog"][0] + "\nimport specrun.peers\n", False)})
    assert violations(graph(across)) == ["specrun.catalog imports specrun.peers (across its floor)"]
    tree = found["specrun.speculate.tree"][0] + "\nfrom specrun.speculate.verify import walk\n"
    circle = dict(found, **{"specrun.speculate.tree": (tree, False)})
    assert violations(graph(circle)) == []  # inside one package: allowed, but not in a circle
    assert ["specrun.speculate.tree", "specrun.speculate.verify"] in cycles(graph(circle))


def test_the_readme_states_the_same_floors() -> None:
    def spelled(entry: str) -> str:  # as the README names files: specrun/cli/, kernels/, specrun/store.py
        if entry == "specrun.kernels.*":
            return "kernels/"
        path = entry.replace(".", "/")
        return path[:-1] if path.endswith("*") else path + ".py"

    stated = readme_floors((ROOT / "README.md").read_text())
    assert stated == [[spelled(e) for e in floor] for floor in FLOORS]
