"""The derived ANN index of one table: exact (L2 / inner product), HNSW, IVF-PQ.

Every index maps faiss labels to row ids. Exact and IVF-PQ indexes carry row ids directly and
really remove deleted entries. HNSW graphs cannot drop nodes, so removed entries are masked
out of every search by a bitmap selector and the graph is rebuilt once a quarter of it is dead.

Slow-to-build indexes can be written to files (``parts``) and loaded back; loading checks the
file's kind, dimension and row ids against the rows and raises :class:`SavedIndexError` for
anything it cannot use (``engine.memory.index_files`` then rebuilds from the rows).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from engine.errors import InputError, flat_text
from engine.memory.vectors import Float32Array, Int64Array

INDEX_KINDS = ("flat-l2", "flat-ip", "hnsw", "ivfpq")

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 128
HNSW_MAX_DEAD_FRACTION = 0.25
IVF_TRAIN_MIN_ROWS = 20_000
IVF_RETRAIN_GROWTH = 4
IVF_CANDIDATE_FACTOR = 4  # IVF-PQ returns k * this candidates, re-ranked on exact keys


class SavedIndexError(Exception):
    """A saved index file that cannot be used: unreadable, or not built from these rows.

    ``part``: which of the index's files (see :attr:`AnnIndex.parts`) is at fault."""

    def __init__(self, message: str, part: str = ".faiss") -> None:
        super().__init__(message)
        self.part = part


def check_kind(kind: str) -> str:
    if kind not in INDEX_KINDS:
        raise InputError(f"unknown index kind {kind!r}: choose one of {', '.join(INDEX_KINDS)}")
    return kind


class AnnIndex:
    """Base: add/remove/search by row id. Subclasses wrap a faiss index."""

    kind: str
    inner_product: bool = False
    candidate_factor: int = 1  # > 1 means search results need exact re-ranking

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def add(self, ids: Int64Array, keys: Float32Array) -> None:
        raise NotImplementedError

    def remove(self, ids: Int64Array) -> None:
        raise NotImplementedError

    def search(self, queries: Float32Array, k: int) -> tuple[Float32Array, Int64Array]:
        raise NotImplementedError

    def wants_rebuild(self, rows: int) -> bool:
        return False

    def rebuild(self, ids: Int64Array, keys: Float32Array) -> None:
        self.reset()
        self.add(ids, keys)

    def reset(self) -> None:
        raise NotImplementedError

    @property
    def ntotal(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "ntotal": self.ntotal}

    # Saving is only worth it for indexes that are slow to build (HNSW, trained IVF-PQ).
    # ``parts``: the suffixes of the files a saved index of this kind consists of.
    parts: tuple[str, ...] = ()

    def saved_parts(self) -> tuple[str, ...]:
        """The parts worth saving now (none: this index is quick to rebuild)."""
        return ()

    def write_part(self, part: str, path: Path) -> None:
        raise NotImplementedError

    def load(self, paths: dict[str, Path], ids: Int64Array) -> None:
        """Replace this index by the saved one in ``paths`` (one file per part), which must
        index exactly ``ids`` (sorted); raises :class:`SavedIndexError` otherwise."""
        raise SavedIndexError(f"{self.kind} indexes are not saved")


class FlatIndex(AnnIndex):
    def __init__(self, dim: int, inner_product: bool) -> None:
        super().__init__(dim)
        self.inner_product = inner_product
        self.kind = "flat-ip" if inner_product else "flat-l2"
        self.reset()

    def reset(self) -> None:
        base = faiss.IndexFlatIP(self.dim) if self.inner_product else faiss.IndexFlatL2(self.dim)
        self.index = faiss.IndexIDMap2(base)

    def add(self, ids: Int64Array, keys: Float32Array) -> None:
        if len(ids):
            self.index.add_with_ids(keys, ids)

    def remove(self, ids: Int64Array) -> None:
        if len(ids):
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))  # type: ignore[arg-type]

    def search(self, queries: Float32Array, k: int) -> tuple[Float32Array, Int64Array]:
        distances, labels = self.index.search(queries, k)
        return distances, labels

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


class HnswIndex(AnnIndex):
    kind = "hnsw"

    def __init__(self, dim: int, ef_search: int = HNSW_EF_SEARCH) -> None:
        super().__init__(dim)
        self.ef_search = ef_search
        self.reset()

    def reset(self) -> None:
        self.index: Any = faiss.IndexHNSWFlat(self.dim, HNSW_M)
        self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self.slot_ids = np.zeros(0, dtype=np.int64)  # faiss label (slot) -> row id, -1 if dead
        self.dead = 0

    def add(self, ids: Int64Array, keys: Float32Array) -> None:
        if len(ids):
            self.index.add(keys)
            self.slot_ids = np.concatenate([self.slot_ids, ids.astype(np.int64)])

    def remove(self, ids: Int64Array) -> None:
        if len(ids):
            hit = np.isin(self.slot_ids, ids) & (self.slot_ids >= 0)
            self.dead += int(hit.sum())
            self.slot_ids[hit] = -1

    def search(self, queries: Float32Array, k: int) -> tuple[Float32Array, Int64Array]:
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(self.ef_search, k)
        bitmap = None
        if self.dead:
            bitmap = np.packbits(self.slot_ids >= 0, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(len(self.slot_ids), faiss.swig_ptr(bitmap))
        distances, slots = self.index.search(queries, k, params=params)
        del bitmap  # kept alive until the search returned
        labels = np.where(slots >= 0, self.slot_ids[np.maximum(slots, 0)], -1)
        return distances, labels

    def wants_rebuild(self, rows: int) -> bool:
        return self.dead > HNSW_MAX_DEAD_FRACTION * max(len(self.slot_ids), 1)

    @property
    def ntotal(self) -> int:
        return len(self.slot_ids) - self.dead

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ntotal": self.ntotal,
            "masked": self.dead,
            "ef_search": self.ef_search,
        }

    parts = (".faiss", ".slots.npy")

    def saved_parts(self) -> tuple[str, ...]:
        return self.parts

    def write_part(self, part: str, path: Path) -> None:
        if part == ".faiss":
            faiss.write_index(self.index, str(path))
        else:
            with path.open("wb") as file:
                np.save(file, self.slot_ids, allow_pickle=False)

    def load(self, paths: dict[str, Path], ids: Int64Array) -> None:
        index = read_faiss(paths[".faiss"], faiss.IndexHNSWFlat, "HNSW", self.dim)
        try:
            slot_ids = np.load(paths[".slots.npy"], allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise SavedIndexError(f"numpy cannot read it ({exc})", ".slots.npy") from exc
        if slot_ids.dtype != np.int64 or slot_ids.ndim != 1:
            raise SavedIndexError(
                f"it holds {slot_ids.dtype} {slot_ids.shape}, not int64 slot ids", ".slots.npy"
            )
        if len(slot_ids) != index.ntotal:
            raise SavedIndexError(f"it has {index.ntotal} vectors but {len(slot_ids)} slot ids")
        check_ids(np.sort(slot_ids[slot_ids >= 0]), ids, ".slots.npy")
        self.index, self.slot_ids = index, slot_ids
        self.dead = int((slot_ids < 0).sum())


# faiss asks for 39 training points per centroid; its PQ codebooks have 256 centroids.
PQ_TRAIN_POINTS = 40 * 256


class IvfPqIndex(AnnIndex):
    """IVF-PQ once the table is big enough to train it; an exact index before that."""

    kind = "ivfpq"

    def __init__(self, dim: int, nprobe: int | None = None) -> None:
        super().__init__(dim)
        self.nprobe_override = nprobe
        self.reset()

    def reset(self) -> None:
        self.exact: FlatIndex | None = FlatIndex(self.dim, inner_product=False)
        self.index: Any = None
        self.candidate_factor = 1
        self.trained_rows = 0

    @property
    def trained(self) -> bool:
        return self.exact is None

    def add(self, ids: Int64Array, keys: Float32Array) -> None:
        if self.exact is not None:
            self.exact.add(ids, keys)
        elif len(ids):
            self.index.add_with_ids(keys, ids)

    def remove(self, ids: Int64Array) -> None:
        if self.exact is not None:
            self.exact.remove(ids)
        elif len(ids):
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))  # type: ignore[arg-type]

    def search(self, queries: Float32Array, k: int) -> tuple[Float32Array, Int64Array]:
        if self.exact is not None:
            return self.exact.search(queries, k)
        distances, labels = self.index.search(queries, k * self.candidate_factor)
        return distances, labels

    def wants_rebuild(self, rows: int) -> bool:
        # Train once the table is big enough, and again each time it has grown 4x since, so
        # the number of lists keeps pace with the rows.
        if self.exact is not None:
            return rows >= IVF_TRAIN_MIN_ROWS
        return rows >= IVF_RETRAIN_GROWTH * self.trained_rows

    def rebuild(self, ids: Int64Array, keys: Float32Array) -> None:
        if len(ids) < IVF_TRAIN_MIN_ROWS:
            self.reset()
            self.add(ids, keys)
            return
        nlist = int(min(max(math.sqrt(len(ids)), 64), 65536))
        sub = _pq_subquantizers(self.dim)
        quantizer = faiss.IndexFlatL2(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, sub, 8)
        rng = np.random.default_rng(0)
        # Enough points for both the coarse lists and the 256-centroid PQ codebooks.
        wanted = max(64 * nlist, PQ_TRAIN_POINTS)
        sample = (
            keys if len(keys) <= wanted else keys[rng.choice(len(keys), wanted, replace=False)]
        )
        index.train(np.ascontiguousarray(sample))
        index.nprobe = self.nprobe_override or max(1, nlist // 8)
        index.add_with_ids(keys, ids)
        self.index, self.exact, self.quantizer = index, None, quantizer
        self.trained_rows = len(ids)
        self.candidate_factor = IVF_CANDIDATE_FACTOR

    @property
    def ntotal(self) -> int:
        return self.exact.ntotal if self.exact is not None else int(self.index.ntotal)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "ntotal": self.ntotal, "trained": self.trained}
        if self.index is not None:
            info.update(nlist=int(self.index.nlist), nprobe=int(self.index.nprobe))
        return info

    def set_nprobe(self, nprobe: int) -> None:
        self.nprobe_override = nprobe
        if self.index is not None:
            self.index.nprobe = nprobe

    parts = (".faiss",)

    def saved_parts(self) -> tuple[str, ...]:
        return self.parts if self.index is not None else ()

    def write_part(self, part: str, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    def load(self, paths: dict[str, Path], ids: Int64Array) -> None:
        index: Any = read_faiss(paths[".faiss"], faiss.IndexIVFPQ, "IVF-PQ", self.dim)
        if not index.is_trained or index.nlist < 1:
            raise SavedIndexError("it is an untrained IVF-PQ index")
        if index.ntotal != len(ids):
            raise SavedIndexError(f"it has {index.ntotal} vectors for {len(ids)} rows")
        check_ids(np.sort(_ivf_ids(index)), ids)
        if self.nprobe_override:
            index.nprobe = self.nprobe_override
        self.index, self.exact = index, None
        self.candidate_factor = IVF_CANDIDATE_FACTOR
        self.trained_rows = int(index.ntotal)


def read_faiss(path: Path, expected: type[Any], label: str, dim: int) -> Any:
    """Read a faiss index file (never pickle) that must hold a ``label`` index of ``dim``."""
    try:
        # read_index returns the concrete class, owning it (downcast_index here would wrap a
        # temporary that frees the index when it goes).
        index: Any = faiss.read_index(str(path))
    except Exception as exc:  # faiss raises RuntimeError with a multi-line C++ message
        text = flat_text(exc) or type(exc).__name__
        where = re.search(r" at \S+:\d+: (.*)$", text)  # drop faiss's C++ function and file
        detail = (where[1] if where else text)[:200]
        raise SavedIndexError(f"faiss cannot read it ({detail})") from exc
    if not isinstance(index, expected):
        raise SavedIndexError(f"it holds a faiss {type(index).__name__}, not an {label} index")
    if index.d != dim:
        raise SavedIndexError(f"its vectors have dimension {index.d}, this table's {dim}")
    if index.metric_type != faiss.METRIC_L2:
        raise SavedIndexError(f"it uses metric {index.metric_type}, not L2")
    return index


def check_ids(saved: Int64Array, ids: Int64Array, part: str = ".faiss") -> None:
    """The (sorted) row ids a saved index holds must be exactly the table's (sorted) ids."""
    if len(saved) != len(ids):
        raise SavedIndexError(f"it holds {len(saved)} entries for {len(ids)} rows", part)
    if not np.array_equal(saved, ids):
        raise SavedIndexError("its entries are not the table's row ids", part)


def _ivf_ids(index: Any) -> Int64Array:
    lists = index.invlists
    chunks = [np.zeros(0, dtype=np.int64)]
    for number in range(index.nlist):
        size = lists.list_size(number)
        if size:
            chunks.append(faiss.rev_swig_ptr(lists.get_ids(number), size).copy())
    return np.concatenate(chunks).astype(np.int64)


def _pq_subquantizers(dim: int) -> int:
    for sub in (dim // 4, dim // 2, dim // 8, dim):
        if sub >= 1 and dim % sub == 0:
            return sub
    return dim


def make_index(kind: str, dim: int) -> AnnIndex:
    check_kind(kind)
    if kind == "flat-l2":
        return FlatIndex(dim, inner_product=False)
    if kind == "flat-ip":
        return FlatIndex(dim, inner_product=True)
    if kind == "hnsw":
        return HnswIndex(dim)
    return IvfPqIndex(dim)
