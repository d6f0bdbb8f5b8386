"""Training data for distillation: text files or folders, or a corpus sampled from the teacher.

Text is tokenised with the teacher's tokenizer, the files are joined (an end-of-text token
between them) into one token stream, and the stream is split by position: the first part trains,
the last ``heldout_fraction`` is held out. Both parts are packed into blocks of ``block_size``
tokens. Tokenised streams are cached in the data directory, keyed by the files' content hash
and the tokenizer, so a second run on the same text skips tokenisation.

The order of training blocks is a pure function of the seed and the step (a fresh permutation
per epoch), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import InputError


@dataclass
class TokenData:
    """Packed training and held-out blocks, each a [blocks, block_size] long tensor."""

    train: torch.Tensor
    heldout: torch.Tensor
    source: str

    @property
    def block_size(self) -> int:
        return int(self.train.shape[1])


def collect_files(paths: list[str]) -> list[Path]:
    """The files named, and every non-hidden file under the folders named, in a stable order."""
    if not paths:
        raise InputError("no data given; give text files or folders, or none for data-free")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputError(f"{path}: no such file or folder; give UTF-8 text files or folders")
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise InputError(f"{path} is an empty folder; put UTF-8 text files in it")
            files.extend(found)
        elif not path.is_file():  # a device or a pipe (/dev/zero) would be read forever
            raise InputError(f"{path} is not a regular file; give UTF-8 text files or folders")
        else:
            files.append(path)
    return files


def read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8 "
            "or leave it out"
        ) from exc


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would split text differently."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    digest.update(str(tokenizer.eos_token_id).encode())
    return digest.hexdigest()[:16]


def separator_id(tokenizer: Any) -> int | None:
    for name in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def token_stream(paths: list[str], tokenizer: Any, cache_dir: Path | None) -> np.ndarray:
    """All files tokenised and joined into one stream (cached by content and tokenizer)."""
    files = collect_files(paths)
    texts: list[str] = []
    digest = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for file in files:
        text = read_utf8(file)
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        texts.append(text)
    if not any(text.strip() for text in texts):
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise InputError(f"no text in {names}; give files with some text in them")
    cache_file = cache_dir / f"{digest.hexdigest()[:32]}.npy" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        try:
            cached: np.ndarray = np.load(cache_file, allow_pickle=False)
            return cached
        except (OSError, ValueError):
            cache_file.unlink(missing_ok=True)  # a damaged cache entry: tokenise again
    separator = separator_id(tokenizer)
    ids: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        if ids and separator is not None:
            ids.append(separator)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    stream = np.asarray(ids, dtype=np.int64)
    if cache_file is not None:
        from engine.atomic import atomic_write

        atomic_write(cache_file, lambda handle: np.save(handle, stream))
    return stream


def pack(ids: np.ndarray, block_size: int) -> torch.Tensor:
    """Non-overlapping blocks of ``block_size`` tokens; a shorter tail is dropped."""
    count = len(ids) // block_size
    return torch.from_numpy(ids[: count * block_size].copy()).view(count, block_size)


def split_blocks(
    stream: np.ndarray, block_size: int, heldout_fraction: float, source: str
) -> TokenData:
    cut = int(len(stream) * (1.0 - heldout_fraction))
    train, heldout = pack(stream[:cut], block_size), pack(stream[cut:], block_size)
    if len(train) == 0 or len(heldout) == 0:
        needed = int(np.ceil(block_size / min(heldout_fraction, 1 - heldout_fraction)))
        raise InputError(
            f"{source} has only {len(stream)} tokens; with block size {block_size} and "
            f"{heldout_fraction:.0%} held out it needs at least about {needed}: give more text "
            "or a smaller block size"
        )
    return TokenData(train=train, heldout=heldout, source=source)


def load_text_data(
    paths: list[str], tokenizer: Any, *, block_size: int, heldout_fraction: float,
    cache_dir: Path | None,
) -> TokenData:
    stream = token_stream(paths, tokenizer, cache_dir)
    return split_blocks(stream, block_size, heldout_fraction, ", ".join(paths))


def sample_corpus(
    model: Any, tokenizer: Any, *, blocks: int, block_size: int, seed: int, batch: int = 8,
    on_blocks: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Data-free distillation: ``blocks`` sequences sampled from the teacher itself;
    ``on_blocks(count)`` after each batch (progress, and the chance to stop)."""
    start = separator_id(tokenizer)
    if start is None:
        start = 0
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    out: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            remaining = blocks
            while remaining > 0:
                size = min(batch, remaining)
                prompt = torch.full((size, 1), start, dtype=torch.long)
                sampled = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                    max_new_tokens=block_size - 1, min_new_tokens=block_size - 1,
                    top_k=0, top_p=1.0, temperature=1.0, pad_token_id=start,
                )
                out.append(sampled[:, :block_size].clone())
                remaining -= size
                if on_blocks is not None:
                    on_blocks(size)
    finally:
        torch.set_rng_state(generator_state)
    return torch.cat(out)


def data_free(
    model: Any, tokenizer: Any, *, blocks: int, heldout_blocks: int, block_size: int, seed: int,
    on_blocks: Callable[[int], None] | None = None,
) -> TokenData:
    train = sample_corpus(model, tokenizer, blocks=blocks, block_size=block_size, seed=seed,
                          on_blocks=on_blocks)
    heldout = sample_corpus(
        model, tokenizer, blocks=heldout_blocks, block_size=block_size, seed=seed + 7919,
        on_blocks=on_blocks,
    )
    return TokenData(train=train, heldout=heldout, source="sampled from the teacher")


class BlockOrder:
    """Which training blocks each step uses: a fresh seeded permutation per epoch.

    Global sample ``i`` of the run is block ``perm(epoch)[i % n]`` with ``epoch = i // n``; step
    ``s`` on rank ``r`` of ``world`` processes takes samples ``(s * world + r) * batch`` onwards,
    so the order depends only on the seed, the step and the layout, never on history.
    """

    def __init__(self, num_blocks: int, batch_size: int, seed: int, *, rank: int = 0,
                 world: int = 1) -> None:
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_blocks, generator=generator)}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        first = (step * self.world + self.rank) * self.batch_size
        out = []
        for sample in range(first, first + self.batch_size):
            epoch, position = divmod(sample, self.num_blocks)
            out.append(int(self.permutation(epoch)[position]))
        return out

    def batch(self, blocks: torch.Tensor, step: int) -> torch.Tensor:
        return blocks[self.indices(step)]


def check_text_paths(paths: list[str]) -> None:
    """Fail fast, before any model is loaded, on missing, empty or non-UTF-8 data."""
    files = collect_files(paths)
    if not any(read_utf8(file).strip() for file in files):
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise InputError(f"no text in {names}; give files with some text in them")
