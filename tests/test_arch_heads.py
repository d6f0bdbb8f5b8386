"""Head gates, growing and pruning heads, and saving reshaped models (tiny GPT-2 and Llama)."""

from __future__ import annotations

import pytest
import torch

from engine.distill.heal import gate_mean, gate_parameters
from engine.errors import InputError
from engine.model.architecture.attention import attention_shape, output_projection
from engine.model.architecture.gates import (
    HeadGates,
    gate_states,
    gates_of,
    insert_gates,
    remove_gates,
    saturated_heads,
)
from engine.model.architecture.heads import (
    grow_heads,
    parse_head_list,
    prune_heads,
    pruned_shape,
)
from engine.model.architecture.record import architecture_record
from engine.model.loading import load_model
from engine.model.shaped_files import save_model
from engine.model.tiny import tiny_model

FAMILIES = ("gpt2", "llama")
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def greedy(model: torch.nn.Module) -> list[int]:
    out = model.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False,  # type: ignore[operator]
                         pad_token_id=0)
    return list(out[0].tolist())


def masked(model: torch.nn.Module, layer: int, heads: list[int]) -> torch.nn.Module:
    """``model`` with the named heads' output columns zeroed: what pruning must equal."""
    import copy

    result = copy.deepcopy(model)
    projection = output_projection(result, layer)
    hd = attention_shape(result, layer).head_dim
    with torch.no_grad():
        for head in heads:
            columns = slice(head * hd, (head + 1) * hd)
            if result.config.model_type == "gpt2":
                projection.weight[columns, :] = 0
            else:
                projection.weight[:, columns] = 0
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_leave_the_function_unchanged_and_fold_back(family: str) -> None:
    model = tiny_model(family)
    gated = insert_gates(model, "all", init=0.0)
    assert torch.allclose(logits(gated), logits(model), atol=1e-5)
    assert greedy(gated) == greedy(model)
    gates = gates_of(gated, 1)
    assert isinstance(gates, HeadGates) and gates.heads == 4
    assert gates_of(model, 1) is None  # the original is untouched
    assert float(gate_mean(gate_parameters(gated)).detach()) == pytest.approx(0.5)
    # A trained-looking gate state: fold back to plain modules, same function.
    with torch.no_grad():
        gates.contribution.copy_(torch.tensor([4.0, -4.0, 0.5, 0.0]))
    states = {(s.layer, s.head): s.state for s in gate_states(gated)}
    assert states[(1, 0)] == "saturated" and states[(1, 1)] == "closed"
    assert saturated_heads(gated) == [(1, 0)]
    plain = remove_gates(gated)
    assert not any(isinstance(m, HeadGates) for m in plain.modules())
    assert torch.allclose(logits(plain), logits(gated), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("new_kv", [False, True])
def test_growing_heads_keeps_the_function(family: str, new_kv: bool) -> None:
    model = insert_gates(tiny_model(family), [1])
    grown = grow_heads(model, 1, 2, new_kv=new_kv)
    shape = attention_shape(grown, 1)
    assert shape.heads == 6
    if family == "llama":  # 4 heads over 2 kv heads: one more per group, or a new group
        assert shape.kv_heads == (3 if new_kv else 2)
    assert torch.allclose(logits(grown), logits(model), atol=1e-5)
    assert greedy(grown) == greedy(model)
    gates = gates_of(grown, 1)
    assert gates is not None and gates.heads == 6
    assert attention_shape(model, 1).heads == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_equals_masking_and_removes_exactly_the_named_heads(family: str) -> None:
    model = tiny_model(family)
    pruned = prune_heads(model, {1: [0], 2: [1, 2]})
    reference = masked(masked(model, 1, [0]), 2, [1, 2])
    assert torch.allclose(logits(pruned), logits(reference), atol=1e-5)
    assert greedy(pruned) == greedy(reference)
    assert attention_shape(pruned, 1).heads == 3 and attention_shape(pruned, 2).heads == 2
    assert attention_shape(pruned, 0) == attention_shape(model, 0)
    # The kept heads' query rows are the original's, in order.
    hd = attention_shape(model, 1).head_dim

    def queries(m: torch.nn.Module) -> torch.Tensor:
        attention = m.transformer.h[1].attn if family == "gpt2" else m.model.layers[1].self_attn
        if family == "gpt2":
            return attention.c_attn.weight.t()[: attention.split_size]
        return attention.q_proj.weight

    assert torch.equal(queries(pruned), queries(model)[hd:])
    kept_params = sum(p.numel() for p in pruned.parameters())
    assert kept_params < sum(p.numel() for p in model.parameters())


def test_grouped_query_pruning_repeats_kv_heads_to_keep_groups_even() -> None:
    model = tiny_model("llama")  # 4 heads, 2 kv heads: groups {0,1} and {2,3}
    shape = attention_shape(model, 1)
    assert pruned_shape(shape, [0]).kv_heads == 3  # groups of 1 and 2: gcd 1
    assert pruned_shape(shape, [0, 2]).kv_heads == 2  # one head left per group
    assert pruned_shape(shape, [0, 1]).kv_heads == 1  # a whole group gone
    pruned = prune_heads(model, {1: [0, 1]})
    assert attention_shape(pruned, 1).kv_heads == 1
    assert torch.allclose(logits(pruned), logits(masked(model, 1, [0, 1])), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reshaped_model_saves_and_loads(tmp_path, family: str) -> None:
    model = grow_heads(prune_heads(insert_gates(tiny_model(family)), {2: [3]}), 0, 2)
    with torch.no_grad():
        gates_of(model, 3).contribution.copy_(torch.tensor([1.0, -2.0, 0.3, 3.0]))
    record = architecture_record(model)
    assert record is not None and record["layers"]["2"]["heads"] == 3
    saved = save_model(model, tmp_path / "shaped", tokenizer=None)
    from engine.model.tiny import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(str(saved))
    loaded = load_model(str(saved))
    assert torch.allclose(logits(loaded.model), logits(model), atol=1e-6)
    assert attention_shape(loaded.model, 0).heads == 6
    gates = gates_of(loaded.model, 3)
    assert gates is not None and torch.equal(gates.contribution, gates_of(model, 3).contribution)


def test_a_reshaped_student_saves_and_loads(tmp_path) -> None:
    from engine.model.student import load_student_model
    from engine.model.surgery import convert

    student = convert(tiny_model("llama"), [1], "featural", keys="flat", slots=64)
    shaped = prune_heads(insert_gates(student, [2]), {2: [1]})
    saved = save_model(shaped, tmp_path / "student")
    loaded = load_student_model(saved)
    assert attention_shape(loaded, 2).heads == 3 and gates_of(loaded, 2) is not None
    assert torch.allclose(logits(loaded), logits(shaped), atol=1e-6)


@pytest.mark.parametrize(("request_", "message"), [
    (lambda m: prune_heads(m, {1: [4]}), "out of range"),
    (lambda m: prune_heads(m, {1: [0, 1, 2, 3]}), "every head"),
    (lambda m: prune_heads(m, {9: [0]}), "out of range"),
    (lambda m: prune_heads(m, {1: [0, 0]}), "repeat"),
    (lambda m: prune_heads(m, {}), "no heads"),
    (lambda m: grow_heads(m, 1, 1), "KV-group mismatch"),
    (lambda m: grow_heads(m, 1, 1, new_kv=True), "multiple of 2"),
    (lambda m: grow_heads(m, 1, 40), "past the limit"),
    (lambda m: grow_heads(m, 1, 0), "positive"),
    (lambda m: insert_gates(insert_gates(m, [1]), [1]), "already have head gates"),
    (lambda m: insert_gates(m, [1], init=50.0), "outside"),
])
def test_bad_requests_fail_before_any_work(request_, message: str) -> None:
    model = tiny_model("llama")
    with pytest.raises(InputError, match=message):
        request_(model)


def test_head_lists_parse_and_refuse_slips() -> None:
    assert parse_head_list("3:0, 3:5,7:2") == {3: [0, 5], 7: [2]}
    for bad in ("", "3", "3:x", "a:1"):
        with pytest.raises(InputError, match="layer:head"):
            parse_head_list(bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kind_of_change_survives_save_and_load(tmp_path, family: str) -> None:
    from engine.model.architecture.feedback import add_feedback
    from engine.model.architecture.layers import drop_layer, insert_layer
    from engine.model.architecture.mlp import grow_mlp, mlp_width, prune_mlp
    from engine.model.tiny import byte_level_tokenizer

    model = insert_layer(drop_layer(tiny_model(family), 3), 1)
    model = prune_mlp(grow_mlp(model, 0, 16), 2, remove=[0, 5, 7])
    model = add_feedback(insert_gates(prune_heads(model, {1: [2]}), [0]), rank=4)
    with torch.no_grad():  # feedback that does something, so the reload is really tested
        for parameter in model.mindset_feedback.parameters():
            parameter.normal_(0, 0.05)
    saved = save_model(model, tmp_path / "all", byte_level_tokenizer())
    loaded = load_model(str(saved)).model
    assert (mlp_width(loaded, 0), mlp_width(loaded, 2)) == (144, 125)
    assert attention_shape(loaded, 1).heads == 3 and gates_of(loaded, 0) is not None
    assert len(loaded.config.to_dict()["mindset_architecture"]["layers"]) == 3
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)
