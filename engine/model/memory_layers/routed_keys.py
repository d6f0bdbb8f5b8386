"""Routed keys: the MLP's neurons as slots in contiguous groups, read only where a router points.

Slot i is a neuron of the form ``act(x·k_i + b_i)`` (times ``x·u_i + e_i`` when gated), and
its value ``v_i`` is added with that weight, exactly as in the MLP (Geva et al. 2021: an FFN
is a key-value memory). The slots are stored in ``G = slots / group_size`` groups of
``s = group_size`` contiguous rows (MoEfication, Zhang et al. 2022: neurons clustered so that
neurons firing together sit together). A low-rank router scores the *groups*, never the
slots: ``score(x) = B·(A·x) + c`` with ``A`` [r, hidden] and ``B`` [G, r]. Each token reads
its top ``g = groups_read`` groups, and only those groups' keys and values are touched.

Cost per token, in multiply-adds, router included::

    router  = hidden·r + r·G
    read    = g·s·hidden·m          (m = 3 for a gated/SwiGLU MLP, 2 otherwise)
    share   = (router + read) / (N·hidden·m)   against the MLP's N neurons

For SmolLM2-135M (hidden 576, N = 1,536, SwiGLU) with s = 64, g = 8 of 24 groups and r = 64:
(36,864 + 1,536 + 884,736) / 2,654,208 = 0.348 of the MLP.

With every group read (g = G) the layer is the MLP exactly, which the tests check.

Keys are stored input-major, ``group_keys`` [G, hidden, parts·s]: a token's products with one
group's keys are then a weighted sum of that group's ``hidden`` rows (weights = the token's
features), which ``embedding_bag`` computes straight from the chosen groups' rows with no
copy. Gathering the groups first (``index_select``) and multiplying costs more than the dense
MLP at batch 1, since the copy moves as many bytes as the product reads.

**Fact groups.** Groups inserted by knowledge editing can be *fact groups* (the last
``fact_groups`` groups): they are never among a token's top ``g``; a token reads a fact group
in addition when the router scores it above every regular group. An inserted fact then takes
no reads away from the groups the model was distilled with, on any input. A fact slot's
weight is floored at 0, so a fact below its threshold adds exactly nothing.

Three execution paths give the same sums: a single token (generation) reads its ``g`` groups'
keys and values with two ``embedding_bag`` calls; a batch without gradients dispatches the
tokens to their groups and multiplies group by group (an MoE dispatch, no padding); a batch
with gradients pads every group to the busiest one and uses two batched products, which keeps
the autograd graph small.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PLAIN_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
}
LEGACY_KEYS = "gate_up"  # the keys' name in the slot-major layout, [G, parts·s, hidden]


def current_name(name: str) -> str | None:
    """The current name of a tensor saved in the slot-major layout; None for any other."""
    head, _, leaf = name.rpartition(".")
    if leaf == LEGACY_KEYS and head.endswith("routed"):
        return f"{head}.group_keys"
    return None


def legacy_to_current(tensor: torch.Tensor) -> torch.Tensor:
    """Slot-major keys [G, parts·s, hidden] laid out input-major, [G, hidden, parts·s]."""
    return tensor.transpose(1, 2).contiguous()


SCRATCH_LIMIT = 1 << 23  # floats per scratch buffer (32 MiB): larger batches allocate

_scratch = threading.local()


def scratch(rows: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [rows, width] work buffers, reused by every layer's dispatched read in this
    thread. A fresh 10 MB buffer per layer is a fresh mapping from the allocator, and
    faulting its pages in cost as much as a third of the read; the buffers never leave the
    read (its output is a new tensor)."""
    if rows * width > SCRATCH_LIMIT:
        return like.new_empty(rows, width), like.new_empty(rows, width)
    held: torch.Tensor | None = getattr(_scratch, "buffer", None)
    if (held is None or held.dtype != like.dtype or held.device != like.device
            or held.shape[1] < rows * width):
        with torch.inference_mode(False):  # usable in and out of inference mode
            held = torch.empty(2, max(rows * width, 1 << 20), dtype=like.dtype,
                               device=like.device)
        _scratch.buffer = held
    return (held[0, : rows * width].view(rows, width),
            held[1, : rows * width].view(rows, width))


def cost_share(hidden: int, slots: int, group_size: int, groups_read: int, router_rank: int,
               neurons: int, gated: bool) -> float:
    """Multiply-adds per token of a routed read over those of an MLP of ``neurons``."""
    m = 3 if gated else 2
    groups = slots // group_size
    router = hidden * router_rank + router_rank * groups
    read = groups_read * group_size * hidden * m
    return (router + read) / (neurons * hidden * m)


class RoutedKeys(nn.Module):
    """Slot keys in contiguous groups and the router that chooses groups (see module doc).

    ``group_keys`` [G, hidden, parts·s] holds each group's keys (and, gated, its up keys right
    after them) input-major, so one product per group computes both; ``bias`` [G, parts·s]
    likewise. Files written before the input-major layout (``gate_up`` [G, parts·s, hidden])
    load through :func:`upgrade_legacy_tensor`.
    """

    _feature_rows: torch.Tensor  # [G, hidden]: row g·hidden + j of the input-major key table
    _slot_rows: torch.Tensor  # [G, s]: the slot numbers of each group
    _bag_starts: torch.Tensor  # [G]: g·hidden, where group g's bag of feature rows starts
    _group_starts: torch.Tensor  # [G]: g·s, where group g's bag of slots starts

    def __init__(self, hidden_size: int, slots: int, group_size: int, groups_read: int,
                 router_rank: int, activation: str, gated: bool) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.activation_name = activation
        # A plain function where one exists: calling the activation module costs a module
        # dispatch per read, which at batch 1 is a visible share of the whole layer.
        self.act = PLAIN_ACTIVATIONS.get(activation) or ACT2FN[activation]
        self.group_size = group_size
        self.groups_read = groups_read
        self.fact_groups = 0  # trailing groups read in addition (see the module docstring)
        self.parts = 2 if gated else 1
        groups = slots // group_size
        bound = 1 / math.sqrt(hidden_size)
        self.group_keys = nn.Parameter(
            torch.empty(groups, hidden_size, self.parts * group_size))
        nn.init.uniform_(self.group_keys, -bound, bound)
        self.bias = nn.Parameter(torch.zeros(groups, self.parts * group_size))
        self.router_down = nn.Parameter(torch.empty(router_rank, hidden_size))
        nn.init.uniform_(self.router_down, -bound, bound)
        self.router_up = nn.Parameter(torch.empty(groups, router_rank))
        nn.init.uniform_(self.router_up, -1 / math.sqrt(router_rank), 1 / math.sqrt(router_rank))
        self.router_bias = nn.Parameter(torch.zeros(groups))
        self._index_tables()

    def _index_tables(self) -> None:
        """Row numbers reused by every single-token read (not saved: rebuilt from the shapes,
        and again when groups are added). Indexing prepared tables costs one op where
        computing the rows would cost three, and at batch 1 each op costs as much as a read."""
        G, hidden, _ = self.group_keys.shape
        device = self.group_keys.device
        self.register_buffer("_feature_rows", torch.arange(G * hidden, device=device)
                             .view(G, hidden), persistent=False)
        self.register_buffer("_slot_rows", torch.arange(G * self.group_size, device=device)
                             .view(G, self.group_size), persistent=False)
        self.register_buffer("_bag_starts", torch.arange(G, device=device) * hidden,
                             persistent=False)
        self.register_buffer("_group_starts", torch.arange(G, device=device) * self.group_size,
                             persistent=False)

    @property
    def num_groups(self) -> int:
        return int(self.group_keys.shape[0])

    @property
    def num_slots(self) -> int:
        return self.num_groups * self.group_size

    @property
    def gated(self) -> bool:
        return self.parts == 2

    @property
    def keys(self) -> torch.Tensor:
        """Each slot's key, [slots, hidden] (a copy for gated memories)."""
        return self.group_keys[:, :, : self.group_size].transpose(1, 2).reshape(self.num_slots, -1)

    @property
    def up(self) -> torch.Tensor | None:
        if not self.gated:
            return None
        return self.group_keys[:, :, self.group_size:].transpose(1, 2).reshape(self.num_slots, -1)

    @torch.no_grad()
    def set_slots(self, keys: torch.Tensor, bias: torch.Tensor, up: torch.Tensor | None,
                  up_bias: torch.Tensor | None) -> None:
        """Write per-slot keys [slots, hidden] and biases [slots] into the grouped layout."""
        G, s = self.num_groups, self.group_size
        self.group_keys[:, :, :s] = keys.view(G, s, -1).transpose(1, 2)
        self.bias[:, :s] = bias.view(G, s)
        if self.gated:
            assert up is not None and up_bias is not None
            self.group_keys[:, :, s:] = up.view(G, s, -1).transpose(1, 2)
            self.bias[:, s:] = up_bias.view(G, s)

    def router_parameters(self) -> list[nn.Parameter]:
        return [self.router_down, self.router_up, self.router_bias]

    # -- routing ------------------------------------------------------------------------------
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The router's score of every group for rows of ``x`` [T, hidden]: [T, G]."""
        return F.linear(F.linear(x, self.router_down), self.router_up, self.router_bias)

    @property
    def regular_groups(self) -> int:
        """The groups that are not fact groups."""
        return self.num_groups - self.fact_groups

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The regular groups each row reads, [T, g] (all of them, in order, when g covers
        them); fact groups are routed by :meth:`route_facts`."""
        base = self.regular_groups
        g = min(self.groups_read, base)
        if g >= base:
            return torch.arange(base, device=x.device).expand(x.shape[0], -1)
        with torch.no_grad():
            scores = self.scores(x)
            return scores[:, :base].topk(g, dim=-1).indices

    def route_facts(self, x: torch.Tensor) -> torch.Tensor:
        """Which fact groups each row reads: [T, fact_groups] booleans, true where the
        router scores the fact group above every regular group."""
        base = self.regular_groups
        with torch.no_grad():
            scores = self.scores(x)
            return scores[:, base:] > scores[:, :base].max(dim=-1, keepdim=True).values

    def _fact_weights(self, pre: torch.Tensor) -> torch.Tensor:
        """A fact slot's weight: its activation, floored at 0. Below its threshold a fact
        adds nothing; SiLU's small negative tail, summed over many facts on every token,
        would otherwise drown the one that fires."""
        return self._weights(pre).clamp_min(0)

    def _read_facts(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
        """What the fact groups add to rows of ``x`` [T, hidden] (None: no row reads one)."""
        routed = self.route_facts(x)
        rows = routed.any(dim=-1).nonzero().view(-1)
        if rows.numel() == 0:
            return None
        base, s = self.regular_groups, self.group_size
        inputs = x.index_select(0, rows)
        pre = torch.einsum("th,nhw->tnw", inputs, self.group_keys[base:]) + self.bias[base:]
        weights = self._fact_weights(pre) * routed.index_select(0, rows).unsqueeze(-1).to(pre)
        facts = values[base * s:].view(self.fact_groups, s, -1)
        added = torch.einsum("tns,nsh->th", weights, facts)
        return x.new_zeros(x.shape[0], added.shape[-1]).index_add(0, rows, added)

    def _weights(self, pre: torch.Tensor) -> torch.Tensor:
        """Slot weights from pre-activations [..., parts·s] of whole groups: [..., s]."""
        s = self.group_size
        if self.gated:
            return self.act(pre[..., :s]) * pre[..., s:]
        return self.act(pre)

    def slot_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Every slot's weight for rows of ``x``: [T, slots]. Only for training targets,
        tracing and tests; the forward pass never computes it for a routed read."""
        pre = torch.baddbmm(self.bias.unsqueeze(1), x.unsqueeze(0).expand(self.num_groups, -1, -1),
                            self.group_keys)  # [G, T, parts·s]
        return self._weights(pre).transpose(0, 1).reshape(x.shape[0], -1)

    def slot_mass(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """How much each slot adds to the output, |weight|·‖value‖: [T, slots]."""
        return self.slot_weights(x).abs() * values.norm(dim=-1)

    def group_mass(self, x: torch.Tensor, values: torch.Tensor,
                   slot_mass: torch.Tensor | None = None) -> torch.Tensor:
        """Each group's share of the output: the sum of its slots' mass, [T, G]."""
        mass = self.slot_mass(x, values) if slot_mass is None else slot_mass
        return mass.view(x.shape[0], self.num_groups, self.group_size).sum(-1)

    # -- reading ------------------------------------------------------------------------------
    def read(self, x: torch.Tensor, values: torch.Tensor, out_bias: torch.Tensor) -> torch.Tensor:
        """``sum over read slots of weight_i·v_i + out_bias`` for rows of ``x`` [T, hidden]."""
        out = self._read_regular(x, values, out_bias)
        if self.fact_groups:
            facts = self._read_facts(x, values)
            if facts is not None:
                out = out + facts
        return out

    def _read_regular(self, x: torch.Tensor, values: torch.Tensor,
                      out_bias: torch.Tensor) -> torch.Tensor:
        base = self.regular_groups
        if self.groups_read >= base:
            if self.fact_groups:
                weights = self.slot_weights(x)[:, :base * self.group_size]
                return torch.addmm(out_bias, weights, values[:base * self.group_size])
            return torch.addmm(out_bias, self.slot_weights(x), values)
        chosen = self.route(x)
        if torch.is_grad_enabled() and x.shape[0] > 1:
            return self._read_padded(x, chosen, values, out_bias)
        if x.shape[0] == 1:
            return self._read_one(x, chosen.view(-1), values, out_bias)
        return self._read_dispatched(x, chosen, values, out_bias)

    def _read_one(self, x: torch.Tensor, chosen: torch.Tensor, values: torch.Tensor,
                  out_bias: torch.Tensor) -> torch.Tensor:
        """One token: keys and values of its groups read in place by two ``embedding_bag``
        (the aten op itself: the functional wrapper's checks cost as much as the read)."""
        keys: torch.Tensor = self.group_keys
        bias: torch.Tensor = self.bias
        if not torch.is_grad_enabled():
            # A table that requires grad sends embedding_bag down its training path (it
            # also builds bag maps for the backward pass), even with autograd switched off.
            keys, bias, values = keys.detach(), bias.detach(), values.detach()
        G, hidden, width = keys.shape
        g = chosen.numel()
        pre = torch.embedding_bag(keys.view(G * hidden, width),
                                  self._feature_rows.index_select(0, chosen).view(-1),
                                  self._bag_starts[:g], False, 0, False,
                                  x.expand(g, hidden).reshape(-1), False)[0]
        weight = self._weights(pre + bias.index_select(0, chosen))  # [g, s]
        # One bag per group, summed after: embedding_bag spreads bags over threads, and a
        # single bag would run on one.
        read = torch.embedding_bag(values, self._slot_rows.index_select(0, chosen).view(-1),
                                   self._group_starts[:g], False, 0, False,
                                   weight.reshape(-1), False)[0]
        return read.sum(0, keepdim=True) + out_bias

    def _dispatch(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token-group pairs sorted by group: (groups, tokens, count per group)."""
        flat = chosen.reshape(-1)
        groups, order = flat.sort(stable=True)
        tokens = torch.div(order, chosen.shape[1], rounding_mode="floor")
        counts = torch.bincount(flat, minlength=self.num_groups)
        return groups, tokens, counts

    def _read_dispatched(self, x: torch.Tensor, chosen: torch.Tensor, values: torch.Tensor,
                         out_bias: torch.Tensor) -> torch.Tensor:
        _, tokens, counts = self._dispatch(chosen)
        inputs, reads = scratch(tokens.numel(), x.shape[1], x)
        torch.index_select(x, 0, tokens, out=inputs)
        s = self.group_size
        begin = 0
        for group, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            end = begin + count
            pre = torch.addmm(self.bias[group], inputs[begin:end], self.group_keys[group])
            torch.mm(self._weights(pre), values[group * s:(group + 1) * s], out=reads[begin:end])
            begin = end
        out = out_bias.expand(x.shape[0], -1).clone()
        return out.index_add_(0, tokens, reads)

    def _read_padded(self, x: torch.Tensor, chosen: torch.Tensor, values: torch.Tensor,
                     out_bias: torch.Tensor) -> torch.Tensor:
        groups, tokens, counts = self._dispatch(chosen)
        capacity = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        place = groups * capacity + (torch.arange(groups.numel(), device=x.device)
                                     - starts[groups])
        G, s, hidden = self.num_groups, self.group_size, x.shape[1]
        padded = x.new_zeros(G * capacity, hidden).index_copy(
            0, place, x.index_select(0, tokens)).view(G, capacity, hidden)
        pre = torch.baddbmm(self.bias.unsqueeze(1), padded, self.group_keys)
        read = torch.bmm(self._weights(pre), values.view(G, s, hidden))
        out = out_bias.expand(x.shape[0], -1)
        return out.index_add(0, tokens, read.view(G * capacity, hidden).index_select(0, place))

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots each row reads and their weights, both [T, g·s], plus [T, f·s] for the
        f fact groups (for tracing). A fact group a row does not read stands there as the
        row's first regular slot with weight 0, so the sums are the read's."""
        chosen = self.route(x)
        s = self.group_size
        offsets = torch.arange(s, device=x.device)
        slots = (chosen.unsqueeze(-1) * s + offsets).flatten(1)
        weights = self.slot_weights(x)
        if self.fact_groups:
            base = self.regular_groups
            routed = self.route_facts(x).repeat_interleave(s, dim=1)  # [T, f·s]
            facts = (torch.arange(base, self.num_groups, device=x.device).unsqueeze(-1) * s
                     + offsets).flatten().expand(x.shape[0], -1)
            fact_slots = torch.where(routed, facts, slots[:, :1])
            fact_weights = weights[:, base * s:].clamp_min(0) * routed.to(weights)
            return (torch.cat([slots, fact_slots], dim=1),
                    torch.cat([weights.gather(-1, slots), fact_weights], dim=1))
        return slots, weights.gather(-1, slots)

    # -- growing ------------------------------------------------------------------------------
    @torch.no_grad()
    def add_group(self, keys: torch.Tensor, bias: torch.Tensor, up: torch.Tensor | None,
                  up_bias: torch.Tensor | None, router_row: tuple[torch.Tensor, float]) -> None:
        """Append one group: ``keys`` [s, hidden] and ``bias`` [s] (plus ``up`` keys and
        biases when gated) with its router row, (direction in rank space [r], bias).
        Parameters are replaced by larger ones, so an optimiser built before must be rebuilt.
        """
        def grow(param: nn.Parameter, extra: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(torch.cat([param.detach(), extra.to(param)]),
                                requires_grad=param.requires_grad)

        rows, biases = [keys], [bias]
        if self.gated:
            assert up is not None and up_bias is not None
            rows.append(up)
            biases.append(up_bias)
        self.group_keys = grow(self.group_keys, torch.cat(rows).t().unsqueeze(0))
        self.bias = grow(self.bias, torch.cat(biases).unsqueeze(0))
        direction, router_bias = router_row
        self.router_up = grow(self.router_up, direction.view(1, -1))
        self.router_bias = grow(self.router_bias, torch.tensor([router_bias]))
        self._index_tables()

    @torch.no_grad()
    def remove_last_group(self) -> None:
        """Drop the newest group (undoing :meth:`add_group` exactly, bit for bit)."""
        if self.num_groups <= 1:
            raise ValueError("a routed memory keeps at least one group")
        self.fact_groups = max(0, self.fact_groups - 1)
        for name in ("group_keys", "bias", "router_up", "router_bias"):
            param = getattr(self, name)
            setattr(self, name, nn.Parameter(param.detach()[:-1].clone(),
                                             requires_grad=param.requires_grad))
        self._index_tables()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        legacy = state_dict.pop(prefix + LEGACY_KEYS, None)
        if legacy is not None and prefix + "group_keys" not in state_dict:
            state_dict[prefix + "group_keys"] = legacy_to_current(legacy)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_slots} slots in {self.num_groups} groups of {self.group_size}, "
                f"read {self.groups_read} groups, router rank {self.router_down.shape[0]}, "
                f"activation {self.activation_name}, gated={self.gated}")


def router_recall(chosen: torch.Tensor, group_size: int, slot_mass: torch.Tensor) -> float:
    """The share of the oracle's top-k slot mass that the routed groups hold.

    ``slot_mass`` [T, slots] is each slot's |weight|·‖value‖; the oracle reads the top
    ``k = g·s`` slots of each token. Recall = sum of the oracle's top-k mass inside the
    routed groups / sum of the oracle's top-k mass (1.0: routing loses nothing the oracle
    would have read).
    """
    slots = slot_mass.shape[1]
    k = chosen.shape[1] * group_size
    top = slot_mass.topk(min(k, slots), dim=-1)
    groups_of_top = torch.div(top.indices, group_size, rounding_mode="floor")
    inside = (groups_of_top.unsqueeze(-1) == chosen.unsqueeze(1)).any(-1)
    total = top.values.sum().clamp_min(1e-12)
    return float((top.values * inside).sum() / total)


def router_loss(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the router's softmax against each token's share of group mass."""
    target = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(target * F.log_softmax(scores, dim=-1)).sum(-1).mean()
