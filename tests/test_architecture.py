"""Layering rules: the engine is headless and never imports Textual; the workbench reaches
the engine only through its facade, services and view types."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

ENGINE = REPO_ROOT / "engine"
FORBIDDEN = ("textual", "textual_plotext", "textual_serve", "mindset")
TUI = [REPO_ROOT / "mindset" / "app.py", REPO_ROOT / "mindset" / "protocols.py",
       *sorted((REPO_ROOT / "mindset" / "widgets").rglob("*.py")),
       *sorted((REPO_ROOT / "mindset" / "screens").rglob("*.py"))]
TUI_MAY_IMPORT = ("engine.facade", "engine.services", "engine.views", "engine.errors")


def imported_modules(file: Path) -> set[str]:
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_engine_source_imports_textual_or_the_app() -> None:
    offenders = []
    for file in sorted(ENGINE.rglob("*.py")):
        for name in imported_modules(file):
            if name.split(".")[0] in FORBIDDEN:
                offenders.append(f"{file.relative_to(REPO_ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_importing_every_engine_module_loads_no_textual() -> None:
    modules = sorted(
        ".".join(file.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        for file in ENGINE.rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'mindset'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"engine pulled in: {result.stdout.strip()}"


def test_the_checker_would_catch_an_offender(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from textual.app import App\nimport textual.widgets as w\n")
    assert {"textual.app", "textual.widgets"} <= imported_modules(bad)


def test_the_workbench_reaches_the_engine_through_its_facade() -> None:
    offenders = []
    for file in TUI:
        for name in imported_modules(file):
            if name.split(".")[0] == "engine" and not any(
                name == allowed or name.startswith(f"{allowed}.") for allowed in TUI_MAY_IMPORT
            ):
                offenders.append(f"{file.relative_to(REPO_ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_palette_does_not_import_the_app() -> None:
    commands = REPO_ROOT / "mindset" / "widgets" / "commands.py"
    assert "mindset.app" not in imported_modules(commands)


def test_the_facade_and_its_services_import_nothing_heavy() -> None:
    """The workbench's first frame imports the facade: the heavy libraries wait for use."""
    code = (
        "import sys, engine.facade, engine.services.memory, engine.services.chat, "
        "engine.services.jobs\n"
        "heavy = ('torch', 'transformers', 'sqlalchemy', 'textual', 'numpy')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
