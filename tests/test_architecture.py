"""The package's shape (docs/architecture.md): layers that import downward only, short modules and functions,
Gradio only in the UI layer. Read from the source with ``ast``, so a new upward import or a 120-line function
fails here, not in a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "infinite_id"
BASE = {"config", "images", "_lazy"}
# What each part of the package may import from the rest of it. Anything else is an upward or sideways import.
ALLOWED = {
    "_lazy": set(),
    "config": set(),
    "images": {"config"},
    "method": BASE,
    "faces": BASE,
    "adapters": BASE | {"method"},
    "testing": BASE | {"method", "faces"},
    "models": BASE | {"method", "adapters", "faces", "testing"},
    "service": BASE | {"method", "models", "faces"},
    "training": BASE | {"method", "models", "faces", "testing"},
    "evaluation": BASE | {"method", "models", "faces", "service", "testing"},
    "ui": BASE | {"models", "faces", "service"},
    "cli": BASE | {"models", "service"},
    "__main__": set(),
    "__init__": {"_lazy"},
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "fixtures" not in p.parts)


def part_of(path: Path) -> str:
    """The layer a module belongs to: its subpackage, or its own name for a top-level module."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(path: Path) -> set[str]:
    """The parts of the package a module imports, at any depth (function-level imports count too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = path.relative_to(PACKAGE).parts[:-1]  # the module's package, relative to infinite_id
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb from the module's package
                base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [target + [alias.name] for alias in node.names]
            elif node.module and node.module.split(".")[0] == "infinite_id":
                names = [node.module.split(".")[1:]]
            else:
                continue
            parts.update(n[0] for n in names if n)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "infinite_id" and "." in alias.name:
                    parts.add(alias.name.split(".")[1])
    return parts


def test_the_package_has_its_layers():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert {"method", "adapters", "faces", "models", "service", "training", "evaluation"} <= subpackages
    for name in subpackages:
        text = (PACKAGE / name / "__init__.py").read_text(encoding="utf-8")
        assert "__all__" in text, f"infinite_id/{name}/__init__.py must name its public API"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_downward_only(path):
    part = part_of(path)
    allowed = ALLOWED[part] | {part}
    wrong = imported_parts(path) - allowed
    assert not wrong, f"{path.relative_to(ROOT)} ({part}) imports {sorted(wrong)}; allowed: {sorted(allowed)}"


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a method module importing the service layer is caught, relative or absolute."""
    bad = PACKAGE / "method" / "_probe_upward.py"
    for source in ("from ..service import runner\n", "from infinite_id.ui import demo\n"):
        bad.write_text(source, encoding="utf-8")
        try:
            assert imported_parts(bad) - ALLOWED["method"]
        finally:
            bad.unlink()


@pytest.mark.parametrize("path", [*sources(), ROOT / "app.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_short(path):
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines; split it by what it owns"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} is {length} lines"


def test_gradio_stays_in_the_ui_layer():
    for path in sources():
        if part_of(path) == "ui":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert "gradio" not in names, f"{path.relative_to(ROOT)} imports gradio; only infinite_id/ui may"


def test_app_py_is_only_the_composition_root():
    lines = (ROOT / "app.py").read_text(encoding="utf-8").count("\n")
    assert lines < 200, f"app.py has {lines} lines; layout and handlers belong in infinite_id/ui"


def test_no_private_gradio_queue_internals_anywhere():
    """The per-session cap uses documented surfaces only; Gradio's private queue changes between releases."""
    forbidden = ("._queue", "pending_event_ids_session", "event_ids_to_events")
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".sh") and ".venv" not in p.parts
             and ".git" not in p.parts and p.name != "test_architecture.py"]
    found = [(p.relative_to(ROOT), word) for p in files for word in forbidden
             if word in p.read_text(encoding="utf-8", errors="ignore")]
    assert not found, found


@pytest.mark.parametrize("package", ["infinite_id", *(f"infinite_id.{p.name}" for p in sorted(PACKAGE.iterdir())
                                                      if (p / "__init__.py").exists())])
def test_every_public_name_resolves(package):
    """Each name a package lists in ``__all__`` (a lazy map written by hand) imports, from the module the map says:
    a misspelt name or a moved function fails here, not on a user's first import."""
    import importlib

    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ lists names it cannot give: {missing}"


@pytest.mark.parametrize("package", [PACKAGE, *(p for p in sorted(PACKAGE.iterdir()) if (p / "__init__.py").exists())],
                         ids=lambda p: p.name)
def test_no_public_name_is_also_a_module_name(package):
    """A module named like one of its package's lazy exports hides the export: importing the module sets that
    package attribute, so ``from infinite_id.models import fetch`` would give a function before and a module after
    (a split of models/hub.py once named its new module ``fetch.py`` and tripped on this)."""
    import importlib

    name = ".".join(package.relative_to(PACKAGE.parent).parts)
    exports = set(importlib.import_module(name).__all__)
    modules = {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    assert not exports & modules, f"{name}: {sorted(exports & modules)} name both"
