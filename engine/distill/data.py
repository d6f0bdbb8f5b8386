"""Training data for distillation: text files or folders, or a corpus sampled from the teacher.

Text is tokenised with the teacher's tokenizer, the files are joined (an end-of-text token
between them) into one token stream, and the stream is split by position: the first part trains,
the last ``heldout_fraction`` is held out. Both parts are packed into blocks of ``block_size``
tokens. Tokenised streams are cached in the data directory, keyed by the files' content hash
and the tokenizer, so a second run on the same text skips tokenisation.

The order of training blocks is a pure function of the seed and the step (a fresh permutation
per epoch), so a resumed run sees the same batches as an uninterrupted one.

Augmentation (a transform spec, :mod:`engine.distill.augment`) noises the training text only:
the text is first cut into training and held-out parts at the same fraction, by characters
(so no noise can leak into a held-out block through a shared block), each training document
is noised with its own key (deterministic with the seed), and only then tokenised; the cache
key includes the spec, the seed and the split. A data-free corpus is noised by decoding its
blocks to text, noising, re-encoding and re-packing. ``augment_heldout`` noises the held-out
text the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import InputError, MindsetError


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
    cache_dir: Path | None, augment: str = "", augment_heldout: bool = False, seed: int = 0,
) -> TokenData:
    if augment.strip():
        return load_augmented_text(paths, tokenizer, block_size=block_size,
                                   heldout_fraction=heldout_fraction, cache_dir=cache_dir,
                                   augment=augment, augment_heldout=augment_heldout, seed=seed)
    stream = token_stream(paths, tokenizer, cache_dir)
    return split_blocks(stream, block_size, heldout_fraction, ", ".join(paths))


def split_documents(texts: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Training and held-out documents: the documents in order, cut at ``1 - fraction`` of
    their characters (at the next whitespace, so no word is split); the document the cut
    falls in gives its head to training and its tail to the held-out part."""
    documents = [text for text in texts if text.strip()]
    cut = int(sum(len(text) for text in documents) * (1.0 - heldout_fraction))
    train: list[str] = []
    heldout: list[str] = []
    at = 0
    for text in documents:
        if at + len(text) <= cut:
            train.append(text)
        elif at >= cut:
            heldout.append(text)
        else:
            inside = cut - at
            space = next((k for k in range(inside, len(text)) if text[k].isspace()), inside)
            head, tail = text[:space], text[space:]
            train += [head] if head.strip() else []
            heldout += [tail] if tail.strip() else []
        at += len(text)
    return train, heldout


def encode_documents(documents: list[str], tokenizer: Any) -> np.ndarray:
    """The documents tokenised and joined (an end-of-text token between them)."""
    separator = separator_id(tokenizer)
    ids: list[int] = []
    for text in documents:
        if not text.strip():
            continue
        if ids and separator is not None:
            ids.append(separator)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


def load_augmented_text(
    paths: list[str], tokenizer: Any, *, block_size: int, heldout_fraction: float,
    cache_dir: Path | None, augment: str, augment_heldout: bool, seed: int,
) -> TokenData:
    """Text files with noise on the training part (see the module docstring)."""
    from engine.distill.augment import Augmenter

    augmenter = Augmenter(augment, seed=seed)  # checked before any file is read
    files = collect_files(paths)
    texts = [read_utf8(file) for file in files]
    if not any(text.strip() for text in texts):
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise InputError(f"no text in {names}; give files with some text in them")
    digest = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    digest.update(f"augment:{augmenter.spec}:{seed}:{heldout_fraction!r}:"
                  f"{augment_heldout}".encode())
    key = digest.hexdigest()[:32]
    train_docs, heldout_docs = split_documents(texts, heldout_fraction)

    def train_stream() -> np.ndarray:
        noised = [augmenter.augment(text, key=f"train-{i}") for i, text in enumerate(train_docs)]
        return encode_documents(noised, tokenizer)

    def heldout_stream() -> np.ndarray:
        documents = ([augmenter.augment(text, key=f"heldout-{i}")
                      for i, text in enumerate(heldout_docs)] if augment_heldout
                     else heldout_docs)
        return encode_documents(documents, tokenizer)

    train_ids = cached_stream(cache_dir, f"{key}-train", train_stream)
    heldout_ids = cached_stream(cache_dir, f"{key}-heldout", heldout_stream)
    train, heldout = pack(train_ids, block_size), pack(heldout_ids, block_size)
    source = ", ".join(paths)
    if len(train) == 0 or len(heldout) == 0:
        needed = int(np.ceil(block_size / min(heldout_fraction, 1 - heldout_fraction)))
        raise InputError(
            f"{source} has only {len(train_ids) + len(heldout_ids)} tokens; with block size "
            f"{block_size} and {heldout_fraction:.0%} held out it needs at least about "
            f"{needed}: give more text or a smaller block size"
        )
    return TokenData(train=train, heldout=heldout, source=f"{source} (augmented: "
                     f"{augmenter.spec})")


def cached_stream(cache_dir: Path | None, name: str, build: Callable[[], np.ndarray],
                  ) -> np.ndarray:
    """``build()``, kept as ``name.npy`` in ``cache_dir`` (a damaged entry is rebuilt)."""
    cache_file = cache_dir / f"{name}.npy" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        try:
            cached: np.ndarray = np.load(cache_file, allow_pickle=False)
            return cached
        except (OSError, ValueError):
            cache_file.unlink(missing_ok=True)
    stream = build()
    if cache_file is not None:
        from engine.atomic import atomic_write

        atomic_write(cache_file, lambda handle: np.save(handle, stream))
    return stream


def augment_blocks(blocks: torch.Tensor, tokenizer: Any, augment: str, *, seed: int,
                   prefix: str) -> torch.Tensor:
    """Token blocks decoded to text, noised (one key per block), re-encoded and re-packed to
    the same block size (noise changes token counts, so the count may differ a little)."""
    from engine.distill.augment import Augmenter

    augmenter = Augmenter(augment, seed=seed)
    texts = [tokenizer.decode(block, skip_special_tokens=True) for block in blocks.tolist()]
    noised = [augmenter.augment(text, key=f"{prefix}-{i}") for i, text in enumerate(texts)]
    packed = pack(encode_documents(noised, tokenizer), int(blocks.shape[1]))
    if len(packed) == 0:
        raise MindsetError("the sampled text came back empty after augmentation; sample more "
                           "blocks (--data-free-blocks) or give text files")
    return packed


def augment_sampled(data: TokenData, tokenizer: Any, augment: str, *, seed: int,
                    augment_heldout: bool) -> TokenData:
    """A data-free corpus with noise on its training blocks (and held-out, if asked)."""
    train = augment_blocks(data.train, tokenizer, augment, seed=seed, prefix="train")
    heldout = (augment_blocks(data.heldout, tokenizer, augment, seed=seed, prefix="heldout")
               if augment_heldout else data.heldout)
    return TokenData(train=train, heldout=heldout, source=f"{data.source} (augmented)")


# Sequences sampled at once: generation on CPU is bound by per-step overhead, so 32 at a time
# writes about 2.3x the tokens per second of 8 (measured on the default model, 2 cores).
SAMPLE_BATCH = 32


def sample_corpus(
    model: Any, tokenizer: Any, *, blocks: int, block_size: int, seed: int,
    batch: int = SAMPLE_BATCH,
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
