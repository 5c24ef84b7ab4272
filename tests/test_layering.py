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
    ["chainprod.errors", "chainprod._validate", "chainprod._caches", "chainprod._version"],
    ["chainprod.activations", "chainprod.blocks"],
    ["chainprod.layers"],
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
    ["chainprod.executors.serial", "chainprod.executors.vectorized", "chainprod.executors.threads"],
    ["chainprod.executors.remote_tasks", "chainprod.executors.sharded_worker",
     "chainprod.executors.sharded_kernels"],
    ["chainprod.executors.distributed"],
    ["chainprod.executors.ray_executor", "chainprod.executors.dask_executor",
     "chainprod.executors.sharded_ray", "chainprod.executors.sharded_dask"],
    ["chainprod.executors"],
    ["chainprod.tape"],
    ["chainprod.backward_numpy", "chainprod.backward_compiled"],
    ["chainprod.autotune"],
    ["chainprod.grad"],
    ["chainprod.products"],
    ["chainprod.plan"],
    ["chainprod.shard"],
    ["chainprod.check", "chainprod.testing", "chainprod.torch"],
    ["chainprod._timing", "chainprod.results"],
    ["chainprod.calibrate"],
    ["chainprod.bench_rows"],
    ["chainprod.bench"],
    ["chainprod.report"],
    ["chainprod.gantt"],
    ["chainprod.plots"],
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
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
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
