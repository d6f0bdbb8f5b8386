"""Associative memory: stored (key, value) entries that grow while the model runs.

For each token and head: project a query, a key and a value; find the query's top-k stored
keys; attend (softmax of scaled dot products) over those entries plus the token's own key and
value; project the heads' mixed values back to the hidden size. A token whose query is far
from every stored key (squared L2 above ``novelty_threshold``) inserts its key and value.

The store is not differentiable; gradients reach the projections through the straight-through
estimator (see ``ste.py``). Entries live in an in-process :class:`EntryCache` during training
and are persisted to the memory store (``engine.memory``) by :meth:`save_tables`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from engine.model.memory_layers.config import AssociativeConfig
from engine.model.memory_layers.entry_cache import EntryCache
from engine.model.memory_layers.ste import straight_through

STORE_FILE = "memory.db"


class AssociativeMemory(nn.Module):
    def __init__(self, config: AssociativeConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.query_proj = nn.Linear(c.hidden_size, c.heads * c.key_dim, bias=True)
        self.key_proj = nn.Linear(c.hidden_size, c.heads * c.key_dim, bias=True)
        self.value_proj = nn.Linear(c.hidden_size, c.heads * c.value_dim, bias=True)
        self.out_proj = nn.Linear(c.heads * c.value_dim, c.hidden_size, bias=True)
        nn.init.zeros_(self.out_proj.weight)  # a fresh memory adds nothing until it learns
        nn.init.zeros_(self.out_proj.bias)
        self.cache = EntryCache(c.key_dim, c.value_dim, c.capacity, c.decay)
        # Opt-in read recorder (memory-use panels): while set, the attention weight each
        # stored entry gets is summed here, per cache position.
        self.read_totals: torch.Tensor | None = None
        # While a trace is open (engine.model.memory_trace): each forward pass appends
        # (cache positions [T·heads, k], their attention weights [T·heads, k]).
        self.trace_reads: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.cache)

    def inserting(self) -> bool:
        return self.config.insert == "always" or (self.config.insert == "train" and self.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        c = self.config
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        rows = x.shape[0] * c.heads
        query = self.query_proj(x).view(rows, c.key_dim)
        key = self.key_proj(x).view(rows, c.key_dim)
        value = self.value_proj(x).view(rows, c.value_dim)
        self.cache.to(x.device, x.dtype)

        cand_keys, cand_values = key.unsqueeze(1), value.unsqueeze(1)  # the token's own entry
        k = min(c.topk, len(self.cache))
        distances = positions = None
        if k > 0:
            with torch.no_grad():
                distances, positions = self.cache.search(query.detach(), k)
            returned_keys, returned_values = straight_through(
                query, key, value, self.cache.keys[positions], self.cache.values[positions]
            )
            cand_keys = torch.cat([cand_keys, returned_keys], dim=1)
            cand_values = torch.cat([cand_values, returned_values], dim=1)
        scores = (query.unsqueeze(1) * cand_keys).sum(-1) / math.sqrt(c.key_dim)
        weights = torch.softmax(scores, dim=-1)
        mixed = (weights.unsqueeze(-1) * cand_values).sum(1)
        out = self.out_proj(mixed.view(x.shape[0], c.heads * c.value_dim))

        if self.trace_reads is not None:
            empty = torch.zeros(rows, 0, device=x.device)
            self.trace_reads.append(
                (positions.detach() if positions is not None else empty.long(),
                 weights[:, 1:].detach() if positions is not None else empty))
        if positions is not None and self.read_totals is not None:
            self._record_reads(positions, weights[:, 1:])  # index 0: the token's own entry

        if positions is not None and not torch.is_inference_mode_enabled():
            self._after_read(positions)
        if self.inserting():
            novel = (torch.ones(rows, dtype=torch.bool, device=x.device) if distances is None
                     else distances[:, 0] > c.novelty_threshold)
            if novel.any():
                self.cache.add(key.detach()[novel], value.detach()[novel])
        return out.view(shape)

    def start_recording(self) -> None:
        """Sum, from now on, the attention weight each stored entry gets."""
        self.read_totals = torch.zeros(len(self.cache), dtype=torch.float64)

    def stop_recording(self) -> torch.Tensor:
        """Stop recording; the summed weight per cache position since the start."""
        totals, self.read_totals = self.read_totals, None
        return totals if totals is not None else torch.zeros(0, dtype=torch.float64)

    def _record_reads(self, positions: torch.Tensor, weights: torch.Tensor) -> None:
        totals = self.read_totals
        assert totals is not None
        with torch.no_grad():
            flat = positions.reshape(-1).cpu()
            needed = int(flat.max()) + 1 if flat.numel() else 0
            if needed > totals.shape[0]:  # entries inserted while recording
                # A normal tensor even under inference mode, so it stays writable after.
                with torch.inference_mode(False):
                    totals = torch.cat([totals, torch.zeros(needed - totals.shape[0],
                                                            dtype=totals.dtype)])
                self.read_totals = totals
            totals.index_add_(0, flat, weights.detach().reshape(-1).cpu().to(totals.dtype))

    def _after_read(self, positions: torch.Tensor) -> None:
        self.cache.touch(positions)
        if self.config.merge_threshold > 0 and self.training:
            self.cache.recombine(positions, self.config.merge_threshold)

    # --- persistence through the memory store --------------------------------------------

    def save_tables(self, directory: Path, name: str) -> None:
        """Write the entries to table ``name`` of the store in ``directory`` (replacing it)."""
        from engine.memory import MemoryStore

        directory.mkdir(parents=True, exist_ok=True)
        c = self.config
        with MemoryStore.open(directory / STORE_FILE) as store:
            if name in store.table_names():
                store.drop_table(name)
            table = store.create_table(name, c.key_dim, c.value_dim, index="flat-l2",
                                       capacity=c.capacity)
            keys = self.cache.keys.detach().float().cpu().numpy()
            values = self.cache.values.detach().float().cpu().numpy()
            chunk = 8192
            for start in range(0, len(keys), chunk):
                table.insert(keys[start:start + chunk], values[start:start + chunk],
                             provenance=f"associative memory {name}")

    def load_tables(self, directory: Path, name: str) -> None:
        """Read the entries of table ``name`` from the store in ``directory`` (if present)."""
        from engine.memory import MemoryStore

        path = directory / STORE_FILE
        if not path.is_file():
            self.cache.replace(torch.zeros(0, self.config.key_dim),
                               torch.zeros(0, self.config.value_dim))
            return
        with MemoryStore.open(path) as store:
            if name not in store.table_names():
                self.cache.replace(torch.zeros(0, self.config.key_dim),
                                   torch.zeros(0, self.config.value_dim))
                return
            _, keys, values = store.table(name).export_arrays()
        self.cache.replace(torch.from_numpy(keys.copy()), torch.from_numpy(values.copy()))

    def export_entries(self) -> dict[str, torch.Tensor]:
        """The entries and their LRFU statistics as tensors, for a training checkpoint (a
        resumed run reads and evicts exactly as the saved one would have)."""
        return self.cache.export_entries()

    def load_entries(self, entries: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`export_entries` returned."""
        self.cache.load_entries(entries)

    def fill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the entries (initialisation, tests)."""
        self.cache.replace(keys.float(), values.float())

    def extra_repr(self) -> str:
        c = self.config
        return (f"{c.heads} heads, keys {c.key_dim}, values {c.value_dim}, top-{c.topk}, "
                f"{len(self.cache)}/{c.capacity} entries, novelty > {c.novelty_threshold}")
