"""Atomic checkpoints of a distillation run.

A checkpoint holds the trainable weights (the replaced layers), the optimizer state, the step
(which fixes the data cursor: the data order is a pure function of the seed and the step) and
the random generators' states, so a resumed run continues exactly where the saved one stood.
Every write goes to a temporary file in the same directory and is moved into place with
``os.replace``, so a crash (or ``kill -9``) mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import MindsetError

CHECKPOINT_NAME = "checkpoint.pt"


def atomic_write(path: Path, write: Callable[[Any], None], *, binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mode = "wb" if binary else "w"
        encoding = None if binary else "utf-8"
        with os.fdopen(handle, mode, encoding=encoding) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text), binary=False)


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (weights, optimizer, step, RNG, counters) atomically into ``run_dir``."""
    path = run_dir / CHECKPOINT_NAME
    atomic_write(path, lambda file: torch.save(state, file))
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint of the run, or None when it has none yet."""
    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise MindsetError(
            f"{path} is unreadable ({type(exc).__name__}); delete it to restart the run from step 0"
        ) from exc
    return state
