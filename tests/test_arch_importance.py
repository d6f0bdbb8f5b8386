"""Parameter counts per part, head importance (Michel et al.), neuron and memory-slot usage."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import mlp_of
from engine.model.architecture.attention import attention_shape, output_projection
from engine.model.architecture.counts import format_counts, parameter_counts
from engine.model.architecture.gates import insert_gates
from engine.model.architecture.heads import prune_heads
from engine.model.architecture.importance import (
    choose_heads,
    head_importance,
    memory_usage,
    mlp_usage,
    random_head_order,
)
from engine.model.surgery import convert
from engine.model.tiny import tiny_model


def _ids(rows: int = 4, tokens: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 259, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def _unique_total(model: nn.Module) -> int:
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.untyped_storage().data_ptr() + int(p.storage_offset())] = p.numel()
    return sum(seen.values())


def _zero_head(model: nn.Module, layer: int, head: int) -> None:
    """Zero ``head``'s columns of the output projection: its output never reaches the stream."""
    projection: nn.Module = output_projection(model, layer)
    head_dim = attention_shape(model, layer).head_dim
    cols = slice(head * head_dim, (head + 1) * head_dim)
    with torch.no_grad():
        weight = projection.weight
        assert isinstance(weight, torch.Tensor)
        if type(projection).__name__ == "Conv1D":  # [in, out]
            weight[cols].zero_()
        else:  # Linear [out, in]
            weight[:, cols].zero_()


def _scale_head(model: nn.Module, layer: int, head: int, factor: float) -> None:
    projection: nn.Module = output_projection(model, layer)
    head_dim = attention_shape(model, layer).head_dim
    cols = slice(head * head_dim, (head + 1) * head_dim)
    with torch.no_grad():
        weight = projection.weight
        assert isinstance(weight, torch.Tensor)
        if type(projection).__name__ == "Conv1D":
            weight[cols] *= factor
        else:
            weight[:, cols] *= factor


def _loss(model: nn.Module, ids: torch.Tensor) -> float:
    """The causal-LM loss in the model's own precision (Hugging Face's upcasts to float32)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1)))


# --- parameter counts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def student() -> nn.Module:
    return convert(tiny_model("llama"), [1], "featural", keys="flat", slots=64, topk=8)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_counts_total_equals_unique_parameters(family: str) -> None:
    model = tiny_model(family)
    counts = parameter_counts(model)
    assert counts.total == sum(p.numel() for p in model.parameters()) == _unique_total(model)
    assert counts.lm_head == 0  # tied to the token embedding: counted once, there
    hidden, vocab = 64, 259
    positions = 1024 * hidden if family == "gpt2" else 0
    assert counts.embeddings == vocab * hidden + positions
    assert len(counts.layers) == 4
    layer = counts.layers[0]
    if family == "gpt2":  # c_attn (3 projections) and c_proj, with biases; fc and proj
        assert layer.attention == 4 * hidden * hidden + 4 * hidden
        assert layer.mlp == 2 * hidden * 128 + 128 + hidden
        assert layer.norms == 4 * hidden
    else:  # 4 heads for q and o, 2 key/value heads of 16; SwiGLU without biases
        assert layer.attention == 2 * hidden * hidden + 2 * hidden * 32
        assert layer.mlp == 3 * hidden * 128
        assert layer.norms == 2 * hidden
    assert layer.memory == layer.head_gates == layer.other == 0
    json.dumps(counts.as_dict())


def test_untied_head_is_counted() -> None:
    model = tiny_model("llama", tie_word_embeddings=False)
    counts = parameter_counts(model)
    assert counts.lm_head == 259 * 64
    assert counts.total == sum(p.numel() for p in model.parameters())


def test_counts_of_a_student_gates_and_feedback(student: nn.Module) -> None:
    counts = parameter_counts(student)
    assert counts.total == sum(p.numel() for p in student.parameters())
    memory = mlp_of(student, 1)
    assert counts.layers[1].mlp == 0
    assert counts.layers[1].memory == sum(p.numel() for p in memory.parameters()) > 0
    assert counts.layers[0].memory == 0 and counts.layers[0].mlp > 0

    gated = insert_gates(tiny_model("gpt2"), [2])
    gated.mindset_feedback = nn.Linear(64, 8)
    counts = parameter_counts(gated)
    assert counts.layers[2].head_gates == 4 and counts.layers[1].head_gates == 0
    assert counts.layers[2].attention == parameter_counts(tiny_model("gpt2")).layers[2].attention
    assert counts.feedback == 64 * 8 + 8
    assert counts.total == sum(p.numel() for p in gated.parameters())


def test_format_counts_lines(student: nn.Module) -> None:
    before, after = parameter_counts(tiny_model("llama")), parameter_counts(student)
    lines = format_counts(before, after)
    assert lines[-1].startswith("total")
    assert f"{before.total:,}" in lines[-1] and f"{after.total:,}" in lines[-1]
    assert f"{after.total - before.total:+,}" in lines[-1]
    layer_lines = [line for line in lines if line.strip().startswith("layer 1:")]
    assert len(layer_lines) == 1 and "memory layers +" in layer_lines[0]
    assert not any(line.strip().startswith("layer 0:") for line in lines)  # unchanged
    assert any(line.startswith("embeddings") and "no change" in line for line in lines)


# --- head importance ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dead_head_scores_zero_and_ranks_first(family: str) -> None:
    model = tiny_model(family)
    _zero_head(model, 1, 2)
    ids = _ids()
    result = head_importance(model, ids, batch_size=3)
    assert result.raw[1][2] == 0.0 and result.normalised[1][2] == 0.0
    assert result.ranked()[0] == (1, 2, 0.0)
    assert all(score > 0 for layer, head, score in result.ranked()[1:])
    for scores in result.normalised:  # per-layer L2 normalisation
        assert sum(s * s for s in scores) == pytest.approx(1.0)
    # Removing the least important head moves the loss less than removing the most important.
    base = _loss(model, ids)
    most = result.ranked()[-1]
    without_least, without_most = copy.deepcopy(model), copy.deepcopy(model)
    _zero_head(without_least, 1, 2)
    _zero_head(without_most, most[0], most[1])
    assert abs(_loss(without_least, ids) - base) < abs(_loss(without_most, ids) - base)


def test_importance_is_the_mask_gradient() -> None:
    """One batch: raw importance equals |dL/dξ| by a central finite difference."""
    model = tiny_model("llama").double()
    ids = _ids(rows=2, tokens=10)
    result = head_importance(model, ids, batch_size=2)
    eps = 1e-2  # central differences: O(eps^2); Llama's norms compute in float32 anyway
    for layer, head in [(0, 1), (3, 2)]:
        up, down = copy.deepcopy(model), copy.deepcopy(model)
        _scale_head(up, layer, head, 1 + eps)
        _scale_head(down, layer, head, 1 - eps)
        derivative = (_loss(up, ids) - _loss(down, ids)) / (2 * eps)
        assert result.raw[layer][head] == pytest.approx(abs(derivative), rel=1e-3)


def test_importance_leaves_the_model_unchanged() -> None:
    model = tiny_model("gpt2")
    model.transformer.wpe.weight.requires_grad_(False)
    model.train()
    ids = _ids()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    head_importance(model, ids)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_gates_are_reported_and_do_not_change_importance() -> None:
    model = tiny_model("llama")
    gated = insert_gates(model, [0])
    ids = _ids()
    plain, result = head_importance(model, ids), head_importance(gated, ids)
    assert result.gates[0] == pytest.approx([0.5] * 4)
    assert result.gates[1:] == [None, None, None] and plain.gates == [None] * 4
    for a, b in zip(plain.raw, result.raw, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-8)
    json.dumps(result.as_dict())


def test_head_counts_per_layer_and_bad_requests() -> None:
    model = prune_heads(tiny_model("gpt2"), {0: [1]})
    result = head_importance(model, _ids(rows=2))
    assert [len(scores) for scores in result.raw] == [3, 4, 4, 4]
    assert len(result.ranked()) == 15
    with pytest.raises(InputError):
        head_importance(model, _ids(tokens=1))
    with pytest.raises(InputError):
        head_importance(model, torch.full((1, 4), 999))
    with pytest.raises(InputError):
        head_importance(model, _ids(), batch_size=0)


def test_random_order_and_choose_heads() -> None:
    model = tiny_model("llama")
    order = random_head_order(model, 7)
    assert sorted(order) == [(layer, head) for layer in range(4) for head in range(4)]
    assert order == random_head_order(model, 7) != random_head_order(model, 8)

    # Layer 0's heads come first: min_per_layer keeps its last one, the next candidates fill in.
    ranked = [(layer, head, 0.1 * i) for i, (layer, head) in
              enumerate((layer, head) for layer in range(4) for head in range(4))]
    chosen = choose_heads(ranked, 0.25)
    assert chosen == {0: [0, 1, 2], 1: [0]}
    assert choose_heads(ranked, 0.5, min_per_layer=2) == {0: [0, 1], 1: [0, 1], 2: [0, 1],
                                                          3: [0, 1]}
    assert choose_heads(order, 0.0) == {}
    taken = choose_heads(order, 0.7)
    assert sum(len(heads) for heads in taken.values()) == int(0.7 * 16)
    assert all(len(heads) <= 3 for heads in taken.values())
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(InputError):
            choose_heads(ranked, bad)
    with pytest.raises(InputError):  # 3 of 4 heads per layer at most
        choose_heads(ranked, 0.85)
    with pytest.raises(InputError):
        choose_heads(ranked, 0.5, min_per_layer=0)
    with pytest.raises(InputError):
        choose_heads([*ranked, ranked[0]], 0.5)


# --- usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mlp_usage_and_a_dead_neuron(family: str) -> None:
    model = tiny_model(family)
    with torch.no_grad():
        if family == "gpt2":
            mlp = model.transformer.h[2].mlp
            mlp.c_fc.weight[:, 5].zero_()
            mlp.c_fc.bias[5].zero_()
        else:
            model.model.layers[2].mlp.gate_proj.weight[5].zero_()
    ids = _ids()
    usage = mlp_usage(model, ids, batch_size=3)
    assert sorted(usage) == [0, 1, 2, 3]
    layer = usage[2]
    assert layer.neurons == 128 and layer.tokens == ids.numel()
    assert layer.mean_abs[5] == 0.0 and layer.active[5] == 0.0
    assert 5 in layer.never_active()
    assert all(0.0 <= share <= 1.0 for share in layer.active)
    assert layer.summary()["never_active_share"] == pytest.approx(
        len(layer.never_active()) / 128)
    assert sum(1 for share in usage[1].active if share > 0) > 64
    json.dumps(layer.as_dict())


def test_mlp_usage_skips_memory_layers(student: nn.Module) -> None:
    assert sorted(mlp_usage(student, _ids())) == [0, 2, 3]


def test_memory_usage_counts_reads(student: nn.Module) -> None:
    ids = _ids(rows=3, tokens=10)
    usage = memory_usage(student, ids, batch_size=2)
    assert list(usage) == [1]
    layer = usage[1]
    assert layer.kind == "featural" and layer.slots == 64
    assert layer.total_reads == ids.numel() * 8  # top-8 slots per token
    assert all(0 <= n <= ids.numel() for n in layer.reads)
    top = layer.top(5)
    assert [n for _, n in top] == sorted(layer.reads, reverse=True)[:5]
    assert layer.never_read_share() == sum(1 for n in layer.reads if n == 0) / 64
    json.dumps(layer.as_dict())
    with pytest.raises(InputError):
        memory_usage(tiny_model("llama"), ids)


def test_associative_usage_leaves_the_cache_alone() -> None:
    model = convert(tiny_model("gpt2"), [2], "associative")
    memory: Any = mlp_of(model, 2)
    key_dim = memory.config.key_dim
    generator = torch.Generator().manual_seed(3)
    memory.fill(torch.randn(20, key_dim, generator=generator),
                torch.randn(20, 64, generator=generator))
    hits, clock = memory.cache.hits.copy(), memory.cache.clock
    ids = _ids(rows=2, tokens=8)
    usage = memory_usage(model, ids)[2]
    assert usage.kind == "associative" and usage.slots == 20
    assert usage.total_reads == ids.numel() * min(memory.config.topk, 20)
    assert len(memory.cache) == 20 and memory.cache.clock == clock
    assert (memory.cache.hits == hits).all() and memory.counting
    assert memory.trace_reads is None
