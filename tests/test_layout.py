"""The house rules of lora_null_core's layout (docs/layout.md), checked on the source: each folder imports only from
the folders before it and from the top-level modules, which import no folder; no module is over 300 lines; the
plugins import only `lora_null_core` and `lora_null_core.frontends`."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "lora_null_core"
ORDER = ["calibration", "init", "io", "meter", "frontends"]  # a folder may import the ones before it


def imported_modules(source: str, module: str) -> set[str]:
    """Every lora_null_core module `source` (the text of `module`, a dotted name) imports."""
    package = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(part for part in (base, node.module) if part)
            if node.module is None:  # from . import phases: the names are modules
                found.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("lora_null_core")}


def folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in ORDER else None


def back_arrows(source: str, module: str) -> list[str]:
    """What `module` imports from a folder it may not: a later one, or any folder from a top-level module."""
    own = folder_of(module)
    allowed = set(ORDER[: ORDER.index(own) + 1]) if own else set()
    return sorted(m for m in imported_modules(source, module) if folder_of(m) and folder_of(m) not in allowed)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


CORE_FILES = sorted(p for p in CORE.rglob("*.py") if p != CORE / "__init__.py")  # the public API gathers from all


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_imports_point_down_the_pipeline(path):
    wrong = back_arrows(path.read_text(), module_name(path))
    assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}: a folder imports only the folders before it"


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(CORE)))
def test_no_module_is_over_300_lines(path):
    assert len(path.read_text().splitlines()) <= 300, path


def test_plugins_import_only_the_core_and_its_front_ends():
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        imported = imported_modules(path.read_text(), module_name(path))
        wrong = sorted(m for m in imported if m not in ("lora_null_core", "lora_null_core.frontends"))
        assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def test_the_check_catches_back_arrows():
    assert back_arrows("from ..frontends.cli import main\n", "lora_null_core.init.loop") == [
        "lora_null_core.frontends.cli"
    ]
    assert back_arrows("from .init import phases\n", "lora_null_core.weights") == ["lora_null_core.init"]
    assert back_arrows("from ..calibration.taps import x\nfrom . import phases\n", "lora_null_core.init.loop") == []
