"""The layering of docs/architecture.md, checked against the code's own imports.

Every ``import`` and ``from ... import`` statement of the package is read with
``ast`` (lazy imports inside functions included) and held against the table
below, so a new module that imports upward, or reaches into another module's
private names, fails here rather than in a reviewer's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank"

# Lowest layer first: a module may import its own layer and the layers below.
# Longest prefix wins, so "lowrank.io.files" sits below "lowrank.io".
# Layer 0 is ordered inside too (0.1 ... 0.4): validation, then rounding, then the
# file format, the file primitives, and the model-free adapter reader on top.
LAYERS = {
    "lowrank._version": 0,
    "lowrank.utils": 0,
    "lowrank.precision": 0.1,
    "lowrank.io.safetensors": 0.2,
    "lowrank.io.files": 0.3,
    "lowrank.io.adapter": 0.4,
    "lowrank.factor": 1,
    "lowrank.nn": 2,
    "lowrank.io": 3,
    "lowrank.train": 4,
    "lowrank.reference": 4,
    "lowrank.demo": 5,
    "lowrank.cli": 5,
    "lowrank.__main__": 5,
}
# The package root re-exports factorization and loads the rest lazily; the
# shims keep old import paths and sit with what they re-export.
SHIMS = {
    "lowrank": 1,
    "lowrank.svd": 1,
    "lowrank.als": 1,
    "lowrank.lowrank_matrix": 1,
    "lowrank.data": 4,
    "lowrank.gradcheck": 4,
    "lowrank.vectors": 4,
    "lowrank.testing": 4,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> float:
    if module in SHIMS:
        return SHIMS[module]
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of the table: add it to LAYERS and to docs/architecture.md"
    return LAYERS[max(matches, key=len)]


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, imported names)`` of every lowrank import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.startswith("lowrank")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.startswith("lowrank"):
                found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_table_covers_every_module():
    for path in SOURCES:
        _layer(_module_name(path))  # asserts with the module's name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_go_down_and_never_to_a_private_name(path):
    me = _module_name(path)
    mine = _layer(me)
    for line, module, names in _imports(path):
        target = module
        # "from lowrank import nn" imports the subpackage lowrank.nn
        subpackages = [n for n in names if PACKAGE.parent.joinpath(*f"{module}.{n}".split(".")).is_dir()]
        for n in subpackages:
            assert _layer(f"{module}.{n}") <= mine, f"{me}:{line} imports {module}.{n}, a higher layer"
        if subpackages:
            continue
        assert _layer(target) <= mine, (
            f"{me}:{line} imports {target} (layer {_layer(target)}) from layer {mine}: imports go downward only"
        )
        if target != me and me not in SHIMS:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{me}:{line} imports private names {private} from {target}: make them public"


def _module_level_imports(path: Path) -> set[str]:
    """The lowrank modules ``path`` imports when it is imported (not those imported inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lowrank")}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            if module.startswith("lowrank"):
                found.add(module)
                # "from lowrank.nn import functional" imports the submodule lowrank.nn.functional
                found |= {f"{module}.{a.name}" for a in node.names
                          if PACKAGE.parent.joinpath(*f"{module}.{a.name}".split(".")).is_dir()
                          or PACKAGE.parent.joinpath(*f"{module}.{a.name}".split(".")).with_suffix(".py").is_file()}
    return found


def test_no_import_cycles():
    """Module-level imports form no cycle (Python would give a half-initialised module)."""
    modules = {_module_name(p): p for p in SOURCES}
    graph = {m: {d for d in _module_level_imports(p) if d in modules and d != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = [*path[path.index(d):], d] if d in path else [m, d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
