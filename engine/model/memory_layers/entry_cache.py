"""The in-process tensor cache of an associative memory's entries.

Training reads and writes this cache on every step; the memory store (SQL rows + ANN index)
only sees it when the memory is saved or loaded, so no step round-trips SQL. The cache keeps
LRFU statistics (a combined recency-frequency value per entry that decays every step and grows
with each read) to choose what to evict, and merges near-duplicate keys that come back
together in one top-k (usage-weighted means, as the store's recombination does).
"""

from __future__ import annotations

import torch


class EntryCache:
    def __init__(self, key_dim: int, value_dim: int, capacity: int, decay: float) -> None:
        self.key_dim, self.value_dim = key_dim, value_dim
        self.capacity, self.decay = capacity, decay
        self.keys = torch.zeros(0, key_dim)
        self.values = torch.zeros(0, value_dim)
        self.crf = torch.zeros(0, dtype=torch.float64)  # LRFU score
        self.hits = torch.zeros(0, dtype=torch.int64)
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
        self.crf.mul_(self.decay)
        flat = positions.reshape(-1).cpu()
        ones = torch.ones(flat.shape[0], dtype=torch.float64)
        self.crf.index_add_(0, flat, ones)
        self.hits.index_add_(0, flat, torch.ones_like(flat))

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        keys = keys.detach().to(self.keys.device, self.keys.dtype)
        values = values.detach().to(self.values.device, self.values.dtype)
        if keys.shape[0] > self.capacity:  # keep the newest that fit
            keys, values = keys[-self.capacity:], values[-self.capacity:]
        self.keys = torch.cat([self.keys, keys])
        self.values = torch.cat([self.values, values])
        self.crf = torch.cat([self.crf, torch.ones(keys.shape[0], dtype=torch.float64)])
        self.hits = torch.cat([self.hits, torch.zeros(keys.shape[0], dtype=torch.int64)])
        self.inserted += int(keys.shape[0])
        overflow = len(self) - self.capacity
        if overflow > 0:
            self.evict(overflow, protect_last=int(keys.shape[0]))

    def evict(self, count: int, protect_last: int = 0) -> None:
        """Drop the ``count`` entries with the lowest LRFU score (the newest are protected)."""
        if count <= 0:
            return
        score = self.crf.clone()
        if protect_last:
            score[-protect_last:] = float("inf")
        drop = score.topk(count, largest=False).indices
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[drop] = False
        self._keep(keep)
        self.evicted += count

    def recombine(self, positions: torch.Tensor, threshold: float) -> int:
        """Merge pairs of entries returned in one top-k whose keys are within ``threshold``.

        Each merged pair becomes one entry: the hit-weighted mean key and value, the summed
        score and hits. Returns how many entries were merged away.
        """
        if threshold <= 0 or len(self) < 2:
            return 0
        rows = positions.reshape(-1, positions.shape[-1]).cpu()
        keys = self.keys.cpu()
        gathered = keys[rows]  # [n, k, dk]
        distance = torch.cdist(gathered.float(), gathered.float()).pow(2)
        k = rows.shape[1]
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool), 1)
        row, first, second = torch.nonzero((distance <= threshold) & upper, as_tuple=True)
        gone: set[int] = set()
        keep = torch.ones(len(self), dtype=torch.bool)
        new_keys, new_values = self.keys.clone(), self.values.clone()
        for r, a, b in zip(row.tolist(), first.tolist(), second.tolist(), strict=True):
            kept, merged = int(rows[r, a]), int(rows[r, b])
            if kept == merged or kept in gone or merged in gone:
                continue
            wa, wb = float(self.hits[kept] + 1), float(self.hits[merged] + 1)
            total = wa + wb
            new_keys[kept] = (new_keys[kept] * wa + new_keys[merged] * wb) / total
            new_values[kept] = (new_values[kept] * wa + new_values[merged] * wb) / total
            self.crf[kept] += self.crf[merged]
            self.hits[kept] += self.hits[merged]
            keep[merged] = False
            gone.add(merged)
        self.keys, self.values = new_keys, new_values
        if gone:
            self._keep(keep)
            self.merged += len(gone)
        return len(gone)

    def _keep(self, keep: torch.Tensor) -> None:
        device_keep = keep.to(self.keys.device)
        self.keys = self.keys[device_keep]
        self.values = self.values[device_keep]
        self.crf = self.crf[keep]
        self.hits = self.hits[keep]

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Set the whole content (loading, initialisation); statistics start afresh."""
        self.keys = keys.detach().clone().to(self.keys.dtype)
        self.values = values.detach().clone().to(self.values.dtype)
        self.crf = torch.ones(len(self), dtype=torch.float64)
        self.hits = torch.zeros(len(self), dtype=torch.int64)
