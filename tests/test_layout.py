"""Code layout rules that keep the tree easy to pick up: small modules, no empty packages,
and the import-linter contracts in pyproject.toml (the layers) hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SOURCE_ROOTS = ("engine", "mindset")
MAX_MODULE_LINES = 500


def source_files() -> list[Path]:
    return sorted(p for root in SOURCE_ROOTS for p in (REPO_ROOT / root).rglob("*.py"))


def test_no_module_is_over_the_size_limit() -> None:
    too_long = []
    for file in source_files():
        lines = len(file.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{file.relative_to(REPO_ROOT)}: {lines} lines")
    assert not too_long, f"split these modules (limit {MAX_MODULE_LINES} lines):\n" + "\n".join(
        too_long
    )


def test_no_package_is_empty() -> None:
    empty = []
    for init in (REPO_ROOT / root for root in SOURCE_ROOTS):
        for package in [init, *(p for p in init.rglob("*") if p.is_dir())]:
            if not (package / "__init__.py").is_file():
                continue
            modules = [p for p in package.iterdir() if p.name != "__init__.py"
                       and (p.suffix == ".py" or (p / "__init__.py").is_file())]
            if not modules:
                empty.append(str(package.relative_to(REPO_ROOT)))
    assert not empty, "packages with no modules: " + ", ".join(empty)


def test_import_contracts_hold() -> None:
    linter = Path(sys.executable).with_name("lint-imports")
    command = str(linter) if linter.exists() else shutil.which("lint-imports")
    if command is None:
        pytest.fail("lint-imports is missing: install the dev extras (make setup)")
    result = subprocess.run([command, "--no-cache"], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
