"""Shared test set-up.

Every test session gets its own data directory, so tests never touch a user's models,
databases or runs. The default model is converted into it once per session (slow tests only).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before any engine module computes a path.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="mindset-test-home-"))
os.environ["MINDSET_HOME"] = str(_SESSION_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def session_home() -> Path:
    return _SESSION_HOME


@pytest.fixture(scope="session")
def default_model_dir(session_home: Path) -> Path:
    """The default model converted to safetensors in the session's data directory."""
    from engine.model.default_model import ensure_converted

    return ensure_converted()


@pytest.fixture(scope="session")
def default_model(default_model_dir: Path):  # type: ignore[no-untyped-def]
    from engine.model.loading import load_model

    return load_model("default")
