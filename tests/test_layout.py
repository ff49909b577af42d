"""The package's shape: floors that only import downwards, one idea per small module.

Floors, bottom up — a module may import its own floor and the ones below, never above:

0. ``quant/`` (grids, packing, Hessians, solvers) and ``files.py``: pure, no model or run code;
1. ``model/`` (finding blocks, loading, capture, MoE) and ``recipe.py`` (settings);
2. ``checkpoint/`` (formats, writer, inspect, verify, serving) and ``report.py``;
3. ``run/`` (workers, backends, schedules, the job), ``evaluate.py`` and ``harness.py``;
4. ``cli.py``, ``cli_eval.py`` (`admmq eval`), ``cli_doctor.py`` (`admmq doctor`) and
   ``cli_flags.py`` (the recipe flags' table).

The import graph is read from the code (every ``import`` statement, at any depth), so a new
upward import, an import cycle or an import hidden inside a function fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "admmq_dist"
FLOORS = {"quant": 0, "files": 0, "__init__": 0, "model": 1, "recipe": 1, "checkpoint": 2,
          "report": 2, "run": 3, "evaluate": 3, "harness": 3, "cli": 4,
          "cli_flags": 4, "cli_eval": 4, "cli_doctor": 4}
MAX_MODULE_LINES = 360
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted module name -> file (a package by its own name, not ``…__init__``)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def floor(module: str) -> int:
    return FLOORS[module.split(".")[1] if "." in module else "__init__"]


def imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """``(imported module, inside a function)`` for every import of ``path``."""
    tree = ast.parse(path.read_text())
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in nested) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` may import a module x
                full = f"{target}.{alias.name}"
                out.append((full if full in modules() else target, id(node) in nested))
    return out


def test_every_module_has_a_floor_and_imports_only_downwards():
    mods = modules()
    for module, path in mods.items():
        for target, _ in imports(module, path):
            if target.split(".")[0] != "admmq_dist":
                continue
            assert target in mods, f"{module} imports {target}, which does not exist"
            assert floor(target) <= floor(module), (
                f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})")


def test_no_imports_inside_functions_and_no_cycles():
    mods = modules()
    graph = {m: set() for m in mods}
    for module, path in mods.items():
        for target, in_function in imports(module, path):
            if target in mods and target != module:
                assert not in_function, f"{module} imports {target} inside a function"
                graph[module].add(target)

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in mods if m in reach(m) and m != "admmq_dist")
    assert cycles == [], f"modules in import cycles: {cycles}"


def test_one_module_imports_ray_and_the_math_floor_imports_no_model_code():
    users = sorted(m for m, p in modules().items()
                   if any(t.split(".")[0] == "ray" for t, _ in imports(m, p)))
    assert users == ["admmq_dist.run.ray_backend"]
    for module, path in modules().items():
        if floor(module) == 0:
            third = {t.split(".")[0] for t, _ in imports(module, path)}
            assert not third & {"transformers", "accelerate", "ray", "datasets"}, (module, third)


def test_modules_and_functions_stay_small():
    for module, path in modules().items():
        source = path.read_text()
        assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{module} has grown past " \
            f"{MAX_MODULE_LINES} lines: split it by idea"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{module}.{node.name} is {length} lines"
