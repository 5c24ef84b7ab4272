"""The one-way stack of chainprod's modules, checked from the source.

Every ``import`` statement in every module, at top level or inside a
function, is parsed with ``ast`` and resolved to the chainprod module it
names. A module may import modules of its own level or below, never above,
and the import graph may have no cycle. A new module must be placed in
:data:`STACK` (the test says so), so the order stays written down.
"""

from __future__ import annotations

import ast
import fnmatch
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "chainprod")

#: bottom to top; a module may import only modules of its own level or a lower one
STACK = [
    ["chainprod.errors", "chainprod._validate", "chainprod._caches", "chainprod._workspace", "chainprod._version",
     "chainprod.arrays"],
    ["chainprod.activations", "chainprod.blocks"],
    ["chainprod.array_inputs"],
    ["chainprod.layers"],
    ["chainprod.schedules.flops"],
    ["chainprod.schedules.plan"],
    ["chainprod.schedules.builders"],
    ["chainprod.schedules"],
    ["chainprod.planning", "chainprod.planning.*"],
    ["chainprod.kernels", "chainprod.kernels.*"],
    ["chainprod.cost.model"],
    ["chainprod.cost.scan"],
    ["chainprod.cost.auto"],
    ["chainprod.cost.simulate"],
    ["chainprod.cost"],
    ["chainprod.executors.base"],
    ["chainprod.executors.serial", "chainprod.executors.vectorized", "chainprod.executors.threads",
     "chainprod.executors.array_jax", "chainprod.executors.array_views",
     "chainprod.executors.array_api"],
    ["chainprod.executors.remote_tasks", "chainprod.executors.sharded_worker", "chainprod.executors.time_worker",
     "chainprod.executors.sharded_newton", "chainprod.executors.time_newton"],
    ["chainprod.executors.distributed"],
    ["chainprod.executors.ray_executor", "chainprod.executors.dask_executor",
     "chainprod.executors.sharded_ray", "chainprod.executors.sharded_dask",
     "chainprod.executors.time_ray", "chainprod.executors.time_dask"],
    ["chainprod.executors"],
    ["chainprod.tape", "chainprod.forward_methods"],
    ["chainprod.backward_numpy", "chainprod.backward_compiled", "chainprod.backward_remote", "chainprod.array_grad"],
    ["chainprod.autotune", "chainprod.quick"],
    ["chainprod.grad"],
    ["chainprod.products", "chainprod.recurrence", "chainprod.recurrent_io", "chainprod.recurrent_grad",
     "chainprod.recurrent_layers", "chainprod.recurrent_quick"],
    ["chainprod.recurrent", "chainprod.rnn", "chainprod.ssm_grad", "chainprod.ssm",
     "chainprod.recurrent_array", "chainprod.recurrent_array_cells", "chainprod.ssm_array"],
    ["chainprod.newton_models", "chainprod.newton_steps", "chainprod.newton_solve", "chainprod.newton"],
    ["chainprod.plan"],
    ["chainprod.shard_trace", "chainprod.shard_plan", "chainprod.shard_recovery", "chainprod.shard_newton"],
    ["chainprod.shard", "chainprod.shard_time", "chainprod.shard_time_newton"],
    ["chainprod.check", "chainprod.testing", "chainprod.torch", "chainprod.torch_recurrent",
     "chainprod.torch_array"],
    ["chainprod._timing", "chainprod._timing_steps", "chainprod.results"],
    ["chainprod.calibrate"],
    ["chainprod.bench_rows", "chainprod.bench_sequence_models", "chainprod.bench_sequences"],
    ["chainprod.bench"],
    ["chainprod.report", "chainprod.report_sequences", "chainprod.report_checks"],
    ["chainprod.gantt"],
    ["chainprod.plots", "chainprod.plots_sequences"],
    ["chainprod.cli"],
    ["chainprod"],
]


def _modules():
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            out[name] = path
    return out


MODULES = _modules()


def _level(name):
    for i, group in enumerate(STACK):
        if any(fnmatch.fnmatchcase(name, pat) for pat in group):
            return i
    return None


def _from_module(package, node):
    """The absolute module name of a ``from ... import`` statement in ``package``."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name, path):
    """The chainprod modules ``name`` imports, with the line of each import."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _from_module(package, node)
            # ``from pkg import sub`` imports the submodule when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t == "chainprod" or t.startswith("chainprod."):
                while t not in MODULES and "." in t:  # ``import chainprod.x.y`` of a name, not a module
                    t = t.rpartition(".")[0]
                found.append((t, node.lineno))
    return found


def test_every_module_has_a_place_in_the_stack():
    missing = sorted(m for m in MODULES if _level(m) is None)
    assert not missing, f"modules with no place in STACK (add them at their level): {missing}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_upward_import(name):
    mine = _level(name)
    if mine is None:
        pytest.skip("not placed (see test_every_module_has_a_place_in_the_stack)")
    bad = []
    for target, line in _imports(name, MODULES[name]):
        theirs = _level(target)
        if target != name and (theirs is None or theirs > mine):
            bad.append(f"line {line}: imports {target} (level {theirs}) from level {mine}")
    assert not bad, f"{name} imports upward:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t, _ in _imports(m, p) if t != m} for m, p in MODULES.items()}
    state = {}  # 1 = on the current path, 2 = done
    path = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(t) is None:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    # The checker itself must not be blind to the pattern it exists to catch.
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .cli import main\n    import chainprod.bench\n")
    got = {t for t, _ in _imports("chainprod.grad", str(src))}
    assert {"chainprod.cli", "chainprod.bench"} <= got


# -- private names stay in their module ------------------------------------------
def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(module: str) -> str:
    return module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]


def _defined_private_names(tree) -> set:
    """Private names a module defines: functions, classes, globals, and attributes it assigns."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.alias) and node.asname:
            out.add(node.asname)
    return {n for n in out if _private(n)}


_TREES = {m: ast.parse(open(p).read(), p) for m, p in MODULES.items()}
#: private name -> the chainprod modules that define it
_OWNERS: dict = {}
for _m, _t in _TREES.items():
    for _n in _defined_private_names(_t):
        _OWNERS.setdefault(_n, set()).add(_m)


def _private_crossings(name, tree, path):
    """Every place ``name`` uses a private name of another chainprod module, as ``line: what``.

    Three ways to cross: ``from m import _x``; ``m._x`` on a module bound by an
    import; ``obj._x`` where ``_x`` is a private attribute or method that only
    other chainprod modules define. A private *module* (``_validate``,
    ``_caches``) is its package's own and may be imported within that
    package.
    """
    package = _package_of(name)
    mine = _defined_private_names(tree)
    bad, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _from_module(package, node)
            if not (mod == "chainprod" or mod.startswith("chainprod.")):
                continue
            for a in node.names:
                full = f"{mod}.{a.name}"
                if full in MODULES:
                    module_aliases[a.asname or a.name] = full
                    owner_pkg = _package_of(full) if MODULES[full].endswith("__init__.py") else mod
                    if _private(a.name) and not (package + ".").startswith(owner_pkg + "."):
                        bad.append(f"line {node.lineno}: imports private module {full} from outside {owner_pkg}")
                elif _private(a.name):
                    bad.append(f"line {node.lineno}: imports private name {a.name} from {mod}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("chainprod"):
                    module_aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in module_aliases:
            bad.append(f"line {node.lineno}: {base.id}.{node.attr} is private to {module_aliases[base.id]}")
        elif isinstance(base, ast.Name) and base.id in ("self", "cls"):
            continue
        elif node.attr not in mine and _OWNERS.get(node.attr, set()) - {name}:
            owners = ", ".join(sorted(_OWNERS[node.attr] - {name}))
            bad.append(f"line {node.lineno}: .{node.attr} is private to {owners}")
    return bad


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_crosses_modules(name):
    bad = _private_crossings(name, _TREES[name], MODULES[name])
    assert not bad, f"{name} uses private names of other modules (make them public or keep them home):\n" + \
        "\n".join(bad)


def test_the_private_check_sees_each_way_to_cross(tmp_path, monkeypatch):
    # a private module inside a subpackage (none is left in the tree: a made-up one)
    monkeypatch.setitem(MODULES, "chainprod.kernels._check", str(tmp_path / "_check.py"))
    src = tmp_path / "m.py"
    src.write_text("from .kernels.numba_kernels import _deriv\nfrom .kernels import _check\n"
                   "from . import grad as g\n\ndef f(t):\n    g._sum_value\n    return t._rows\n")
    tree = ast.parse(src.read_text())
    got = "\n".join(_private_crossings("chainprod.tape", tree, str(src)))
    assert "private name _deriv" in got
    assert "private module chainprod.kernels._check" in got
    assert "g._sum_value" in got
    # a private module inside its own package is its package's business
    ok = _private_crossings("chainprod.kernels.numpy_kernels", ast.parse("from . import _check\n"), "x.py")
    assert ok == []
