"""Featural memory: a fixed table of learned (key, value) slots in place of an MLP.

Call signature is the MLP's: ``forward(hidden_states [..., hidden]) -> [..., hidden]``, so a
Hugging Face decoder layer (and its ``generate`` with a KV cache) runs it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError
from engine.model.memory_layers.config import FeaturalConfig
from engine.model.memory_layers.flat_keys import FlatKeys
from engine.model.memory_layers.product_keys import ProductKeys
from engine.model.memory_layers.routed_keys import RoutedKeys

# silu(GATE_OPEN) == 1.0: a gate with zero weights and this bias starts fully "open".
GATE_OPEN = 1.2784645
# Flat keys reading at least 1/DENSE_READ_SHARE of their slots use a masked dense product.
DENSE_READ_SHARE = 16


@dataclass(frozen=True)
class FeaturalReads:
    """One traced forward pass: ``slots`` and ``weights`` [T, k] (k = heads·top-k for
    product keys), and the gate [T, value_dim] that multiplied the read (product keys with a
    gate; None otherwise)."""

    slots: torch.Tensor
    weights: torch.Tensor
    gate: torch.Tensor | None


class FeaturalMemory(nn.Module):
    """Top-k lookup over learned keys and a weighted sum of the chosen values.

    Values are read with ``F.embedding_bag`` and per-sample weights, so only the k chosen rows
    per head are touched; with ``config.sparse`` their gradient is a sparse tensor (train
    :meth:`sparse_parameters` with ``torch.optim.SparseAdam`` or SGD, the rest with Adam).
    """

    def __init__(self, config: FeaturalConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        hidden, slots, value_dim = config.hidden_size, config.num_slots, config.effective_value_dim
        self.product: ProductKeys | None = None
        self.flat: FlatKeys | None = None
        self.routed: RoutedKeys | None = None
        self.query_proj: nn.Linear | None = None
        self.gate_proj: nn.Linear | None = None
        self.out_proj: nn.Linear | None = None
        self.out_bias: nn.Parameter | None = None
        if config.keys == "product":
            self.query_proj = nn.Linear(hidden, config.heads * config.query_dim, bias=True)
            self.product = ProductKeys(config.heads, config.query_dim, config.num_subkeys,
                                       config.topk)
            if config.gate:
                self.gate_proj = nn.Linear(hidden, value_dim, bias=True)
            self.out_proj = nn.Linear(value_dim, hidden, bias=True)
            # A fresh memory adds nothing to the residual stream until it has learned.
            nn.init.zeros_(self.out_proj.weight)
            nn.init.zeros_(self.out_proj.bias)
        elif config.keys == "routed":
            self.routed = RoutedKeys(hidden, slots, config.group_size, config.groups_read,
                                     config.router_rank, config.activation, config.gated)
            self.routed.fact_groups = config.fact_groups
            self.out_bias = nn.Parameter(torch.zeros(hidden))
        else:
            self.flat = FlatKeys(hidden, slots, config.activation, config.gated)
            self.out_bias = nn.Parameter(torch.zeros(hidden))
        # nn.init (not Tensor methods) so that loading a saved student can skip initialisation.
        self.values = nn.Parameter(torch.empty(slots, value_dim))
        nn.init.normal_(self.values, 0, value_dim**-0.5)
        # While a trace is open (engine.model.memory_trace) every forward pass appends the
        # reads it made, and computes its output from exactly those reads.
        self.trace_reads: list[FeaturalReads] | None = None

    @property
    def num_slots(self) -> int:
        return self.config.num_slots

    @property
    def slot_keys(self) -> torch.Tensor:
        """Flat or routed keys: each slot's key in the hidden space, [slots, hidden]."""
        keys = self.flat if self.flat is not None else self.routed
        assert keys is not None, "product keys have no per-slot key in the hidden space"
        return keys.keys

    def set_read_share(self, share: float) -> None:
        """Routed keys: read ``share`` of the groups from now on (1.0: the whole MLP)."""
        import dataclasses

        assert self.routed is not None, "only routed keys have a read share"
        config = dataclasses.replace(self.config, read_share=float(share), groups_fixed=0)
        config.validate()
        self.config = config
        self.routed.groups_read = config.groups_read

    @torch.no_grad()
    def add_slots(self, keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor, *,
                  up: torch.Tensor | None = None, margin: float = 1.0,
                  selectivity: float = 1.0, fact: bool = False) -> list[int]:
        """Routed keys: append slots (one new group, padded with dead slots) that ``query``
        [hidden] routes to, and return their slot indexes.

        The new group's router row points along the query in the router's rank space, with
        a bias so low that only inputs close to the query choose it: ``query`` scores
        ``margin`` above its best existing group. Until an input routes to the new group,
        every output is unchanged. ``selectivity`` > 1 lowers the floor further below the
        query's score: inputs must come closer to the query to choose the group. Gated slots
        take ``up`` keys (default: zero-weight ``up`` rows of 1, so the weight is
        ``act(x·k)``). ``fact``: the group is a fact group, read in addition to a token's
        regular groups instead of displacing one (see :mod:`routed_keys`); fact groups come
        after every other group. Parameters are replaced by larger ones: an optimiser built
        before must be rebuilt.
        """
        import dataclasses

        routed = self.routed
        if routed is None:
            raise InputError("only routed memories take new slots; this layer has "
                             f"{self.config.keys} keys")
        if routed.fact_groups and not fact:
            raise InputError("this layer holds inserted facts, which come last: it takes only "
                             "more facts now (undo the facts to add other groups)")
        count, hidden = keys.shape
        size = routed.group_size
        if count > size or values.shape != (count, hidden) or query.shape != (hidden,):
            raise InputError(f"add_slots takes up to {size} keys [n, {hidden}], values of the "
                             f"same shape and one query [{hidden}]")

        def padded(rows: torch.Tensor) -> torch.Tensor:
            return torch.cat([rows.float(), rows.new_zeros(size - count, hidden).float()])

        rank_space = routed.router_down.float() @ query.float()
        existing = routed.scores(query.view(1, -1).to(routed.router_down)).view(-1)
        existing = existing[:routed.regular_groups]  # a fact competes with regular groups
        floor = float(existing.min()) - float(existing.max() - existing.min()) - margin
        target = float(existing.max()) + margin
        floor = target - selectivity * (target - floor)
        direction = rank_space * (target - floor) / rank_space.pow(2).sum().clamp_min(1e-12)
        up_rows = up_bias = None
        if routed.gated:
            if up is None:  # up = 1 on the new slots: their weight is act(x·k)
                up_rows = torch.zeros(size, hidden)
                up_bias = torch.cat([torch.ones(count), torch.zeros(size - count)])
            else:
                up_rows, up_bias = padded(up), torch.zeros(size)
        first = routed.num_slots
        routed.add_group(padded(keys), torch.zeros(size), up_rows, up_bias, (direction, floor))
        self.values = nn.Parameter(torch.cat([self.values.detach(), padded(values).to(
            self.values)]), requires_grad=self.values.requires_grad)
        if fact:
            routed.fact_groups += 1
        # The read count stays what it was: more groups must not change existing outputs.
        self.config = dataclasses.replace(self.config, slots=routed.num_slots,
                                          groups_fixed=routed.groups_read,
                                          fact_groups=routed.fact_groups)
        return list(range(first, first + count))

    @torch.no_grad()
    def remove_last_group(self) -> None:
        """Routed keys: drop the newest group of slots and their values (undoes
        :meth:`add_slots` exactly). Parameters are replaced: rebuild any optimiser."""
        import dataclasses

        assert self.routed is not None, "only routed memories add and remove groups"
        size = self.routed.group_size
        self.routed.remove_last_group()
        self.values = nn.Parameter(self.values.detach()[:-size].clone(),
                                   requires_grad=self.values.requires_grad)
        self.config = dataclasses.replace(self.config, slots=self.routed.num_slots,
                                          fact_groups=self.routed.fact_groups)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse tensors (the value table, when sparse)."""
        return [self.values] if self.config.sparse else []

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots each row of ``x`` [T, hidden] reads and their weights, both [T, heads*k].

        For flat keys read densely (topk = all) every slot is returned.
        """
        if self.product is not None:
            assert self.query_proj is not None
            scores, slots = self.product.search(self.query_proj(x))
            weights = torch.softmax(scores, dim=-1)
            return slots.flatten(1), weights.flatten(1)
        if self.routed is not None:
            return self.routed.lookup(x)
        assert self.flat is not None
        weights = self.flat.weights(x)
        k = self.config.effective_topk
        if k >= self.num_slots:
            slots = torch.arange(self.num_slots, device=x.device).expand(x.shape[0], -1)
            return slots, weights
        slots = weights.abs().topk(k, dim=-1).indices
        return slots, weights.gather(-1, slots)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.trace_reads is not None:
            return self._traced_forward(x).view(shape)
        if self.routed is not None:
            assert self.out_bias is not None
            return self.routed.read(x, self.values, self.out_bias).view(shape)
        if self.flat is not None and self.config.effective_topk >= self.num_slots:
            # Every slot is read: a dense matmul is the same sum, and faster.
            assert self.out_bias is not None
            out = torch.addmm(self.out_bias, self.flat.weights(x), self.values)
            return out.view(shape)
        read_share = self.config.effective_topk * DENSE_READ_SHARE
        if self.flat is not None and read_share >= self.num_slots:
            # Reading a large share of the slots: zeroing the unread weights and multiplying
            # densely is the same sum (and the same gradients) but far faster than gathering.
            assert self.out_bias is not None
            weights = self.flat.weights(x)
            chosen = weights.abs().topk(self.config.effective_topk, dim=-1).indices
            mask = torch.zeros_like(weights).scatter_(-1, chosen, 1.0)
            return torch.addmm(self.out_bias, weights * mask, self.values).view(shape)
        slots, weights = self.lookup(x)
        read = F.embedding_bag(slots, self.values, per_sample_weights=weights, mode="sum",
                               sparse=self.config.sparse)
        if self.flat is not None:
            assert self.out_bias is not None
            return (read + self.out_bias).view(shape)
        if self.gate_proj is not None:
            read = read * F.silu(self.gate_proj(x))
        assert self.out_proj is not None
        return self.out_proj(read).view(shape)

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same sum as :meth:`forward`, from one explicit lookup that is recorded: the
        slots and weights in the trace are the ones that made the output."""
        assert self.trace_reads is not None
        slots, weights = self.lookup(x)
        read = F.embedding_bag(slots, self.values, per_sample_weights=weights, mode="sum")
        gate = None
        if self.out_bias is not None:
            out = read + self.out_bias
        else:
            if self.gate_proj is not None:
                gate = F.silu(self.gate_proj(x))
                read = read * gate
            assert self.out_proj is not None
            out = self.out_proj(read)
        self.trace_reads.append(FeaturalReads(slots.detach(), weights.detach(),
                                              None if gate is None else gate.detach()))
        return out

    def extra_repr(self) -> str:
        c = self.config
        if c.keys == "product":
            return (f"product keys: {c.heads} heads x {c.num_subkeys}^2 = {c.num_slots} slots, "
                    f"query {c.query_dim}, top-{c.topk}, values {c.effective_value_dim}, "
                    f"gate={c.gate}")
        if c.keys == "routed":
            return f"routed keys: {c.num_slots} slots, values {c.effective_value_dim}"
        return (f"flat keys: {c.num_slots} slots, top-{c.effective_topk}, "
                f"activation {c.activation}, gated={c.gated}")
