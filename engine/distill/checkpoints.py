"""Atomic checkpoints of a distillation run.

A checkpoint holds the trainable weights (the replaced layers), the entries of memories that
keep them outside their weights (associative: keys, values and LRFU statistics, as tensors),
the optimizer state, the step (which fixes the data cursor: the data order is a pure function
of the seed and the step) and the random generators' states, so a resumed run continues
exactly where the saved one stood. The file is written atomically (see
:mod:`engine.distill.atomic`), so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.distill.atomic import atomic_write
from engine.errors import MindsetError

CHECKPOINT_NAME = "checkpoint.pt"
ENTRIES_KEY = "memory_entries"  # {layer: {name: tensor}} from each memory's export_entries()
LEGACY_TABLES_KEY = "tables"  # older checkpoints: the memories' SQLite files, as bytes


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


def trainable_state(student: nn.Module, prefixes: list[str]) -> dict[str, torch.Tensor]:
    """The weights under ``prefixes`` (the replaced layers), copied to the CPU."""
    return {name: tensor.detach().cpu().clone()
            for name, tensor in student.state_dict().items()
            if name.startswith(tuple(prefixes))}


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of the weights, to compare ranks (or runs) without shipping tensors."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def memory_entries(memories: dict[int, nn.Module]) -> dict[int, dict[str, torch.Tensor]]:
    """The run-time entries of the memories that keep some outside their weights."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for layer, memory in memories.items():
        export = getattr(memory, "export_entries", None)
        if export is not None:
            out[layer] = export()
    return out


def restore_memory_entries(memories: dict[int, nn.Module], state: dict[str, Any]) -> None:
    """Put a checkpoint's memory entries back (its own tensors, or an older checkpoint's
    SQLite tables)."""
    if ENTRIES_KEY in state:
        entries: dict[int, dict[str, torch.Tensor]] = state[ENTRIES_KEY]
        for layer, memory in memories.items():
            load = getattr(memory, "load_entries", None)
            if load is not None and layer in entries:
                load(entries[layer])
        return
    _restore_legacy_tables(memories, state.get(LEGACY_TABLES_KEY, {}))


def _restore_legacy_tables(memories: dict[int, nn.Module], files: dict[str, bytes]) -> None:
    """Checkpoints written before the entries travelled as tensors carried the memories'
    store files; load them the way those runs saved them."""
    with tempfile.TemporaryDirectory(prefix="mindset-tables-") as temp:
        root = Path(temp)
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        for layer, memory in memories.items():
            load_tables = getattr(memory, "load_tables", None)
            if load_tables is not None:
                load_tables(root / f"layer{layer}", f"layer{layer}")


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
