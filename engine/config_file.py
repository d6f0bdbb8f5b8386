"""Reading the user's TOML config file (``engine.paths.config_path()``).

Shared by every part that keeps settings there: the LLM adapters' ``[llm]`` table and the
workbench's ``[workbench]`` and ``[keys]`` tables."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from engine.errors import InputError


def read_config_file(path: Path) -> dict[str, Any]:
    """The parsed file; ``{}`` when it does not exist; a one-line error when it is not TOML."""
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid TOML ({exc}); fix or remove it") from exc
