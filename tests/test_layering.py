"""The package's layers point one way: each subpackage imports only itself and the layers below
it (`cachefeat.LAYERS`, as the package docstring draws them). Read from the source, every import
counted, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import cachefeat

PACKAGE = Path(cachefeat.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every cachefeat import in a source file."""
    tree = ast.parse(path.read_text(), str(path))
    here = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{here}:{node.lineno}: a relative import (the package uses absolute ones)"
            out.append((node.lineno, node.module or ""))
    return [(line, name) for line, name in out if name == "cachefeat" or name.startswith("cachefeat.")]


def _layer(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    for rank, group in enumerate(cachefeat.LAYERS):
        if name in group:
            return rank
    raise AssertionError(f"{module} is in no layer of cachefeat.LAYERS")


def test_every_module_is_in_a_layer():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if rel.parts[1:] in (("__init__",), ("__main__",)):
            continue
        _layer(".".join(rel.parts))


def test_imports_point_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if rel.parts[1:] in (("__init__",), ("__main__",)):
            continue
        me = ".".join(rel.parts)
        for line, module in _imports(path):
            if module == "cachefeat":
                continue
            if _layer(module) > _layer(me):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_docstring_draws_the_layers():
    """The docstring's table lists the layers in LAYERS' order, one line each."""
    rows = [line.split()[0].rstrip(",") for line in cachefeat.__doc__.splitlines() if line.startswith("    ")]
    assert rows == [group[0] for group in cachefeat.LAYERS]
