"""A cache of data-free corpora, so the same teacher is not asked to write the same text twice.

Sampling the teacher's own training text is the slowest part of a short data-free run (the
quick start spends most of its first minute on it). The sample is a pure function of the
teacher's weights, the tokenizer's start token, the block counts and size, the seed and the
sampler, so it is kept under ``<data dir>/cache/data_free/`` by a key of all of them and read
back, without unpickling, by the next run that asks for the same corpus. The teacher part of
the key is a fingerprint of its weights (names, shapes and a strided sample of values), so an
edited or reshaped teacher never reuses another's text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from engine.atomic import atomic_write, read_regular
from engine.errors import MindsetError

CACHE_SUBDIR = ("cache", "data_free")
SAMPLES_PER_TENSOR = 256  # values of each weight tensor that go into the fingerprint
MAX_DATA_FREE_BYTES = 1 << 34
SAMPLER_VERSION = "v2"  # bump when the sampling procedure changes what a seed produces


def teacher_fingerprint(model: Any) -> str:
    """A short hash of ``model``'s weights: every tensor's name and shape, and a strided
    sample of its values (enough to tell any two models apart in practice, in milliseconds)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            sample = flat[::stride][:SAMPLES_PER_TENSOR].to(torch.float64).cpu()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def corpus_key(model: Any, *, start_token: int, blocks: int, heldout_blocks: int,
               block_size: int, seed: int, batch: int) -> str:
    """The cache key of one data-free corpus (see the module docstring)."""
    parts = {"teacher": teacher_fingerprint(model), "start": start_token, "blocks": blocks,
             "heldout": heldout_blocks, "block_size": block_size, "seed": seed,
             "batch": batch, "sampler": SAMPLER_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    from engine.paths import data_dir

    return data_dir().joinpath(*CACHE_SUBDIR) / f"{key}.safetensors"


def read_cached(key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached training and held-out blocks under ``key``; None when there are none, or
    when the cached file is unreadable (it is removed, and the corpus is sampled again)."""
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        return load_data_free(path)
    except MindsetError:
        path.unlink(missing_ok=True)
        return None


def save_blocks(path: Path, train: torch.Tensor, heldout: torch.Tensor) -> None:
    """Write training and held-out token blocks as safetensors, atomically (a crash leaves no
    half file); :func:`load_data_free` reads them back."""
    from safetensors.torch import save

    blocks = {"train": train.cpu().contiguous(), "heldout": heldout.cpu().contiguous()}
    atomic_write(path, lambda f: f.write(save(blocks)))


def write_cached(key: str, train: torch.Tensor, heldout: torch.Tensor) -> None:
    """Keep a sampled corpus under ``key``."""
    # A read-only or full data directory costs the next run a re-sample, nothing more.
    with contextlib.suppress(OSError):
        save_blocks(cache_path(key), train, heldout)


def cached_corpus_exists(key: str) -> bool:
    return cache_path(key).is_file()


def load_data_free(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and held-out blocks a data-free run sampled (safetensors, never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        saved = load(read_regular(path, MAX_DATA_FREE_BYTES))
        train, heldout = saved["train"], saved["heldout"]
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise MindsetError(f"{path} is unreadable ({exc}); delete it to sample the corpus "
                           "again") from None
    for blocks in (train, heldout):
        if blocks.dtype != torch.int64 or blocks.dim() != 2:
            raise MindsetError(f"{path} does not hold token blocks; delete it to sample the "
                               "corpus again")
    return train, heldout
