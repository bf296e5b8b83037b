"""The import graph: layers import only downward, and no module imports itself back.

Every import is read with `ast`, those inside functions too: a cycle hidden in a
function is still a cycle for a reader. A failure names the offending edge.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "raygpt"

# Bottom to top. A module may import its own unit and any unit on a lower layer.
LAYERS: list[tuple[str, ...]] = [
    ("redact",),
    ("errors",),
    ("status",),
    ("object_store",),
    ("storage",),
    ("results",),
    ("run_folder",),
    ("config",),
    ("runtime", "checkpoint"),
    ("cluster",),
    ("data",),
    ("model",),
    ("eval",),
    ("train",),
    ("report",),
    ("sweep",),
    ("sample", "export", "bench", "mup"),
    ("service",),
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The raygpt modules that `name` imports, anywhere in its file."""
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                mod = f"{anchor}.{mod}" if mod else anchor
            mods = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for mod in mods:
            while mod and mod not in known:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and mod.startswith("raygpt."):
                targets.add(mod)
    return targets


def unit(module: str) -> str:
    return module.split(".")[1]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_unit_has_a_layer():
    units = {unit(m) for m in graph() if m != "raygpt"}
    assert units <= set(LAYER_OF), f"give these a layer in LAYERS: {sorted(units - set(LAYER_OF))}"


def test_layers_import_only_downward():
    upward = []
    for source, targets in graph().items():
        if source == "raygpt":
            continue
        for target in targets:
            same = unit(source) == unit(target)
            if not same and LAYER_OF[unit(target)] >= LAYER_OF[unit(source)]:
                upward.append(f"{source} -> {target}")
    assert not upward, "imports that do not run downward: " + ", ".join(sorted(upward))


def test_no_import_cycles():
    edges = graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each closed by the
    edge that makes it a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_check_sees_a_cycle_and_an_upward_edge():
    """The checks themselves: a made-up graph with a cycle and an upward edge fails both."""
    edges = {"raygpt.a.x": {"raygpt.a.y"}, "raygpt.a.y": {"raygpt.a.x"}, "raygpt.b": set()}
    assert _cycles(edges) == [["raygpt.a.x", "raygpt.a.y"]]
    assert LAYER_OF["storage"] < LAYER_OF["train"]  # train may import storage, not back


def _defined_names(path: Path) -> set[str]:
    """The names a module binds at its top level: defs, classes, assignments, imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
                elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                    names |= {(a.asname or a.name).split(".")[0] for a in sub.names}
                elif isinstance(sub, ast.Assign):
                    names |= {
                        n.id for t in sub.targets for n in ast.walk(t) if isinstance(n, ast.Name)
                    }
    return names


def test_every_raygpt_import_in_the_repository_resolves():
    """Benchmarks, tests and the package import names that exist, function-level imports
    too: a benchmark that CI runs only as a slow smoke test must not be the one to find a
    moved name."""
    known = modules()
    root = PACKAGE.parent
    files = [
        p
        for d in ("raygpt", "benchmarks", "tests", "cluster", "experiments")
        for p in (root / d).rglob("*.py")
    ]
    broken = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                not isinstance(node, ast.ImportFrom)
                or node.level
                or not (node.module or "").startswith("raygpt")
            ):
                if isinstance(node, ast.Import):
                    broken += [
                        f"{path.relative_to(root)}: {a.name}"
                        for a in node.names
                        if a.name.startswith("raygpt") and a.name not in known
                    ]
                continue
            if node.module not in known:
                broken.append(f"{path.relative_to(root)}: {node.module}")
                continue
            defined = _defined_names(known[node.module])
            for alias in node.names:
                if f"{node.module}.{alias.name}" not in known and alias.name not in defined:
                    broken.append(f"{path.relative_to(root)}: {node.module}.{alias.name}")
    assert not broken, "imports of names that do not exist: " + ", ".join(sorted(broken))


def _tested_modules(known: dict[str, Path]) -> set[str]:
    """The raygpt modules some test imports (at any depth) or runs with `python -m`."""
    tests = PACKAGE.parent / "tests"
    seen: set[str] = set()
    for path in tests.rglob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                seen |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                seen.add(node.module)
                seen |= {f"{node.module}.{a.name}" for a in node.names}
        # `python -m raygpt.X` runs raygpt.X.__main__ (or raygpt.X itself).
        for mod in re.findall(r"""["'-]m["',\s]+["']?(raygpt[\w.]*)""", text):
            seen |= {mod, f"{mod}.__main__"}
    closed = set()
    for mod in seen & set(known):
        parts = mod.split(".")
        closed |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return closed


def test_every_module_is_imported_by_a_test():
    known = modules()
    missing = sorted(set(known) - _tested_modules(known))
    assert not missing, f"modules no test imports or runs: {missing}"


# The house's two size rules: a module a reader can hold in mind, and a top level
# that shows the packages rather than hiding them among loose modules.
MAX_MODULE_LINES = 450
MAX_TOP_LEVEL_MODULES = 12


def test_no_module_is_longer_than_the_limit():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {long}"


def test_the_top_level_holds_few_modules():
    top = sorted(
        p.stem for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")
    )
    assert len(top) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(top)} top-level modules (at most {MAX_TOP_LEVEL_MODULES}): {top}"
    )
