"""The workbench's part of the user's TOML config file (``engine.paths.config_path()``).

Two tables belong to the workbench::

    [workbench]
    theme = "mindset-dusk"

    [keys]            # binding id = key(s), comma separated
    "tab.memory" = "f2"
    "memory.delete" = "x,delete"

Other tables (the LLM adapters' settings, for instance) are left untouched, comments and all:
the file is read and written with tomlkit, which preserves what it does not change.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomlkit

from engine.config_file import read_config_file
from engine.errors import InputError
from engine.paths import config_path, data_dir


def screenshot_dir() -> Path:
    """Where screenshots are saved: ~/Downloads if there is one, else the data directory."""
    downloads = Path.home() / "Downloads"
    if downloads.is_dir():
        return downloads
    target = data_dir() / "screenshots"
    target.mkdir(parents=True, exist_ok=True)
    return target


@dataclass
class WorkbenchConfig:
    """What the workbench reads from the config file."""

    theme: str | None = None
    keymap: dict[str, str] = field(default_factory=dict)


def load_config(path: Path | None = None) -> WorkbenchConfig:
    """Read the workbench settings; a missing file gives the defaults."""
    path = path or config_path()
    document = read_config_file(path)
    workbench = document.get("workbench", {})
    keys = document.get("keys", {})
    if not isinstance(workbench, dict) or not isinstance(keys, dict):
        raise InputError(f"{path}: [workbench] and [keys] must be tables")
    theme = workbench.get("theme")
    keymap: dict[str, str] = {}
    for binding_id, key in keys.items():
        if not isinstance(key, str) or not key.strip():
            raise InputError(
                f"{path}: [keys] {binding_id!r} must be a key string such as \"ctrl+e\""
            )
        keymap[str(binding_id)] = key.strip()
    return WorkbenchConfig(theme=str(theme) if isinstance(theme, str) else None, keymap=keymap)


def save_theme(theme: str, path: Path | None = None) -> None:
    """Remember the chosen theme, keeping every other setting in the file as it was."""
    path = path or config_path()
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        document = tomlkit.parse(text)
    except Exception as exc:  # tomlkit raises its own ParseError family
        raise InputError(f"{path} is not valid TOML ({exc}); fix or delete it") from exc
    workbench = document.get("workbench")
    if workbench is None:
        workbench = tomlkit.table()
        document["workbench"] = workbench
    workbench["theme"] = theme
    temporary = path.with_suffix(".toml.tmp")
    temporary.write_text(tomlkit.dumps(document), encoding="utf-8")
    temporary.replace(path)


THEME_FIELDS = (
    "name", "primary", "secondary", "warning", "error", "success", "accent", "foreground",
    "background", "surface", "panel", "boost", "dark", "luminosity_spread", "text_alpha",
    "variables",
)


def themes_dir() -> Path:
    """The ``themes/`` folder shipped beside the packages."""
    return Path(__file__).resolve().parent.parent / "themes"


def read_theme_files(directory: Path | None = None) -> list[dict[str, object]]:
    """Theme definitions from ``*.toml`` files; a broken file is skipped, not fatal."""
    directory = directory or themes_dir()
    definitions: list[dict[str, object]] = []
    for theme_file in sorted(directory.glob("*.toml")):
        try:
            data = tomllib.loads(theme_file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
            continue
        if isinstance(data.get("name"), str) and isinstance(data.get("primary"), str):
            definitions.append({k: v for k, v in data.items() if k in THEME_FIELDS})
    return definitions
