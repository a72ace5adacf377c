"""The package layout (ARCHITECTURE.md): one folder per capability with the same file roles, numerics
without Lightning, exports that point at the defining module, and no import cycle.

These read the source with ``ast``, so they hold for every file, also ones no other test imports.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_bpfree"
CAPABILITIES = ("zo", "fp4", "attention", "diffusion", "noprop", "odice", "bgpo", "attribution")
LIGHTNING_ROLES = {"callback.py", "strategy.py", "precision.py", "module.py", "bench.py", "demo.py", "cli.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, *, skip_type_checking: bool = True) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, function-local ones included, without those under ``if TYPE_CHECKING``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if skip_type_checking and _type_checking_block(node):
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    # `from package import submodule` imports the submodule
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base for a in node.names]


def _tree(module: str) -> ast.Module:
    return ast.parse(SOURCES[module].read_text(), filename=str(SOURCES[module]))


def test_every_capability_folder_exists_with_its_benchmark():
    for capability in CAPABILITIES:
        folder = PACKAGE / capability
        assert (folder / "__init__.py").is_file(), capability
        assert (folder / "bench.py").is_file(), f"{capability}/ has no bench.py"
    assert not (PACKAGE / "rl").exists()


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_only_the_lightning_layer_imports_lightning(module):
    path = SOURCES[module]
    lightning = {
        name
        for node in _imports(_tree(module))
        for name in _imported_modules(node)
        if name.split(".")[0] in ("lightning", "pytorch_lightning")
    }
    if path.name not in LIGHTNING_ROLES and not path.name.endswith("_bench.py"):  # zo/scale_bench.py: a second bench
        assert not lightning, f"{path.relative_to(PACKAGE)} is numerics but imports {sorted(lightning)}"


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_module_level_getattr_only_in_package_inits(module):
    if SOURCES[module].name == "__init__.py":
        return
    tree = _tree(module)
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    names |= {t.id for node in tree.body if isinstance(node, ast.Assign) for t in ast.walk(node) if isinstance(t, ast.Name)}
    assert "__getattr__" not in names, f"{module} defines a module-level __getattr__"


def test_no_import_cycle():
    graph = {
        module: {
            target
            for node in _imports(_tree(module))
            for target in _imported_modules(node)
            if target in SOURCES and target != module
        }
        for module in SOURCES
    }
    # a submodule importing its own package's __init__ (implicit in Python) is not an edge we draw;
    # an __init__ importing its submodules is, so a submodule that imports its package __init__ by
    # name and is imported by it would show up here.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def _lazy_exports(module: str) -> tuple[dict[str, str], dict[str, str]]:
    """(the ``_EXPORTS`` table, the names imported under ``TYPE_CHECKING`` -> their module)."""
    tree = _tree(module)
    exports: dict[str, str] = {}
    checked: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id == "_EXPORTS":
                exports = eval(compile(ast.Expression(node.value), "<exports>", "eval"))  # literal table
        if _type_checking_block(node):
            for child in node.body:
                if isinstance(child, ast.ImportFrom):
                    checked.update({alias.name: child.module for alias in child.names})
    return exports, checked


PACKAGES = sorted(m for m, p in SOURCES.items() if p.name == "__init__.py")


@pytest.mark.parametrize("package", PACKAGES)
def test_lazy_exports_match_their_type_checking_imports_and_point_at_the_definition(package):
    exports, checked = _lazy_exports(package)
    assert exports == checked, f"{package}: _EXPORTS and the TYPE_CHECKING imports disagree"
    for name, module in exports.items():
        value = getattr(importlib.import_module(module), name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__ == module, f"{package}.{name} points at {module}, defined in {value.__module__}"
        assert getattr(importlib.import_module(package), name) is value


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package):
    module = importlib.import_module(package)
    for name in getattr(module, "__all__", []):
        assert getattr(module, name) is not None, f"{package}.{name}"
        assert name in dir(module)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_sources_compile_without_warnings(module):
    """A docstring escape like ``\\ s`` is a SyntaxWarning today and an error in a later Python."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(SOURCES[module].read_text(), str(SOURCES[module]), "exec")
