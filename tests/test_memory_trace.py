"""Memory trace: reads recorded by the layers themselves, influences that sum as documented."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InputError
from engine.model.loading import load_model
from engine.model.memory_trace import memory_trace, trace_ids
from engine.model.surgery import convert, memory_layers

CASES = {
    "flat-topk": ("tiny-llama", "featural", dict(keys="flat", topk=16)),
    "flat-dense": ("tiny-gpt2", "featural", dict(keys="flat")),
    "routed": ("tiny-llama", "featural", dict(keys="routed", group_size=8, read_share=0.5)),
    "product": ("tiny-gpt2", "featural", dict(keys="product", init="random")),
    "associative": ("tiny-llama", "associative", dict(base="none", key_dim=8, value_dim=16, topk=4,
                                                      capacity=1024)),
}


def _ids(length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def _student(case: str) -> torch.nn.Module:
    family, kind, hparams = CASES[case]
    hparams = dict(hparams)
    init = hparams.pop("init", "mlp")
    teacher = load_model(family)
    torch.manual_seed(0)
    student = convert(teacher, [0, 1], kind, init=init,
                      calibration=torch.randint(0, 256, (4, 32)), **hparams)
    if case == "product":  # a fresh product memory adds nothing: give it outputs to trace
        with torch.no_grad():
            for module in memory_layers(student).values():
                module.out_proj.weight.normal_(0, 0.05)
                module.out_proj.bias.normal_(0, 0.05)
    student.eval()
    return student


@pytest.mark.parametrize("case", sorted(CASES))
def test_tracing_leaves_the_output_unchanged(case: str) -> None:
    student = _student(case)
    ids = _ids()
    with torch.no_grad():
        plain = student(input_ids=ids).logits
        with memory_trace(student) as recorded:
            traced = student(input_ids=ids).logits
    assert (traced - plain).abs().max() < 1e-5
    assert set(recorded) == {0, 1} and all(len(passes) == 1 for passes in recorded.values())
    assert all(module.trace_reads is None for module in memory_layers(student).values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_influences_and_bias_sum_to_each_layers_direct_effect(case: str) -> None:
    student = _student(case)
    trace = trace_ids(student, _ids(), position=5)
    assert trace.position == 5
    for layer in trace.layers.values():
        assert layer.entries, f"layer {layer.layer} recorded no reads"
        total = sum(entry.influence for entry in layer.entries) + layer.bias
        assert total == pytest.approx(layer.direct, rel=1e-4, abs=1e-4)
    ranked = trace.ranked()
    assert [e.influence for e in ranked] == sorted((e.influence for e in ranked), reverse=True)


def test_direct_effect_is_the_logit_share_through_the_final_norm() -> None:
    """Summing u·(every additive part of the final residual) gives the target's logit: the
    direct effects are exact pieces of it, not a heuristic score."""
    student = _student("flat-topk")
    ids = _ids()
    parts: list[torch.Tensor] = []
    layers = student.model.layers
    hooks = [student.model.embed_tokens.register_forward_hook(
        lambda _m, _i, out: parts.append(out[0, -1].detach()))]
    for layer in layers:
        hooks.append(layer.self_attn.register_forward_hook(
            lambda _m, _i, out: parts.append(out[0][0, -1].detach())))
        hooks.append(layer.mlp.register_forward_hook(
            lambda _m, _i, out: parts.append(out[0, -1].detach())))
    trace = trace_ids(student, ids)
    for hook in hooks:
        hook.remove()
    from engine.model.memory_trace import final_norm, readout_direction

    residual = torch.stack(parts).sum(0)
    u = readout_direction(student, final_norm(student), residual, trace.target)
    assert float(sum(p @ u for p in parts)) == pytest.approx(trace.target_logit, rel=1e-4)


def test_read_weights_are_the_layers_own() -> None:
    """Product-key weights are a softmax per head; routed reads stay inside routed groups;
    associative weights are attention shares (with the token's own entry, at most 1)."""
    product = trace_ids(_student("product"), _ids())
    for layer in product.layers.values():
        heads: dict[int, float] = {}
        for entry in layer.entries:
            heads[entry.head] = heads.get(entry.head, 0.0) + entry.weight
        assert all(total == pytest.approx(1.0, abs=1e-5) for total in heads.values())
    routed_student = _student("routed")
    routed = trace_ids(routed_student, _ids())
    for number, layer in routed.layers.items():
        module = memory_layers(routed_student)[number].routed
        groups = {entry.entry // module.group_size for entry in layer.entries}
        assert len(groups) == module.groups_read
    associative = trace_ids(_student("associative"), _ids())
    for layer in associative.layers.values():
        heads = {}
        for entry in layer.entries:
            heads[entry.head] = heads.get(entry.head, 0.0) + entry.weight
        assert all(0.0 < total <= 1.0 + 1e-6 for total in heads.values())


def test_the_target_can_be_chosen() -> None:
    student = _student("flat-topk")
    ids = _ids()
    predicted = trace_ids(student, ids)
    other = (predicted.target + 1) % 256
    chosen = trace_ids(student, ids, target=other)
    assert chosen.target == other and chosen.target_logit < predicted.target_logit


@pytest.mark.parametrize("call, words", [
    (lambda s: trace_ids(s, torch.zeros(1, 0, dtype=torch.long)), "non-empty"),
    (lambda s: trace_ids(s, _ids(), position=40), "outside the prompt"),
    (lambda s: trace_ids(s, _ids(), target=10**6), "outside the vocabulary"),
])
def test_bad_trace_requests(call, words: str) -> None:
    with pytest.raises(InputError, match=words):
        call(_student("flat-topk"))


def test_a_model_without_memory_cannot_be_traced() -> None:
    with pytest.raises(InputError, match="no memory layers"):
        trace_ids(load_model("tiny-llama").model, _ids())
