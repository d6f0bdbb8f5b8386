"""Knowledge edits on a loaded student's featural memory: change, scale or delete entries, and
insert a fact as a new, routable entry.

Every operation returns an :class:`Edit`: the rows it touched with their state before and
after, enough to apply it again (replaying a journal) or to undo it exactly
(:mod:`engine.model.edit_journal` stores them).

**Inserting a fact** ("prompt → new answer", as ROME, Meng et al. 2022, but as a new row, not a
rewritten matrix). The key is the memory layer's input at the subject's last token of the
prompt, ``x*``. The new slot fires as ``act(β·(s(x) − c))`` with ``s(x) = (x − μ)·d / ‖d‖²``,
``d = x* − μ`` and ``μ`` the mean input over the other tokens of the edit contexts: 1 at
``x*``, near 0 for unrelated inputs. The slot is placed in a new routed group that the
router sends ``x*`` to (:meth:`FeaturalMemory.add_slots`), so it is found by routing like any
other entry. Its value is then fitted by a few Adam steps on that value alone, to raise the
new answer's log-probability after the prompt (and after a few generic prefixes, so it does
not depend on the prompt starting the text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.memory_layers.featural import FeaturalMemory
from engine.model.surgery import add_memory_slots, memory_layers, record_layer_size

GENERIC_PREFIXES = ("", "Here is a fact. ", "I read this today: ", "Note: ")
# c and β were chosen from how the keys of 100 CounterFact facts (records disjoint from the
# benchmark's) fire on each other's subjects at layer 22 of the default student: at c = 0.5,
# β = 8 a fact's prompt received about 6 other facts' worth of value (SiLU's negative tail
# summed over 99 facts, plus the 11% of pairs above c); at c = 0.7, β = 16 about 0.9, while
# paraphrases still read 57% of the slot's full weight on average.
FIRE_THRESHOLD = 0.7  # c: the share of the way from the mean input to x* where a slot starts
SHARPNESS = 16.0  # β: pre-activation at x* is β·(1 − c)
ROUTER_SELECTIVITY = 4.0  # how close an input must come to the key's query to route there
DECAY = 1e-3  # keeps the fitted value's norm near what the answer needs
EARLY_STOP_NLL = 0.3  # per answer token (p ≈ 0.74): fitting further only grows the value


@dataclass
class Edit:
    """One change to one memory layer: ``op`` is "value" (rows of the value table) or
    "insert" (a new group of slots); ``before``/``after`` hold the tensors to restore."""

    op: str
    layer: int
    slots: list[int]
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    after: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def featural_layer(model: nn.Module, layer: int) -> FeaturalMemory:
    layers = memory_layers(model)
    if not layers:
        raise InputError("this model has no memory layers; load a student")
    if layer not in layers:
        raise InputError(f"layer {layer} has no memory; this student's memory layers are "
                         f"{', '.join(map(str, sorted(layers)))}")
    module = layers[layer]
    if not isinstance(module, FeaturalMemory):
        raise InputError(f"layer {layer} is an associative memory; edit its entries in the "
                         "Memory pane or the store")
    return module


def check_slots(module: FeaturalMemory, layer: int, slots: list[int]) -> None:
    if not slots:
        raise InputError("name at least one entry (slot) to edit")
    bad = [s for s in slots if not 0 <= s < module.num_slots]
    if bad:
        raise InputError(f"entry {bad[0]} does not exist in layer {layer} "
                         f"(slots 0..{module.num_slots - 1})")


@torch.no_grad()
def set_values(model: nn.Module, layer: int, slots: list[int], values: torch.Tensor,
               *, note: str = "set") -> Edit:
    """Replace the value rows of ``slots`` with ``values`` [n, value_dim]."""
    module = featural_layer(model, layer)
    check_slots(module, layer, slots)
    index = torch.tensor(slots)
    if values.shape != (len(slots), module.values.shape[1]):
        raise InputError(f"values must be [{len(slots)}, {module.values.shape[1]}], not "
                         f"{list(values.shape)}")
    if not torch.isfinite(values).all():
        raise InputError("values must be finite numbers")
    edit = Edit("value", layer, list(slots), {"values": module.values[index].clone()},
                {"values": values.to(module.values).clone()}, {"what": note})
    apply_edit(model, edit)
    return edit


def scale_entries(model: nn.Module, layer: int, slots: list[int], factor: float) -> Edit:
    """Multiply the value rows of ``slots`` by ``factor`` (0 deletes them)."""
    if not torch.isfinite(torch.tensor(factor)):
        raise InputError(f"scale factor {factor} is not a finite number")
    module = featural_layer(model, layer)
    check_slots(module, layer, slots)
    current = module.values.detach()[torch.tensor(slots)]
    return set_values(model, layer, slots, current * factor,
                      note="delete" if factor == 0 else f"scale x{factor:g}")


def delete_entries(model: nn.Module, layer: int, slots: list[int]) -> Edit:
    """Zero the value rows of ``slots``: the entries add nothing from now on."""
    return scale_entries(model, layer, slots, 0.0)


@torch.no_grad()
def apply_edit(model: nn.Module, edit: Edit) -> None:
    """Bring the layer to the edit's "after" state (replaying or redoing it)."""
    module = featural_layer(model, edit.layer)
    if edit.op == "value":
        module.values[torch.tensor(edit.slots)] = edit.after["values"].to(module.values)
    elif edit.op == "insert":
        if module.num_slots != int(edit.info["first_slot"]):
            raise InputError(f"cannot replay the insert into layer {edit.layer}: it expects "
                             f"{edit.info['first_slot']} slots, the layer has "
                             f"{module.num_slots}")
        after = edit.after
        add_memory_slots(model, edit.layer, after["keys"], after["values"], after["query"],
                         selectivity=float(edit.info.get("selectivity", 1.0)),
                         fact=bool(edit.info.get("fact", False)))
        _set_group(module, len(edit.slots), after)
    else:
        raise InputError(f"unknown edit operation {edit.op!r}")


@torch.no_grad()
def undo_edit(model: nn.Module, edit: Edit) -> None:
    """Bring the layer back to the edit's "before" state."""
    module = featural_layer(model, edit.layer)
    if edit.op == "value":
        module.values[torch.tensor(edit.slots)] = edit.before["values"].to(module.values)
        return
    routed = module.routed
    assert routed is not None
    first = int(edit.info["first_slot"])
    if module.num_slots == first + routed.group_size:
        module.remove_last_group()  # the newest group: remove it, exactly as before
        record_layer_size(model, edit.layer)
        return
    # Later inserts follow: keep the layout, make the group unreachable and silent.
    group = first // routed.group_size
    module.values[first:first + routed.group_size] = 0
    routed.router_bias[group] = torch.finfo(routed.router_bias.dtype).min / 4
    routed.router_up[group] = 0


def _set_group(module: FeaturalMemory, count: int, after: dict[str, torch.Tensor]) -> None:
    """Write the fitted rows (bias and router row) of the group just added."""
    routed = module.routed
    assert routed is not None
    group = routed.num_groups - 1
    routed.bias[group, :count] = after["bias"].to(routed.bias)
    first = group * routed.group_size
    module.values[first:first + count] = after["values"].to(module.values)


def subject_last_token(tokenizer: Any, prompt: str, subject: str) -> int:
    """The index of the prompt token that ends the subject's last occurrence."""
    if not subject.strip():
        raise InputError("the subject is empty; name the thing the fact is about")
    start = prompt.rfind(subject)
    if start < 0:
        raise InputError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    end = start + len(subject)
    encoded = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    for index, (begin, finish) in enumerate(encoded["offset_mapping"]):
        if begin < end <= finish or finish == end:
            return index
    return len(encoded["input_ids"]) - 1


def target_ids(tokenizer: Any, target: str, *, leading_space: bool = True) -> list[int]:
    """The answer's tokens as they follow a prompt: after a space mid-text, as they are at
    the start of a chat reply (``leading_space=False``)."""
    text = " " + target.lstrip() if leading_space else target.lstrip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not target.strip() or not ids:
        raise InputError(f"the new answer {target!r} tokenises to nothing; give some text")
    return list(ids)


def layer_inputs(model: nn.Module, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The memory layer's input for each token of ``ids`` [1, T]: [T, hidden]."""
    module = featural_layer(model, layer)
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(
        lambda _m, inputs: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1]).detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


def default_layer(model: nn.Module, tokenizer: Any, prompt: str,
                  ids: torch.Tensor | None = None) -> int:
    """The routed memory layer whose reads the trace of ``prompt`` (or its token ``ids``
    [1, T]) ranks highest."""
    from engine.model.memory_trace import trace_ids

    if ids is None:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    routed = [layer for layer, m in memory_layers(model).items()
              if isinstance(m, FeaturalMemory) and m.routed is not None]
    if not routed:
        raise InputError("inserting a fact needs a routed memory layer (keys=routed); this "
                         "student has none")
    ranking = [layer for layer in trace_ids(model, ids).layer_ranking() if layer in routed]
    return ranking[0] if ranking else routed[0]


def insert_fact(model: nn.Module, tokenizer: Any, prompt: str, subject: str, target: str, *,
                layer: int | None = None, steps: int = 25, lr: float = 0.5,
                wrap: Callable[[str], str] | None = None) -> Edit:
    """Insert "``prompt`` → ``target``" as one new slot of a routed layer (module docstring).

    ``wrap`` turns a prompt into the model's whole input text, such as a chat rendered
    through its template with the prompt as the last user message; the answer is then fitted
    as the start of the reply. An empty ``subject`` takes the key at the input's last token
    (where the answer is predicted): it needs no later layer to carry the fact there, but
    fires for any input that ends the same way, so it is less specific."""
    if not prompt.strip():
        raise InputError("the prompt is empty; give the text that should lead to the answer")
    answer = target_ids(tokenizer, target, leading_space=wrap is None)

    def encode(text: str) -> torch.Tensor:
        if wrap is None:
            return tokenizer(text, return_tensors="pt")["input_ids"]
        return tokenizer(wrap(text), add_special_tokens=False, return_tensors="pt")["input_ids"]

    prompt_ids = encode(prompt)
    if not subject.strip():  # no subject named: the key is the input's last token
        position = prompt_ids.shape[1] - 1
    elif wrap is None:
        position = subject_last_token(tokenizer, prompt, subject)
        position += prompt_ids.shape[1] - len(tokenizer(prompt, add_special_tokens=False)
                                              ["input_ids"])
    else:
        if subject not in prompt:
            raise InputError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
        position = subject_last_token(tokenizer, wrap(prompt), subject)
    chosen = default_layer(model, tokenizer, prompt, prompt_ids) if layer is None else layer
    module = featural_layer(model, chosen)
    routed = module.routed
    if routed is None:
        raise InputError(f"layer {chosen} has {module.config.keys} keys; inserting a fact "
                         "needs routed keys")
    contexts = [encode(prefix + prompt) for prefix in GENERIC_PREFIXES]
    query = layer_inputs(model, chosen, prompt_ids)[position]
    others = torch.cat([layer_inputs(model, chosen, ids) for ids in contexts])
    far = (others - query).norm(dim=-1) > 1e-3 * query.norm()
    mean = others[far].mean(0) if far.any() else torch.zeros_like(query)
    direction = query - mean
    scale = direction.pow(2).sum().clamp_min(1e-12)
    key = SHARPNESS * direction / scale
    bias = -SHARPNESS * (float(mean @ direction) / float(scale) + FIRE_THRESHOLD)
    first = module.num_slots
    hidden = query.shape[0]
    slots = add_memory_slots(model, chosen, key.view(1, -1), torch.zeros(1, hidden), query,
                             selectivity=ROUTER_SELECTIVITY, fact=True)
    with torch.no_grad():
        routed.bias[routed.num_groups - 1, 0] = bias
    value = _fit_value(model, module, first, contexts, answer, steps, lr)
    return Edit("insert", chosen, slots, {}, {
        "keys": key.view(1, -1).clone(), "values": value.view(1, -1).clone(),
        "query": query.clone(), "bias": torch.tensor([bias])},
        {"first_slot": first, "prompt": prompt, "subject": subject, "target": target,
         "selectivity": ROUTER_SELECTIVITY, "fact": True})


def _fit_value(model: nn.Module, module: FeaturalMemory, slot: int,
               contexts: list[torch.Tensor], answer: list[int], steps: int,
               lr: float) -> torch.Tensor:
    """A few Adam steps on the value of ``slot`` alone: raise log p(answer | context)."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    values = module.values
    values.requires_grad_(True)
    reference = values.detach()[:slot].norm(dim=-1).median().clamp_min(1e-6)
    target = torch.tensor(answer)
    # One right-padded batch: pads only follow real tokens, which causal attention never
    # lets the real tokens see, so no mask is needed.
    sequences = [torch.cat([ids[0], target[:-1]]) for ids in contexts]
    batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    rows = torch.arange(len(sequences)).repeat_interleave(len(answer))
    columns = torch.cat([torch.arange(len(answer)) + ids.shape[1] - 1 for ids in contexts])
    targets = target.repeat(len(sequences))
    # Adam moves every coordinate by about lr per step: scaled so that the row moves about
    # lr times a typical value's norm per step.
    step = float(lr) * float(reference) / values.shape[1] ** 0.5
    optimizer = torch.optim.Adam([values], lr=step)
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            logits = model(input_ids=batch).logits[rows, columns]
            # Summed over the answer's tokens: its first token, the one the prompt decides,
            # is not outweighed by the ones that follow from it.
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            if float(nll.detach()) / len(targets) < EARLY_STOP_NLL:
                break  # the answer is already likely after every context
            loss = nll / len(sequences)
            row = values[slot]
            loss = loss + DECAY * row.pow(2).sum() / reference.pow(2)
            loss.backward()
            assert values.grad is not None
            grad = values.grad[slot].clone()
            values.grad.zero_()
            values.grad[slot] = grad  # only the new value moves
            optimizer.step()
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags.get(name, False))
        model.train(was_training)
    return values.detach()[slot].clone()
