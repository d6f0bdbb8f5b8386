"""Memory layers mapped from a student's ``model.safetensors`` instead of read into RAM.

A student's memory layers are most of its weights (value tables of up to millions of rows)
and most of their rows are read rarely. Read into the process, they are anonymous memory:
pages the OS can only keep in RAM or move to swap, held once per process. Mapped from the
weights file, they are file-backed pages: the OS reads them on first use, drops the cold ones
under memory pressure (they are read again from the file when needed) and shares them between
every process that maps the same file. The student's memory is then mostly on disk.

The mapping is copy-on-write (``MAP_PRIVATE``): an in-place edit of a mapped tensor (the
Memory pane writes ``module.values[slot] = ...``, training updates rows) copies just the
touched pages into the process and never reaches the file. Saving writes a new file beside
the old one and renames it into place, so a mapped file is never written under its mapping.

Every float32 tensor stored as float32 with the model's shape is mapped: the memory layers,
and the weights kept from the teacher too (Hugging Face's own loader maps a teacher's
safetensors file the same way, so a student that read them into RAM would hold more
anonymous memory than its teacher). Anything else is read with plain file I/O (see
``engine.model.student``). Pass
``map_memory=False`` to ``load_student_model`` or set ``MINDSET_MAP_MEMORY=0`` to read the
memory layers into RAM as well.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from engine.errors import ModelLoadError
from engine.model.anatomy import layer_prefixes
from engine.model.surgery import memory_layers

ENV_SWITCH = "MINDSET_MAP_MEMORY"
OFF_VALUES = {"0", "false", "no", "off"}

__all__ = [
    "ENV_SWITCH",
    "is_file_backed",
    "map_float32",
    "mapped_file",
    "mapped_tensor_names",
    "mapping_enabled",
    "memory_tensor_names",
]


def mapping_enabled(map_memory: bool = True, dtype: Any = None) -> bool:
    """Whether memory layers are mapped: asked for, not switched off, and kept in float32."""
    if not map_memory:
        return False
    if os.environ.get(ENV_SWITCH, "").strip().lower() in OFF_VALUES:
        return False
    return dtype is None or dtype == torch.float32


def mapped_tensor_names(model: nn.Module) -> set[str]:
    """Every parameter and persistent buffer of a student: the memory layers and the weights
    kept from the teacher alike, so the student's anonymous memory is its working memory only
    (the teacher's loader maps its safetensors file the same way)."""
    return set(model.state_dict(keep_vars=True))


def memory_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names of every parameter and persistent buffer of the memory layers."""
    layers = memory_layers(model)
    if not layers:
        return set()
    prefixes = tuple(layer_prefixes(model, layers))
    return {name for name in model.state_dict(keep_vars=True) if name.startswith(prefixes)}


def map_float32(handle: BinaryIO, path: os.PathLike[str] | str, name: str, offset: int,
                length: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The float32 tensor ``name`` at ``offset`` of the open file, mapped copy-on-write.

    ``offset`` counts from the start of the file, ``length`` is the tensor's size in the
    header. Raises :class:`ModelLoadError` when the file is too short or the size does not
    match the shape; returns None for what is not worth mapping (an empty tensor, or one not
    4-byte aligned in a hand-made file), which the caller then reads into RAM.
    """
    count = 1
    for size in shape:
        count *= size
    if length != count * 4:
        raise ModelLoadError(f"{path} has bad offsets for tensor {name} ({length} bytes for "
                             f"float32 {list(shape)})")
    file_size = os.fstat(handle.fileno()).st_size
    if offset + length > file_size:
        raise ModelLoadError(f"{path} is truncated (tensor {name} ends at byte "
                             f"{offset + length:,}, the file has {file_size:,})")
    if count == 0 or offset % 4:
        return None
    array: Any = np.memmap(handle, mode="c", dtype=np.float32, offset=offset, shape=shape)
    return torch.from_numpy(array)


def mapped_file(tensor: torch.Tensor) -> tuple[str, int] | None:
    """``(pathname, inode)`` of the file mapping that holds ``tensor``'s data, or None.

    Read from ``/proc/self/maps`` (Linux only). The pathname is the file's path now: a file
    moved since it was mapped shows its new path, a deleted one its path without the kernel's
    `` (deleted)`` suffix.
    """
    address = tensor.data_ptr()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6:
                    continue
                low, _, high = fields[0].partition("-")
                if int(low, 16) <= address < int(high, 16):
                    pathname = fields[5].rstrip("\n").removesuffix(" (deleted)")
                    return pathname, int(fields[4])
    except (OSError, ValueError):
        return None
    return None


def is_file_backed(tensor: torch.Tensor, path: os.PathLike[str] | str) -> bool:
    """Whether ``tensor``'s data lies in a mapping of the file at ``path`` (Linux only)."""
    found = mapped_file(tensor)
    return found is not None and found[0] == os.fspath(path)
