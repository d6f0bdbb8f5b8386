"""Resizing: MLP width (grow/prune neurons), decoder layers (drop/insert) and memory-layer
slot counts, on tiny GPT-2 and Llama models and students made from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import decoder_layers, mlp_io, mlp_of
from engine.model.architecture.layers import drop_layer, insert_layer
from engine.model.architecture.memory_size import memory_slots, resize_memory, slot_usage
from engine.model.architecture.mlp import (
    MAX_WIDTH_FACTOR,
    build_mlp,
    grow_mlp,
    mlp_width,
    neuron_importance,
    prune_mlp,
)
from engine.model.student import load_student_model, save_student
from engine.model.surgery import convert, student_spec
from engine.model.tiny import tiny_model

FAMILIES = ("gpt2", "llama")
TOL = 1e-5


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {family: tiny_model(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def flat_student(models: dict[str, Any]) -> Any:
    """Llama with a dense flat memory of 96 of the MLP's 128 neurons at layer 1."""
    return convert(models["llama"], [1], "featural", keys="flat", slots=96)


@pytest.fixture(scope="module")
def routed_student(models: dict[str, Any]) -> Any:
    """Llama with a routed memory at layer 2: 4 groups of 32 slots, 2 read per token (random
    weights: the grouping of neurons is not what these tests are about, and costs time)."""
    return convert(models["llama"], [2], "featural", init="random", keys="routed",
                   group_size=32, read_share=0.5)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def greedy(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, use_cache=True,
                          pad_token_id=0)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= TOL


def neuron_tensors(mlp: Any) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-neuron tensors and the dimension that indexes neurons."""
    if hasattr(mlp, "gate_proj"):
        return {"gate": (mlp.gate_proj.weight, 0), "up": (mlp.up_proj.weight, 0),
                "down": (mlp.down_proj.weight, 1)}
    return {"fc": (mlp.c_fc.weight, 1), "fc_bias": (mlp.c_fc.bias, 0),
            "proj": (mlp.c_proj.weight, 0)}


# --- MLP width -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_grow_mlp_keeps_the_function_and_the_classes(family: str, models: dict[str, Any],
                                                     ids: torch.Tensor) -> None:
    model = models[family]
    grown = grow_mlp(model, 1, 24, seed=3)
    assert close(logits(grown, ids), logits(model, ids))
    assert mlp_width(grown, 1) == 152 and mlp_width(model, 1) == 128  # original untouched
    old, new = mlp_of(model, 1), mlp_of(grown, 1)
    assert type(new) is type(old)
    assert set(grown.state_dict()) == set(model.state_dict())
    for name, (tensor, dim) in neuron_tensors(new).items():
        kept = tensor.narrow(dim, 0, 128)
        assert torch.equal(kept, neuron_tensors(old)[name][0]), name
        added = tensor.narrow(dim, 128, 24)
        if name in ("down", "proj"):
            assert torch.count_nonzero(added) == 0
        else:
            assert torch.count_nonzero(added) > 0
    if family == "llama":
        assert new.intermediate_size == 152 and new.config is grown.config
        assert isinstance(new.up_proj, nn.Linear) and new.up_proj.out_features == 152
    else:
        from transformers.pytorch_utils import Conv1D

        assert isinstance(new.c_fc, Conv1D) and new.c_fc.nf == 152


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_mlp_removes_exactly_the_named_neurons(family: str, models: dict[str, Any]
                                                     ) -> None:
    model = models[family]
    removed = [127, 0, 5, 77]
    pruned = prune_mlp(model, 2, remove=removed)
    assert mlp_width(pruned, 2) == 124 and mlp_width(model, 2) == 128
    keep = torch.tensor([j for j in range(128) if j not in removed])
    old, new = mlp_of(model, 2), mlp_of(pruned, 2)
    for name, (tensor, dim) in neuron_tensors(new).items():
        assert torch.equal(tensor, neuron_tensors(old)[name][0].index_select(dim, keep)), name
    out_old: Any = old.down_proj if family == "llama" else old.c_proj
    out_new: Any = new.down_proj if family == "llama" else new.c_proj
    if out_old.bias is not None:
        assert torch.equal(out_new.bias, out_old.bias)
    assert type(new) is type(old)


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_importance_is_mean_activation_times_output_norm(
        family: str, models: dict[str, Any], ids: torch.Tensor) -> None:
    model = models[family]
    mlp: Any = mlp_of(model, 1)
    x = mlp_io(model, ids, [1])[1][0]
    with torch.no_grad():
        if family == "llama":
            act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            norms = mlp.down_proj.weight.norm(dim=0)
        else:
            act = mlp.act(mlp.c_fc(x))
            norms = mlp.c_proj.weight.norm(dim=1)
    expected = act.abs().mean(0) * norms
    got = neuron_importance(model, 1, ids)
    assert got.shape == (128,)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_prune_by_count_drops_the_least_important(models: dict[str, Any],
                                                  ids: torch.Tensor) -> None:
    model = models["llama"]
    importance = neuron_importance(model, 1, ids)
    lowest = set(importance.argsort()[:10].tolist())
    pruned = prune_mlp(model, 1, count=10, calibration_ids=ids)
    keep = torch.tensor([j for j in range(128) if j not in lowest])
    new: Any = mlp_of(pruned, 1)
    old: Any = mlp_of(model, 1)
    assert torch.equal(new.up_proj.weight, old.up_proj.weight.index_select(0, keep))


def test_build_mlp_puts_a_zero_skeleton_of_the_width(models: dict[str, Any]) -> None:
    import copy

    model = copy.deepcopy(models["gpt2"])
    build_mlp(model, 3, 80)
    assert mlp_width(model, 3) == 80
    mlp = mlp_of(model, 3)
    assert type(mlp).__name__ == "GPT2MLP"
    assert all(torch.count_nonzero(p) == 0 for p in mlp.parameters())
    assert {p.dtype for p in mlp.parameters()} == {torch.float32}


def test_mlp_requests_are_checked(models: dict[str, Any], ids: torch.Tensor,
                                  flat_student: Any) -> None:
    model = models["llama"]
    cases = [
        lambda: prune_mlp(model, 1, remove=[128]),
        lambda: prune_mlp(model, 1, remove=[3, 3]),
        lambda: prune_mlp(model, 1, remove=list(range(128))),
        lambda: prune_mlp(model, 1),
        lambda: prune_mlp(model, 1, remove=[1], count=1, calibration_ids=ids),
        lambda: prune_mlp(model, 1, count=5),
        lambda: prune_mlp(model, 1, count=128, calibration_ids=ids),
        lambda: prune_mlp(model, 4, remove=[0]),
        lambda: prune_mlp(flat_student, 1, remove=[0]),
        lambda: grow_mlp(flat_student, 1, 4),
        lambda: grow_mlp(model, 1, 0),
        lambda: grow_mlp(model, 1, MAX_WIDTH_FACTOR * 64 - 128 + 1),
        lambda: neuron_importance(model, 1, ids.float()),
        lambda: build_mlp(model, 1, 0),
    ]
    for case in cases:
        with pytest.raises(InputError):
            case()
    with pytest.raises(InputError, match="memory layer"):
        prune_mlp(flat_student, 1, remove=[0])
    with pytest.raises(InputError, match="limit"):
        grow_mlp(model, 1, MAX_WIDTH_FACTOR * 64)


# --- layers ----------------------------------------------------------------------------------


def layer_indexes(model: nn.Module) -> list[int]:
    blocks: Any = decoder_layers(model)
    return [int((getattr(block, "self_attn", None) or block.attn).layer_idx) for block in blocks]


@pytest.mark.parametrize("family", FAMILIES)
def test_insert_layer_is_exactly_the_identity(family: str, models: dict[str, Any],
                                              ids: torch.Tensor) -> None:
    model = models[family]
    expected, tokens = logits(model, ids), greedy(model, ids)
    for position in (0, 2, 4):
        grown: Any = insert_layer(model, position)
        assert grown.config.num_hidden_layers == 5 and model.config.num_hidden_layers == 4
        assert layer_indexes(grown) == [0, 1, 2, 3, 4]
        assert close(logits(grown, ids), expected)
        if position == 0:  # every old layer moved: the KV cache follows the new indexes
            assert torch.equal(greedy(grown, ids), tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_layer_skips_the_layer(family: str, models: dict[str, Any],
                                    ids: torch.Tensor) -> None:
    model = models[family]
    dropped: Any = drop_layer(model, 1)
    assert dropped.config.num_hidden_layers == 3 and len(decoder_layers(model)) == 4
    assert layer_indexes(dropped) == [0, 1, 2]
    for new, old in ((0, 0), (1, 2), (2, 3)):
        assert all(torch.equal(a, b) for a, b in zip(
            decoder_layers(dropped)[new].parameters(), decoder_layers(model)[old].parameters(),
            strict=True))

    # The original with layer 1 passing its input through computes the same.
    def skip(_module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(model)[1].register_forward_hook(skip, with_kwargs=True)
    try:
        expected = logits(model, ids)
    finally:
        handle.remove()
    assert close(logits(dropped, ids), expected)
    cached = greedy(dropped, ids)
    uncached = dropped.generate(ids[:1, :6], max_new_tokens=4, do_sample=False,
                                use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_per_layer_config_lists_follow_the_layers(ids: torch.Tensor) -> None:
    model = tiny_model("llama", layer_types=["full_attention"] * 4)
    dropped: Any = drop_layer(model, 0)
    grown: Any = insert_layer(model, 1)
    assert list(dropped.config.layer_types) == ["full_attention"] * 3
    assert list(grown.config.layer_types) == ["full_attention"] * 5
    greedy(dropped, ids)  # the cache is built from the config: it must match the layers


def test_gpt2_inverse_layer_scaling_survives_a_rebuild(tmp_path: Path, ids: torch.Tensor
                                                       ) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    grown = insert_layer(model, 1)
    assert close(logits(grown, ids), logits(model, ids))
    dropped: Any = drop_layer(model, 0)  # every layer moves down: its scale changes
    dropped.save_pretrained(tmp_path / "m")
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert close(logits(rebuilt, ids), logits(dropped, ids))


def test_layers_of_a_student_are_renumbered(flat_student: Any, ids: torch.Tensor,
                                            tmp_path: Path) -> None:
    base = logits(flat_student, ids)
    spec = student_spec(flat_student)
    assert spec is not None and spec.layers == [1]
    resized = resize_memory(flat_student, 1, 100)
    assert student_spec(resized).layer_hparams == {  # type: ignore[union-attr]
        "1": {"slots": 100, "groups_fixed": 0, "fact_groups": 0}}
    grown = insert_layer(resized, 2)  # copies layer 1, a memory layer: gets a dense MLP
    grown_spec = student_spec(grown)
    assert grown_spec is not None and grown_spec.layers == [1]
    assert type(mlp_of(grown, 2)).__name__ == "LlamaMLP"
    assert close(logits(grown, ids), base)
    moved = insert_layer(resized, 0)
    moved_spec = student_spec(moved)
    assert moved_spec is not None and moved_spec.layers == [2]
    assert set(moved_spec.layer_hparams) == {"2"}
    assert close(logits(moved, ids), base)
    dropped = drop_layer(moved, 0)
    assert student_spec(dropped).layers == [1]  # type: ignore[union-attr]
    save_student(dropped, tmp_path / "s")
    loaded = load_student_model(tmp_path / "s")
    assert close(logits(loaded, ids), base)
    assert memory_slots(loaded, 1) == 100
    gone = drop_layer(resized, 1)  # the memory layer itself
    gone_spec = student_spec(gone)
    assert gone_spec is not None and gone_spec.layers == [] and gone_spec.layer_hparams == {}
    assert spec.layers == [1] and spec.layer_hparams == {}  # the original spec is untouched


def test_layer_requests_are_checked(models: dict[str, Any]) -> None:
    model = models["gpt2"]
    single = tiny_model("gpt2", n_layer=1)
    for case in (lambda: drop_layer(model, 4), lambda: drop_layer(model, -1),
                 lambda: drop_layer(model, True), lambda: drop_layer(single, 0),
                 lambda: insert_layer(model, 5), lambda: insert_layer(model, -1)):
        with pytest.raises(InputError):
            case()
    with pytest.raises(InputError, match="only one layer"):
        drop_layer(single, 0)
    from engine.model.architecture.feedback import add_feedback

    with_feedback = add_feedback(model, rank=4)  # it names layers by index
    for case in (lambda: drop_layer(with_feedback, 1), lambda: insert_layer(with_feedback, 1)):
        with pytest.raises(InputError, match="feedback"):
            case()


# --- memory slots ----------------------------------------------------------------------------


def test_flat_memory_grows_exactly_and_reloads(flat_student: Any, ids: torch.Tensor,
                                               tmp_path: Path) -> None:
    base = logits(flat_student, ids)
    grown = resize_memory(flat_student, 1, 128)
    assert memory_slots(grown, 1) == 128 and memory_slots(flat_student, 1) == 96
    assert close(logits(grown, ids), base)
    spec = student_spec(grown)
    assert spec is not None and spec.layer_hparams["1"]["slots"] == 128
    save_student(grown, tmp_path / "flat")
    loaded = load_student_model(tmp_path / "flat")
    assert memory_slots(loaded, 1) == 128
    assert close(logits(loaded, ids), base)
    back = resize_memory(grown, 1, 96)  # no data: the zero-value slots go first
    assert close(logits(back, ids), base)


def test_flat_memory_shrinks_by_the_named_or_least_used_slots(flat_student: Any,
                                                              ids: torch.Tensor) -> None:
    memory: Any = mlp_of(flat_student, 1)
    removed = [0, 10, 95]
    shrunk = resize_memory(flat_student, 1, 93, remove=removed)
    keep = torch.tensor([i for i in range(96) if i not in removed])
    new: Any = mlp_of(shrunk, 1)
    assert torch.equal(new.flat.keys, memory.flat.keys.index_select(0, keep))
    assert torch.equal(new.flat.up, memory.flat.up.index_select(0, keep))
    assert torch.equal(new.values, memory.values.index_select(0, keep))
    assert new.config.slots == 93
    usage = slot_usage(flat_student, 1, ids)
    lowest = set(usage.argsort()[:6].tolist())
    used = resize_memory(flat_student, 1, 90, calibration_ids=ids)
    keep = torch.tensor([i for i in range(96) if i not in lowest])
    assert torch.equal(mlp_of(used, 1).values,  # type: ignore[arg-type]
                       memory.values.index_select(0, keep))


def test_routed_memory_grows_by_unread_groups(routed_student: Any, ids: torch.Tensor,
                                              tmp_path: Path) -> None:
    base, tokens = logits(routed_student, ids), greedy(routed_student, ids)
    grown = resize_memory(routed_student, 2, 192)
    memory: Any = mlp_of(grown, 2)
    assert memory.routed.num_groups == 6 and memory.routed.groups_read == 2
    assert close(logits(grown, ids), base)
    assert torch.equal(greedy(grown, ids), tokens)  # the one-token read path too
    spec = student_spec(grown)
    assert spec is not None and spec.layer_hparams["2"] == {
        "slots": 192, "groups_fixed": 2, "fact_groups": 0}
    save_student(grown, tmp_path / "routed")
    loaded = load_student_model(tmp_path / "routed")
    assert memory_slots(loaded, 2) == 192
    assert close(logits(loaded, ids), base)
    usage = slot_usage(grown, 2, ids).view(6, 32).sum(-1)
    assert torch.count_nonzero(usage[4:]) == 0  # no token reads the new groups
    back = resize_memory(grown, 2, 128)  # no data: the empty groups go first
    assert close(logits(back, ids), base)


def test_routed_memory_drops_whole_named_groups(routed_student: Any) -> None:
    grown = resize_memory(routed_student, 2, 192)
    memory: Any = mlp_of(grown, 2)
    shrunk = resize_memory(grown, 2, 160, remove=list(range(32, 64)))
    new: Any = mlp_of(shrunk, 2)
    keep_groups = torch.tensor([0, 2, 3, 4, 5])
    assert torch.equal(new.routed.group_keys, memory.routed.group_keys[keep_groups])
    assert torch.equal(new.routed.router_up, memory.routed.router_up[keep_groups])
    assert torch.equal(new.values, memory.values.view(6, 32, -1)[keep_groups].reshape(160, -1))
    assert new.routed.num_groups == 5 and new.config.slots == 160
    with pytest.raises(InputError, match="whole groups"):
        resize_memory(grown, 2, 160, remove=list(range(16, 48)))


def test_memory_requests_are_checked(models: dict[str, Any], flat_student: Any,
                                     routed_student: Any, ids: torch.Tensor) -> None:
    teacher = models["llama"]
    cases = [
        (lambda: resize_memory(teacher, 1, 64), "not a student"),
        (lambda: resize_memory(flat_student, 0, 64), "no memory layer"),
        (lambda: resize_memory(flat_student, 1, 0), "positive"),
        (lambda: resize_memory(flat_student, 1, 96), "already"),
        (lambda: resize_memory(flat_student, 1, 129), "at most"),
        (lambda: resize_memory(flat_student, 1, 100, remove=[1]), "growing"),
        (lambda: resize_memory(flat_student, 1, 94, remove=[1]), "named"),
        (lambda: resize_memory(flat_student, 1, 95, remove=[96]), "out of range"),
        (lambda: resize_memory(flat_student, 1, 94, remove=[1, 1]), "repeat"),
        (lambda: resize_memory(flat_student, 1, 95, remove=[1], calibration_ids=ids), "both"),
        (lambda: resize_memory(routed_student, 2, 150), "multiple of 32"),
        (lambda: resize_memory(routed_student, 2, 96), "at least"),
    ]
    for case, message in cases:
        with pytest.raises(InputError, match=message):
            case()
    sparse = convert(teacher, [1], "featural", keys="flat", slots=64, topk=8)
    with pytest.raises(InputError, match="top-8"):
        resize_memory(sparse, 1, 80)
    with pytest.raises(InputError, match="fewer than"):
        resize_memory(sparse, 1, 4)
    product = convert(teacher, [1], "featural", num_subkeys=4, query_dim=8, heads=1, topk=2)
    with pytest.raises(InputError, match="product keys"):
        resize_memory(product, 1, 32)
    associative = convert(teacher, [1], "associative", base="none", heads=1, key_dim=8,
                          value_dim=8, topk=2, capacity=16)
    with pytest.raises(InputError, match="associative"):
        resize_memory(associative, 1, 32)
