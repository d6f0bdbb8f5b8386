"""Associative memory: stored (key, value) entries that grow while the model runs.

Two forms (``AssociativeConfig.base``). The recipe (``base="flat"``): the teacher MLP's
neurons are fixed entries, read as the MLP reads them (a flat featural memory, so the layer
starts exact), and entries written by reading text are attended on top of them: a whitened
query, softmax over the nearest read entries and a null entry at ``config.radius``, so an
unrelated context reads (almost) nothing. The proposal's original form (``base="none"``),
for each token and head: project a query, a key and a value; find the query's top-k stored
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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.memory_layers.config import AssociativeConfig, FeaturalConfig
from engine.model.memory_layers.entry_cache import EntryCache
from engine.model.memory_layers.ste import straight_through

if TYPE_CHECKING:
    from engine.model.memory_layers.featural import FeaturalMemory

STORE_FILE = "memory.db"


def note_label(note: dict[str, Any] | None) -> str | None:
    """The row label of a read entry: the context that wrote it and what came next."""
    if not note or "text" not in note:
        return None
    return f"{note['text']} → {note.get('next', '')}"


class AssociativeMemory(nn.Module):
    def __init__(self, config: AssociativeConfig, base: FeaturalConfig | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.base: FeaturalMemory | None = None
        if c.reads:
            if base is None:
                raise InputError(f"base={c.base!r} needs the teacher MLP's shape")
            from engine.model.memory_layers.featural import FeaturalMemory

            self.base = FeaturalMemory(base)
        self.query_proj = nn.Linear(c.hidden_size, c.heads * c.key_dim, bias=True)
        self.key_proj = nn.Linear(c.hidden_size, c.heads * c.key_dim, bias=True)
        # Read entries carry their own (fitted) values: no value projection, and the output
        # projection is the identity.
        self.value_proj: nn.Linear | None = (
            None if c.reads else nn.Linear(c.hidden_size, c.heads * c.value_dim, bias=True))
        self.out_proj = nn.Linear(c.heads * c.value_dim, c.hidden_size, bias=True)
        nn.init.zeros_(self.out_proj.weight)  # a fresh memory adds nothing until it learns
        nn.init.zeros_(self.out_proj.bias)
        if c.reads:
            with torch.no_grad():
                self.out_proj.weight.copy_(torch.eye(c.hidden_size))
            self.out_proj.requires_grad_(False)
        self.cache = EntryCache(c.key_dim, c.value_dim, c.capacity, c.decay)
        # Opt-in read recorder (memory-use panels): while set, the attention weight each
        # stored entry gets is summed here, per cache position.
        self.read_totals: torch.Tensor | None = None
        # While a trace is open (engine.model.memory_trace): each forward pass appends
        # (cache positions [T·heads, k], their attention weights [T·heads, k]).
        self.trace_reads: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # Read entries: False while reading writes (its own passes are not uses for LRFU).
        self.counting = True

    def __len__(self) -> int:
        return len(self.cache)

    def inserting(self) -> bool:
        return self.config.insert == "always" or (self.config.insert == "train" and self.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.base is not None:
            return self._forward_reads(hidden_states)
        c = self.config
        assert self.value_proj is not None
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

    def _forward_reads(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The recipe's form: the teacher's entries, plus the read entries near the query."""
        assert self.base is not None
        out = self.base(hidden_states)
        c = self.config
        if len(self.cache) == 0 and self.trace_reads is None:
            return out
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        k = min(c.topk, len(self.cache))
        if k == 0:
            empty = torch.zeros(x.shape[0], 0, device=x.device)
            assert self.trace_reads is not None
            self.trace_reads.append((empty.long(), empty))
            return out
        self.cache.to(x.device, x.dtype)
        query = self.query_proj(x)
        with torch.no_grad():
            distances, positions = self.cache.search(query.detach(), k)
        temperature = c.radius / c.read_sharpness
        null = torch.full((x.shape[0], 1), -c.read_sharpness, device=x.device, dtype=x.dtype)
        weights = torch.softmax(torch.cat([null, -distances / temperature], dim=1), dim=-1)[:, 1:]
        read = (weights.unsqueeze(-1) * self.cache.values[positions]).sum(1)
        if self.trace_reads is not None:
            self.trace_reads.append((positions.detach(), weights.detach()))
        if self.read_totals is not None:
            self._record_reads(positions, weights)
        if self.counting:
            self.cache.touch(positions)
        return out + self.out_proj(read).view(shape)

    def read_keys(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The keys that contexts with these MLP inputs write (and query with)."""
        return self.key_proj(hidden_states.reshape(-1, hidden_states.shape[-1]))

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
            # Read entries: the cache evicts (LRFU), the table follows it (read_tables).
            table = store.create_table(name, c.key_dim, c.value_dim, index="flat-l2",
                                       capacity=None if c.reads else c.capacity)
            keys = self.cache.keys.detach().float().cpu().numpy()
            values = self.cache.values.detach().float().cpu().numpy()
            chunk = 8192
            for start in range(0, len(keys), chunk):
                notes = self.cache.notes[start:start + chunk]
                table.insert(keys[start:start + chunk], values[start:start + chunk],
                             labels=[note_label(note) for note in notes],
                             meta=[note or {} for note in notes],
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
            table = store.table(name)
            _, keys, values = table.export_arrays()
            _, metas = table.metas()
        self.cache.replace(torch.from_numpy(keys.copy()), torch.from_numpy(values.copy()),
                           [meta or None for meta in metas])

    def export_entries(self) -> dict[str, torch.Tensor]:
        """The entries and their LRFU statistics as tensors, for a training checkpoint (a
        resumed run reads and evicts exactly as the saved one would have)."""
        return self.cache.export_entries()

    def load_entries(self, entries: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`export_entries` returned."""
        self.cache.load_entries(entries)

    def fill(self, keys: torch.Tensor, values: torch.Tensor,
             notes: list[dict[str, Any] | None] | None = None) -> None:
        """Replace the entries (initialisation, loading, tests)."""
        self.cache.replace(keys.float(), values.float(), notes)

    def extra_repr(self) -> str:
        c = self.config
        form = f"teacher entries ({c.base}) + read entries, " if c.reads else ""
        return (f"{form}{c.heads} heads, keys {c.key_dim}, values {c.value_dim}, top-{c.topk}, "
                f"{len(self.cache)}/{c.capacity} entries, novelty > {c.novelty_threshold}")
