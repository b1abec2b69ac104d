"""The converters' imports point one way: layout -> dense -> verify -> native / upcycle -> cards, never back.

`hf_moe.cards` is a leaf that the converters call (it imports no converter; what only they know reaches it through
`cards.use_converters`), and no converter reaches into another's private names: what they share is public, in
`hf_moe.conversion.layout`. Read from the source (every import statement, at module level or in a function), so a
lazy import inside a function that closes a circle fails too.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_moe"
CONVERSION = sorted((PACKAGE / "conversion").glob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import statement in `path`, wherever it stands."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((module, [alias.name for alias in node.names]))
    return found


def hf_moe_modules_imported_by(path: Path) -> set[str]:
    """The hf_moe modules `path` imports (`from . import cards` counts as hf_moe.cards)."""
    modules = set()
    for module, names in imports(path):
        if module == "hf_moe" or module.startswith("hf_moe."):
            modules.add(module)
            modules.update(f"{module}.{name}" for name in names
                           if (PACKAGE.parent / module.replace(".", "/") / f"{name}.py").is_file())
    return modules


def test_cards_imports_no_converter():
    imported = hf_moe_modules_imported_by(PACKAGE / "cards.py")
    assert not [module for module in imported if module.startswith("hf_moe.conversion")], imported


def test_converter_imports_have_no_cycle():
    files = {module_name(path): path for path in [*CONVERSION, PACKAGE / "cards.py"]}
    edges = {module: {imported for imported in hf_moe_modules_imported_by(path) if imported in files}
             for module, path in files.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for imported in sorted(edges[module]):
                visit(imported, (*path, module))
            done.add(module)

    for module in sorted(files):
        visit(module, ())


@pytest.mark.parametrize("path", CONVERSION, ids=lambda path: path.name)
def test_no_converter_imports_a_private_name_of_another_module(path):
    private = [f"{module}.{name}" for module, names in imports(path) if module.startswith("hf_moe")
               for name in names if name.startswith("_")]
    assert private == [], f"{path.name} imports private names: {private} (give what modules share a public name)"


@pytest.mark.slow
def test_importing_the_cards_module_imports_no_converter():
    code = "import sys, hf_moe.cards; print(sorted(m for m in sys.modules if m.startswith('hf_moe.conversion')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == "[]"
