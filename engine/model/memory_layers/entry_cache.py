"""The in-process tensor cache of an associative memory's entries.

Training reads and writes this cache on every step; the memory store (SQL rows + ANN index)
only sees it when the memory is saved or loaded, so no step round-trips SQL. The cache keeps
the store's LRFU statistics (a combined recency-frequency value per entry that decays every
step and grows with each read) to choose what to evict, and merges near-duplicate keys that
come back together in one top-k, both with the store's own functions (``engine.memory.lrfu``
and ``engine.memory.recombination``); a cache position plays the part of a row id.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.memory.lrfu import (
    choose_victims,
    decayed,
    eviction_count,
    hit_counts,
    lambda_for_decay,
    record_hits,
)
from engine.memory.recombination import MergePlan, group_members, merge_entries, merge_groups


class EntryCache:
    def __init__(self, key_dim: int, value_dim: int, capacity: int, decay: float) -> None:
        self.key_dim, self.value_dim = key_dim, value_dim
        self.capacity, self.decay = capacity, decay
        self.lam = lambda_for_decay(decay)  # the store's LRFU lambda for this per-step decay
        self.clock = 0  # one tick per step that reads the cache
        self.keys = torch.zeros(0, key_dim)
        self.values = torch.zeros(0, value_dim)
        # Statistics per entry, on the CPU: LRFU score as of its last tick, and reads.
        self.crf = np.zeros(0, dtype=np.float64)
        self.last_tick = np.zeros(0, dtype=np.int64)
        self.hits = np.zeros(0, dtype=np.int64)
        # Per entry: a stable id (survives evictions and merges of others, so a table that
        # mirrors the cache can follow it) and what wrote it (label and meta; None if unknown).
        self.uids = np.zeros(0, dtype=np.int64)
        self.next_uid = 0
        self.notes: list[dict[str, Any] | None] = []
        self.inserted = 0
        self.evicted = 0
        self.merged = 0

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        if self.keys.device != device or self.keys.dtype != dtype:
            self.keys = self.keys.to(device, dtype)
            self.values = self.values.to(device, dtype)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k by squared L2: (distances [n, k], positions [n, k]); k <= len(self)."""
        keys = self.keys.to(queries.dtype)
        distances = (
            queries.pow(2).sum(-1, keepdim=True)
            - 2 * queries @ keys.t()
            + keys.pow(2).sum(-1).unsqueeze(0)
        )
        negative, positions = (-distances).topk(k, dim=-1)
        return (-negative).clamp_min(0), positions

    def touch(self, positions: torch.Tensor) -> None:
        """One step passes: every score decays, and each read adds 1 (LRFU)."""
        self.clock += 1
        flat = positions.reshape(-1).cpu().numpy().astype(np.int64)
        where, counts = hit_counts(flat, len(self))
        record_hits(self.crf, self.last_tick, where, counts, self.clock, self.lam)
        self.hits[where] += counts

    def _new_uids(self, rows: int) -> np.ndarray:
        uids = np.arange(self.next_uid, self.next_uid + rows, dtype=np.int64)
        self.next_uid += rows
        return uids

    def add(self, keys: torch.Tensor, values: torch.Tensor,
            notes: list[dict[str, Any] | None] | None = None) -> np.ndarray:
        """Append entries (evicting LRFU past capacity); returns their stable ids."""
        keys = keys.detach().to(self.keys.device, self.keys.dtype)
        values = values.detach().to(self.values.device, self.values.dtype)
        notes = list(notes) if notes is not None else [None] * int(keys.shape[0])
        if keys.shape[0] > self.capacity:  # keep the newest that fit
            keys, values = keys[-self.capacity:], values[-self.capacity:]
            notes = notes[-self.capacity:]
        rows = int(keys.shape[0])
        uids = self._new_uids(rows)
        self.uids = np.concatenate([self.uids, uids])
        self.notes.extend(notes)
        self.keys = torch.cat([self.keys, keys])
        self.values = torch.cat([self.values, values])
        self.crf = np.concatenate([self.crf, np.ones(rows)])
        self.last_tick = np.concatenate([self.last_tick, np.full(rows, self.clock, np.int64)])
        self.hits = np.concatenate([self.hits, np.zeros(rows, dtype=np.int64)])
        self.inserted += rows
        self.evict(eviction_count(len(self), self.capacity, 0.0), protect_last=rows)
        return uids[np.isin(uids, self.uids)]

    def evict(self, count: int, protect_last: int = 0) -> None:
        """Drop ``count`` entries, lowest LRFU score first; the newest ``protect_last`` go
        only after all the others (the store's rule for a batch being inserted)."""
        if count <= 0:
            return
        older = len(self) - protect_last
        drop = choose_victims(
            self.crf[:older], self.last_tick[:older], np.arange(older, dtype=np.int64),
            np.arange(older, len(self), dtype=np.int64), count, self.clock, self.lam,
        )
        keep = np.ones(len(self), dtype=bool)
        keep[drop] = False
        self._keep(keep)
        self.evicted += len(drop)

    def recombine(self, positions: torch.Tensor, threshold: float) -> int:
        """Merge entries returned in one top-k whose keys are within ``threshold`` (squared L2).

        Linked entries (connected groups) merge into the group's oldest entry (its smallest
        position) by the store's rule: the hit-weighted mean key and value (weight = hits + 1),
        the summed score and hits.
        Returns how many entries were merged away.
        """
        if threshold <= 0 or len(self) < 2:
            return 0
        rows = positions.reshape(-1, positions.shape[-1]).cpu().numpy().astype(np.int64)
        keys = self.keys.detach().float().cpu().numpy()
        groups = group_members(merge_groups(rows, keys[rows], threshold))
        if not groups:
            return 0
        plan = MergePlan.of(groups)
        members = plan.members
        values = self.values.detach().float().cpu().numpy()
        crf_now = decayed(self.crf[members], self.last_tick[members], self.clock, self.lam)
        merged = merge_entries(plan, keys[members], values[members], self.hits[members], crf_now)
        # Out of place: the cache may hold inference-mode tensors, which refuse in-place edits.
        device = self.keys.device
        kept = torch.from_numpy(plan.kept).to(device)
        self.keys = self.keys.index_copy(
            0, kept, torch.from_numpy(merged.key).to(device, self.keys.dtype)
        )
        self.values = self.values.index_copy(
            0, kept, torch.from_numpy(merged.value).to(device, self.values.dtype)
        )
        self.crf[plan.kept] = merged.crf
        self.last_tick[plan.kept] = self.clock
        self.hits[plan.kept] = merged.access_count
        keep = np.ones(len(self), dtype=bool)
        keep[plan.gone] = False
        self._keep(keep)
        self.merged += len(plan.gone)
        return len(plan.gone)

    def _keep(self, keep: np.ndarray) -> None:
        device_keep = torch.from_numpy(keep).to(self.keys.device)
        self.keys = self.keys[device_keep]
        self.values = self.values[device_keep]
        self.crf = self.crf[keep]
        self.last_tick = self.last_tick[keep]
        self.hits = self.hits[keep]
        self.uids = self.uids[keep]
        self.notes = [note for note, kept in zip(self.notes, keep, strict=True) if kept]

    def replace(self, keys: torch.Tensor, values: torch.Tensor,
                notes: list[dict[str, Any] | None] | None = None) -> None:
        """Set the whole content (loading, initialisation); statistics start afresh."""
        self.keys = keys.detach().clone().to(self.keys.dtype)
        self.values = values.detach().clone().to(self.values.dtype)
        self.uids = self._new_uids(len(self))
        self.notes = list(notes) if notes is not None else [None] * len(self)
        self.crf = np.ones(len(self), dtype=np.float64)
        self.last_tick = np.full(len(self), self.clock, dtype=np.int64)
        self.hits = np.zeros(len(self), dtype=np.int64)

    def export_entries(self) -> dict[str, torch.Tensor]:
        """The whole content with its LRFU statistics, clock and counters, as CPU tensors
        (what a training checkpoint keeps of this cache); :meth:`load_entries` puts it back."""
        return {
            "keys": self.keys.detach().cpu().clone(),
            "values": self.values.detach().cpu().clone(),
            "crf": torch.from_numpy(self.crf.copy()),
            "last_tick": torch.from_numpy(self.last_tick.copy()),
            "hits": torch.from_numpy(self.hits.copy()),
            "counters": torch.tensor([self.clock, self.inserted, self.evicted, self.merged]),
        }

    def load_entries(self, entries: dict[str, torch.Tensor]) -> None:
        """Restore exactly what :meth:`export_entries` returned (statistics included)."""
        self.keys = entries["keys"].clone()
        self.values = entries["values"].clone()
        self.crf = entries["crf"].numpy().astype(np.float64)
        self.last_tick = entries["last_tick"].numpy().astype(np.int64)
        self.hits = entries["hits"].numpy().astype(np.int64)
        self.clock, self.inserted, self.evicted, self.merged = (
            int(n) for n in entries["counters"])
        self.uids = self._new_uids(len(self))
        self.notes = [None] * len(self)
