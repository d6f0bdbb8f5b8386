"""Atomic checkpoints of a distillation run, in safetensors and JSON only: nothing unpickled.

A checkpoint is a pair of files in the run directory:

* ``checkpoint-<digest>.safetensors``: every tensor: the trainable weights (the replaced
  layers, ``weights/<name>``), the entries of memories that keep them outside their weights
  (associative: keys, values and LRFU statistics, ``entries/<layer>/<name>``), the optimizer
  state tensors (``optimizers/<i>/<param>/<key>``) and torch's RNG state (``rng/torch``);
* ``checkpoint.json`` (the manifest, written last): the format version, the tensor file's
  name, size and SHA-256, the step (which fixes the data cursor: the data order is a pure
  function of the seed and the step), the run's settings, counters, the optimizers'
  parameter groups and non-tensor state (SparseAdam's step counts) and numpy's and Python's
  RNG states.

The tensor file is named by its digest and written (temp file, fsync, rename) before the
manifest that names it, and older tensor files are removed only after, so a crash at any
point leaves the previous checkpoint whole. A manifest whose tensor file is missing or has
another digest is refused, as is one from a newer format. A ``checkpoint.pt`` (the pickles
older Mindsets wrote) is never opened: :func:`check_checkpoint` refuses the run with
:data:`LEGACY_MESSAGE`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.atomic import atomic_write_text, fsync_dir, read_json, read_regular
from engine.errors import MindsetError

CHECKPOINT_NAME = "checkpoint.json"  # the manifest; names the tensor file
LEGACY_NAME = "checkpoint.pt"  # older Mindsets' pickles: never opened
FORMAT = "mindset-distill-checkpoint"
FORMAT_VERSION = 1
ENTRIES_KEY = "memory_entries"  # {layer: {name: tensor}} from each memory's export_entries()
TENSORS_PATTERN = re.compile(r"checkpoint-[0-9a-f]{16}\.safetensors")
MANIFEST_BYTES = 64 * 1024 * 1024
MAX_TENSOR_BYTES = 1 << 40
LEGACY_MESSAGE = (
    "this run's checkpoint.pt is from an older Mindset and is a pickle, which Mindset no "
    "longer opens (it could run code); start the run again in a new directory, or delete "
    "{path} to restart this one from step 0"
)


class CheckpointError(MindsetError):
    """A checkpoint that cannot be used: legacy, damaged, mismatched or from a newer Mindset."""


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


def restore_memory_entries(memories: dict[int, nn.Module],
                           entries: dict[int, dict[str, torch.Tensor]]) -> None:
    """Put a checkpoint's memory entries back."""
    for layer, memory in memories.items():
        load = getattr(memory, "load_entries", None)
        if load is not None and layer in entries:
            load(entries[layer])


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run directory holds a checkpoint (of this format or an older one)."""
    return (run_dir / CHECKPOINT_NAME).exists() or (run_dir / LEGACY_NAME).exists()


# -- writing --------------------------------------------------------------------------------

def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON (tuples become lists); anything else is a bug, not a format."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} cannot be checkpointed as JSON")


def _flatten(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint state split into its tensors (by name) and its JSON manifest body."""
    tensors: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        tensors[name] = tensor.detach().cpu().contiguous().clone()

    for name, tensor in state["weights"].items():
        put(f"weights/{name}", tensor)
    for layer, entries in state.get(ENTRIES_KEY, {}).items():
        for name, tensor in entries.items():
            put(f"entries/{int(layer)}/{name}", tensor)
    optimizers = []
    for index, optimizer in enumerate(state["optimizers"]):
        scalars: dict[str, dict[str, Any]] = {}
        for param, values in optimizer["state"].items():
            scalars[str(int(param))] = {}
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    put(f"optimizers/{index}/{int(param)}/{key}", value)
                else:
                    scalars[str(int(param))][key] = _plain(value, f"optimizer state {key}")
        optimizers.append({"param_groups": _plain(optimizer["param_groups"], "param_groups"),
                           "state": scalars})
    rng = state["rng"]
    put("rng/torch", rng["torch"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    body = {key: _plain(value, key) for key, value in state.items()
            if key not in ("weights", ENTRIES_KEY, "optimizers", "rng")}
    body["optimizers"] = optimizers
    body["rng"] = {"numpy": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss),
                             float(cached)],
                   "python": _plain(rng["python"], "python rng")}
    return tensors, body


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (weights, entries, optimizers, step, RNG, counters) atomically into
    ``run_dir``; returns the manifest's path."""
    from safetensors.torch import save_file

    tensors, body = _flatten(state)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=run_dir)
    os.close(handle)
    temp = Path(temp_name)
    try:
        save_file(tensors, str(temp))
        with temp.open("rb+") as file:
            os.fsync(file.fileno())
        digest = _sha256_file(temp)
        name = f"checkpoint-{digest[:16]}.safetensors"
        size = temp.stat().st_size
        os.replace(temp, run_dir / name)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(run_dir)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "tensors": name,
                "tensors_bytes": size, "tensors_sha256": digest, **body}
    atomic_write_text(run_dir / CHECKPOINT_NAME, json.dumps(manifest) + "\n")
    for old in run_dir.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return run_dir / CHECKPOINT_NAME


# -- reading --------------------------------------------------------------------------------

def _damaged(run_dir: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"the checkpoint in {run_dir} is damaged ({why}); delete {run_dir / CHECKPOINT_NAME} "
        "to restart the run from step 0"
    )


def check_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The run's checkpoint manifest, checked without reading the tensors; None when the run
    has no checkpoint yet. Raises :class:`CheckpointError` (one line) for a legacy pickle, a
    damaged or newer manifest, or a tensor file that is missing or of the wrong size."""
    legacy = run_dir / LEGACY_NAME
    if legacy.exists() or legacy.is_symlink():
        raise CheckpointError(f"{run_dir}: " + LEGACY_MESSAGE.format(path=legacy))
    try:
        manifest = read_json(run_dir / CHECKPOINT_NAME, MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise _damaged(run_dir, f"{CHECKPOINT_NAME}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _damaged(run_dir, f"{CHECKPOINT_NAME} is not a Mindset checkpoint manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _damaged(run_dir, f"{CHECKPOINT_NAME} has no valid format version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"the checkpoint in {run_dir} was written by a newer Mindset (format {version}; "
            f"this one reads {FORMAT_VERSION}); resume it with that version")
    name, size, digest = (manifest.get("tensors"), manifest.get("tensors_bytes"),
                          manifest.get("tensors_sha256"))
    if not (isinstance(name, str) and TENSORS_PATTERN.fullmatch(name)
            and isinstance(size, int) and 0 < size <= MAX_TENSOR_BYTES
            and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)
            and name == f"checkpoint-{digest[:16]}.safetensors"):
        raise _damaged(run_dir, f"{CHECKPOINT_NAME} does not name its tensor file properly")
    path = run_dir / name
    if not path.is_file() or path.is_symlink():
        raise _damaged(run_dir, f"its tensor file {name} is missing")
    if path.stat().st_size != size:
        raise _damaged(run_dir, f"{name} is {path.stat().st_size} bytes, not {size}")
    for key in ("step", "tokens_seen"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _damaged(run_dir, f"{CHECKPOINT_NAME} has no valid {key}")
    if not isinstance(manifest.get("cpu_seconds"), int | float):
        raise _damaged(run_dir, f"{CHECKPOINT_NAME} has no valid cpu_seconds")
    return manifest


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint of the run, as :func:`save_checkpoint` was given it; None when the
    run has none yet. Raises :class:`CheckpointError` when it cannot be used."""
    manifest = check_checkpoint(run_dir)
    if manifest is None:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load

    name = manifest["tensors"]
    try:
        data = read_regular(run_dir / name, manifest["tensors_bytes"])
    except OSError as exc:
        raise _damaged(run_dir, f"{name}: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != manifest["tensors_sha256"]:
        raise _damaged(run_dir, f"{name} does not match the digest in {CHECKPOINT_NAME}; "
                       "the pair was mixed up or changed")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _damaged(run_dir, f"{name} is not a readable safetensors file: "
                       f"{' '.join(str(exc).split())[:200]}") from None
    try:
        return _unflatten(manifest, tensors)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError,
            OverflowError) as exc:
        raise _damaged(run_dir, f"its contents are incomplete ({type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:200]})") from None


def _unflatten(manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The state :func:`save_checkpoint` was given, from the manifest and the tensors."""
    weights: dict[str, torch.Tensor] = {}
    entries: dict[int, dict[str, torch.Tensor]] = {}
    optimizer_tensors: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for full, tensor in tensors.items():
        kind, _, rest = full.partition("/")
        if kind == "weights":
            weights[rest] = tensor
        elif kind == "entries":
            layer, _, name = rest.partition("/")
            entries.setdefault(int(layer), {})[name] = tensor
        elif kind == "optimizers":
            which, param, key = rest.split("/", 2)
            optimizer_tensors.setdefault((int(which), int(param)), {})[key] = tensor
    optimizers = []
    for index, saved in enumerate(manifest["optimizers"]):
        groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v)
                   for k, v in group.items()} for group in saved["param_groups"]]
        state: dict[int, dict[str, Any]] = {}
        for param, scalars in saved["state"].items():
            state[int(param)] = {**scalars, **optimizer_tensors.pop((index, int(param)), {})}
        optimizers.append({"state": state, "param_groups": groups})
    if optimizer_tensors:
        raise KeyError(f"optimizer tensors without a state: {sorted(optimizer_tensors)[:3]}")
    kind, keys, pos, has_gauss, cached = manifest["rng"]["numpy"]
    version, internal, gauss = manifest["rng"]["python"]
    rng = {"torch": tensors["rng/torch"],
           "numpy": (str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                     float(cached)),
           "python": (int(version), tuple(int(v) for v in internal),
                      None if gauss is None else float(gauss))}
    reserved = {"format", "version", "tensors", "tensors_bytes", "tensors_sha256",
                "optimizers", "rng"}
    out = {key: value for key, value in manifest.items() if key not in reserved}
    out.update({"weights": weights, ENTRIES_KEY: entries, "optimizers": optimizers,
                "rng": rng})
    return out
