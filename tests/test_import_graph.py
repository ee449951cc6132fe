"""The package's imports run one way: every robcomp module imports only modules of its own layer or
of lower layers (docs/architecture.md), and no set of modules imports each other in a cycle.

Read from the source with ``ast`` (imports inside functions count: a lazy import is still an arrow),
so the check costs no import and sees every module, also those a test run never loads."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "robcomp"

#: lowest first; a unit is a subpackage or a top-level module. study.spec (the sweep schema the
#: report reads back from results) sits below the report, the study runner (which renders it) above.
LAYERS = [
    {"_version", "_io", "options", "kernels"},
    {"recipes", "summary", "inputs", "outputs"},
    {"layers", "attacks", "zoo"},
    {"compression"},
    {"training", "evaluation", "serialize"},
    {"study.spec"},
    {"report"},
    {"study"},
    {"cli", "__init__"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts[0] == "kernels":
            continue  # kernels/ is its own package (the kernel layer, importing nothing of robcomp)
        parts = ("robcomp",) + (rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t == "robcomp" or t.startswith("robcomp."):
                while t not in known and t.startswith("robcomp.kernels") is False and "." in t:
                    t = t.rpartition(".")[0]
                if t.startswith("robcomp.kernels"):
                    t = "robcomp.kernels"
                if t != name:
                    found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods) | {"robcomp.kernels"}
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _unit(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    if parts[:2] == ["study", "spec"]:
        return "study.spec"
    return parts[0]


def test_every_import_names_a_module_that_exists():
    """A stale path (``robcomp.nn``, ``robcomp.studyspec``: the flat layout) fails here by name."""
    mods = _modules()
    known = set(mods) | {"robcomp.kernels"}
    root = PACKAGE.parent
    others = {str(q.relative_to(root)): q for d in ("tests", "bench") for q in (root / d).rglob("*.py")}
    missing = []
    for name, path in {**mods, **others}.items():  # bench/ too: its GPU-only code never runs on CPU
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("robcomp"):
                bases = [node.module]
            elif isinstance(node, ast.Import):
                bases = [a.name for a in node.names if a.name.startswith("robcomp")]
            else:
                continue
            missing += [f"{name}: {b}" for b in bases if b not in known and not b.startswith("robcomp.kernels.")]
    assert not missing, "imports of modules that do not exist (moved? see docs/architecture.md):\n" + "\n".join(missing)


def test_every_unit_has_a_layer():
    assert {_unit(m) for m in _graph()} <= set(RANK), "add the new subpackage or module to LAYERS (and to docs/architecture.md)"


def test_imports_only_run_downward():
    graph = _graph()
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if RANK[_unit(b)] > RANK[_unit(a)] or (RANK[_unit(b)] == RANK[_unit(a)] and _unit(a) != _unit(b)))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with a cycle and an upward arrow trips both."""
    fake = tmp_path / "robcomp"
    (fake / "layers").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "layers" / "__init__.py").write_text("")
    (fake / "layers" / "a.py").write_text("from robcomp.layers.b import x\n")
    (fake / "layers" / "b.py").write_text("def f():\n    from robcomp.layers import a\n    from robcomp.cli import main\n")
    (fake / "cli.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="robcomp.layers.b -> robcomp.cli"):
        test_imports_only_run_downward()


def test_every_imported_name_exists():
    """``from robcomp.X import name`` anywhere in robcomp/, tests/ and bench/ (lazy imports included,
    such as the GPU-only paths of bench/) finds ``name``: a moved or removed name fails here."""
    import importlib

    root = PACKAGE.parent
    wanted: dict[tuple[str, str], str] = {}
    for d in ("robcomp", "tests", "bench"):
        for path in (root / d).rglob("*.py"):
            if path.relative_to(root).parts[:2] == ("robcomp", "kernels"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("robcomp"):
                    for a in node.names:
                        wanted.setdefault((node.module, a.name), str(path.relative_to(root)))
    missing = []
    for (module, name), where in sorted(wanted.items()):
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{where}: from {module} import {name}")
    assert not missing, "\n".join(missing)

