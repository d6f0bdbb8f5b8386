"""Grow or shrink the slot count of one memory layer in a student.

What can be resized (featural memories, see :mod:`engine.model.memory_layers.featural`):

* **Flat keys** (``keys="flat"``): slot ``i`` adds ``a_i(x) · v_i`` with
  ``a_i(x) = act(x·k_i + b_i)`` (times ``x·u_i + e_i`` when gated). Growing appends slots
  whose keys and biases are drawn from a normal distribution with the mean and standard
  deviation of the existing ones and whose values are zero: they add ``a_i · 0``, so the layer
  is unchanged. That holds only when every slot is read (``topk=0``, the default): under a
  top-k read a new slot could take a read from an old one, so growth is refused there.
  Shrinking removes the named slots, the least used on calibration text, or (neither given)
  those with the smallest value norm.
* **Routed keys** (``keys="routed"``): slots live in groups of ``group_size`` and a router
  picks each token's groups, so sizes move by whole groups. Growing appends groups with keys
  drawn as above, zero values, and a router row that scores them ``ROUTER_FLOOR`` below every
  existing group's bias: no token routes to them, the read count stays, and the layer is
  unchanged (with zero values it stays so even when every group is read). They learn once
  they are read: train with a higher read share (``FeaturalMemory.set_read_share``). Shrinking
  removes whole groups: the named ones (every slot of each), the least used on calibration
  text, or the ones with the smallest value mass; each token still reads as many groups as
  before.

The new size is written to ``StudentSpec.layer_hparams`` (``record_layer_size``), which
``load_student_model`` reads to rebuild the layer, so a saved student reloads with it. That
rebuild allows flat keys at most, and routed keys at least, the teacher MLP's neuron count,
and so does resizing.

**Usage** of slot ``i`` on calibration tokens ``t`` (what the layer actually reads):
``mean_t read_i(t) · |a_i(x_t)| · ‖v_i‖``, with ``read_i(t)`` 1 when token ``t`` reads the
slot (its group is routed, or it is among the top-k) and 0 otherwise.

Not resizable: product keys (their ``num_subkeys²`` slots form a grid; convert again with
another ``num_subkeys``), associative memories (their store grows by itself up to
``capacity``; convert with the capacity wanted), and routed layers holding inserted facts
(undo the facts first).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import mlp_io, mlp_of, mlp_size, unwrap
from engine.model.architecture.mlp import check_calibration_ids
from engine.model.memory_layers.config import FeaturalConfig
from engine.model.memory_layers.featural import FeaturalMemory
from engine.model.surgery import memory_config, record_layer_size, student_spec

ROUTER_FLOOR = 1e4  # how far below every existing group a new routed group scores


# --- what a layer is -------------------------------------------------------------------------


def _memory(student: nn.Module, layer: int) -> FeaturalMemory:
    """The resizable memory of ``layer`` (flat or routed featural keys), checked."""
    spec = student_spec(student)
    if spec is None:
        raise InputError("this model is not a student; resizing memory layers needs one "
                         "(convert a teacher first)")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in spec.layers:
        raise InputError(f"layer {layer!r} has no memory layer; this student's memory layers "
                         f"are {', '.join(map(str, spec.layers)) or 'none'}")
    module = mlp_of(student, layer)
    if not isinstance(module, FeaturalMemory):
        raise InputError(f"layer {layer} holds an associative memory, whose store grows by "
                         "itself up to its capacity; convert with the capacity you want")
    if module.product is not None:
        raise InputError(f"layer {layer} has product keys, whose num_subkeys² slots form a "
                         "grid that cannot gain or lose single slots; convert again with "
                         "another num_subkeys")
    if module.routed is not None and module.routed.fact_groups:
        raise InputError(f"layer {layer} holds inserted facts, which must stay the last "
                         "groups; undo the facts before resizing it")
    return module


def memory_slots(student: Any, layer: int) -> int:
    """The slot count of ``layer``'s flat or routed memory."""
    return _memory(unwrap(student), layer).num_slots


# --- usage -----------------------------------------------------------------------------------


def slot_usage(student: Any, layer: int, calibration_ids: torch.Tensor) -> torch.Tensor:
    """How much each slot of ``layer`` adds where it is read, averaged over the tokens of
    ``calibration_ids`` [batch, tokens]: [slots] (float32; see the module docstring)."""
    source = unwrap(student)
    memory = _memory(source, layer)
    ids = check_calibration_ids(source, calibration_ids).to(next(source.parameters()).device)
    x = mlp_io(source, ids, [layer])[layer][0].float()
    return _usage(memory, x)


@torch.no_grad()
def _usage(memory: FeaturalMemory, x: torch.Tensor) -> torch.Tensor:
    norms = memory.values.detach().float().norm(dim=-1)
    routed, flat = memory.routed, memory.flat
    if routed is not None:
        work = x.to(routed.group_keys.dtype)
        weights = routed.slot_weights(work).abs().float()
        read = torch.zeros(x.shape[0], routed.num_groups, dtype=torch.bool, device=x.device)
        read.scatter_(1, routed.route(work), True)
        read = read.repeat_interleave(routed.group_size, dim=1)
    else:
        assert flat is not None
        weights = flat.weights(x.to(flat.keys.dtype)).abs().float()
        read = torch.zeros_like(weights, dtype=torch.bool)
        read.scatter_(1, weights.topk(memory.config.effective_topk, dim=-1).indices, True)
    return ((weights * read).mean(0) * norms).cpu()




# --- the request -----------------------------------------------------------------------------


def _new_config(student: nn.Module, layer: int, memory: FeaturalMemory,
                slots: int) -> FeaturalConfig:
    """The layer's config at ``slots`` slots, checked to be buildable and reloadable."""
    config = memory.config
    neurons = mlp_size(student)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise InputError(f"slots={slots!r}: give a positive whole number of slots")
    if slots == config.slots:
        raise InputError(f"layer {layer} already has {slots} slots; give a different size")
    if memory.flat is not None:
        if slots > config.slots and config.topk:
            raise InputError(f"layer {layer} reads its top-{config.topk} slots, so new slots "
                             "would take reads from the old ones; only a layer that reads "
                             "every slot (topk=0) grows without changing what it computes")
        if slots > neurons:
            raise InputError(f"slots={slots}: a saved student rebuilds flat keys with at most "
                             f"the teacher MLP's {neurons} neurons; give slots <= {neurons}")
        if config.topk > slots:
            raise InputError(f"slots={slots} is fewer than the {config.topk} slots the layer "
                             f"reads (topk); give slots >= {config.topk}")
        new = dataclasses.replace(config, slots=slots)
    else:
        size = config.group_size
        if slots % size:
            raise InputError(f"slots={slots}: routed keys come in groups of {size}; give a "
                             f"multiple of {size}")
        if slots < neurons:
            raise InputError(f"slots={slots}: a saved student rebuilds routed keys with at "
                             f"least the teacher MLP's {neurons} neurons; give slots >= "
                             f"{neurons}")
        # The read count stays: more groups must not change outputs, fewer keep the cost.
        new = dataclasses.replace(config, slots=slots,
                                  groups_fixed=min(config.groups_read, slots // size))
    new.validate()
    spec = student_spec(student)
    assert spec is not None
    own = {**spec.layer_hparams.get(str(layer), {}), "slots": new.slots,
           "groups_fixed": new.groups_fixed, "fact_groups": new.fact_groups}
    memory_config(student, spec.kind, {**spec.hparams, **own})  # what loading will build
    return new


def _removal(memory: FeaturalMemory, layer: int, slots: int, remove: list[int] | None
             ) -> list[int] | None:
    """The named slots to remove, checked (None when none are named)."""
    current = memory.num_slots
    if remove is None:
        return None
    chosen = list(remove)
    for index in chosen:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < current:
            raise InputError(f"slot {index!r} is out of range: layer {layer} has {current} "
                             f"slots (0..{current - 1})")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"slot indexes {chosen} repeat; name each once")
    if len(chosen) != current - slots:
        raise InputError(f"shrinking layer {layer} from {current} to {slots} slots removes "
                         f"{current - slots}, but {len(chosen)} are named")
    routed = memory.routed
    if routed is not None:
        size = routed.group_size
        groups = {index // size for index in chosen}
        if len(groups) * size != len(chosen):
            raise InputError(f"routed keys drop whole groups: name every slot of each group "
                             f"(group g is slots g*{size} to g*{size}+{size - 1})")
    return sorted(chosen)


# --- resizing --------------------------------------------------------------------------------


def _draw(like: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` new rows from N(mean, std) of ``like``'s entries (constant when they are)."""
    values = like.detach().float()
    mean = values.mean()
    std = values.std() if values.numel() > 1 else torch.tensor(0.0)
    if not torch.isfinite(std):
        std = torch.tensor(0.0)
    noise = torch.randn((count, *like.shape[1:]), generator=generator)
    return (noise * std + mean).to(like)


def _param(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.detach().to(old).contiguous(), requires_grad=old.requires_grad)


@torch.no_grad()
def _grow_flat(memory: FeaturalMemory, add: int, generator: torch.Generator) -> None:
    flat = memory.flat
    assert flat is not None
    for name in ("keys", "bias", "up", "up_bias"):
        old = getattr(flat, name)
        if old is not None:
            setattr(flat, name, _param(old, torch.cat([old, _draw(old, add, generator)])))
    memory.values = _param(memory.values, torch.cat(
        [memory.values, memory.values.new_zeros(add, memory.values.shape[1])]))


@torch.no_grad()
def _grow_routed(memory: FeaturalMemory, add: int, generator: torch.Generator) -> None:
    routed = memory.routed
    assert routed is not None
    size, hidden = routed.group_size, routed.group_keys.shape[1]
    per_slot = routed.keys.float()  # [slots, hidden]
    up = routed.up
    bias = routed.bias.detach().float()
    floor = float(routed.router_bias.detach().float().min()) - ROUTER_FLOOR
    direction = torch.zeros(routed.router_up.shape[1])
    for _ in range(add // size):
        keys = _draw(per_slot, size, generator)
        key_bias = _draw(bias[:, :size].reshape(-1, 1), size, generator).view(-1)
        up_rows = up_bias = None
        if up is not None:
            up_rows = _draw(up.float(), size, generator)
            up_bias = _draw(bias[:, size:].reshape(-1, 1), size, generator).view(-1)
        routed.add_group(keys, key_bias, up_rows, up_bias, (direction, floor))
    memory.values = _param(memory.values, torch.cat(
        [memory.values, memory.values.new_zeros(add, hidden)]))


@torch.no_grad()
def _keep_slots(memory: FeaturalMemory, keep: torch.Tensor) -> None:
    """Keep only the slots ``keep`` (sorted indexes; whole groups for routed keys)."""
    routed, flat = memory.routed, memory.flat
    if routed is not None:
        size = routed.group_size
        groups = keep.view(-1, size)[:, 0] // size
        for name in ("group_keys", "bias", "router_up", "router_bias"):
            old = getattr(routed, name)
            setattr(routed, name, _param(old, old.index_select(0, groups.to(old.device))))
        routed._index_tables()  # the row tables follow the group count
    else:
        assert flat is not None
        for name in ("keys", "bias", "up", "up_bias"):
            old = getattr(flat, name)
            if old is not None:
                setattr(flat, name, _param(old, old.index_select(0, keep.to(old.device))))
    memory.values = _param(memory.values,
                           memory.values.index_select(0, keep.to(memory.values.device)))


def _scores(memory: FeaturalMemory, usage: torch.Tensor | None) -> torch.Tensor:
    """Per removable unit (a slot; a group for routed keys), lowest first to go."""
    per_slot = usage if usage is not None else memory.values.detach().float().norm(dim=-1).cpu()
    routed = memory.routed
    if routed is not None:
        return per_slot.view(routed.num_groups, routed.group_size).sum(-1)
    return per_slot


def resize_memory(student: Any, layer: int, slots: int, *, remove: list[int] | None = None,
                  calibration_ids: torch.Tensor | None = None, seed: int = 0) -> nn.Module:
    """A copy of ``student`` whose memory at ``layer`` holds ``slots`` slots.

    Growing leaves the student's function unchanged. Shrinking removes the slots named in
    ``remove`` (exactly as many as the size drops by; whole groups for routed keys), else the
    least used on ``calibration_ids`` [batch, tokens] (see :func:`slot_usage`), else those
    with the smallest values. The new size is recorded in the spec, so a save reloads it.
    See the module docstring for what each kind supports.
    """
    source = unwrap(student)
    memory = _memory(source, layer)
    current = memory.num_slots
    config = _new_config(source, layer, memory, slots)
    if slots > current and (remove is not None or calibration_ids is not None):
        raise InputError("remove and calibration_ids choose slots to drop; growing takes "
                         "neither")
    if remove is not None and calibration_ids is not None:
        raise InputError("give either remove=[slot indexes] or calibration_ids, not both")
    named = _removal(memory, layer, slots, remove)
    usage = None
    if slots < current and named is None and calibration_ids is not None:
        usage = slot_usage(source, layer, calibration_ids)

    result = copy.deepcopy(source)
    target = mlp_of(result, layer)
    assert isinstance(target, FeaturalMemory)
    if slots > current:
        generator = torch.Generator().manual_seed(seed)
        if target.flat is not None:
            _grow_flat(target, slots - current, generator)
        else:
            _grow_routed(target, slots - current, generator)
    else:
        if named is None:
            scores = _scores(target, usage)
            unit = target.routed.group_size if target.routed is not None else 1
            drop_units = scores.argsort(stable=True)[:(current - slots) // unit].tolist()
            named = sorted(u * unit + i for u in drop_units for i in range(unit))
        dropped = set(named)
        _keep_slots(target, torch.tensor([i for i in range(current) if i not in dropped],
                                         dtype=torch.long))
    target.config = config
    if target.routed is not None:
        target.routed.groups_read = config.groups_read
    record_layer_size(result, layer)
    return result
