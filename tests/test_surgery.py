"""Model surgery on tiny GPT-2 and Llama models."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InputError
from engine.model.anatomy import decoder_layers, mlp_io
from engine.model.memory_layers import FeaturalMemory
from engine.model.surgery import convert, memory_layers, student_spec
from engine.model.tiny import tiny_model

NUM_LAYERS = 4
PRODUCT = dict(heads=2, query_dim=16, num_subkeys=8, topk=4)


@pytest.fixture(scope="module")
def gpt2_relu() -> torch.nn.Module:
    return tiny_model("gpt2", activation_function="relu")


@pytest.fixture(scope="module")
def teachers() -> dict[str, torch.nn.Module]:
    return {"gpt2": tiny_model("gpt2"), "llama": tiny_model("llama")}


def token_ids(batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=generator)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_no_layers_replaced_equals_the_teacher(teachers: dict, family: str) -> None:
    teacher = teachers[family]
    student = convert(teacher, [], "featural")
    ids = token_ids()
    assert torch.equal(logits(student, ids), logits(teacher, ids))
    assert memory_layers(student) == {}
    assert student is not teacher


def test_flat_featural_memory_reproduces_a_relu_gpt2_exactly(gpt2_relu: torch.nn.Module) -> None:
    student = convert(gpt2_relu, "all", "featural", keys="flat")  # all neurons, top-k = all
    ids = token_ids()
    expected = logits(gpt2_relu, ids)
    assert (logits(student, ids) - expected).abs().max() < 1e-4
    # The memory layers are really in use: disturbing one slot's value changes the logits.
    memory = memory_layers(student)[2]
    assert isinstance(memory, FeaturalMemory)
    with torch.no_grad():
        memory.values[:, :] *= 1.5
    assert (logits(student, ids) - expected).abs().max() > 1e-3


def test_flat_memory_reading_every_slot_through_embedding_bag_is_also_exact(
    gpt2_relu: torch.nn.Module,
) -> None:
    slots = 128  # the tiny MLP's width: every neuron is a slot, and all are read via top-k
    student = convert(gpt2_relu, [1, 3], "featural", keys="flat", topk=slots)
    ids = token_ids()
    assert (logits(student, ids) - logits(gpt2_relu, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("layer", range(NUM_LAYERS))
def test_every_layer_of_both_families(teachers: dict, family: str, layer: int) -> None:
    teacher = teachers[family]
    ids = token_ids(length=16)
    exact = convert(teacher, [layer], "featural", keys="flat")
    assert (logits(exact, ids) - logits(teacher, ids)).abs().max() < 1e-4

    student = convert(teacher, [layer], "featural", **PRODUCT)
    replaced = memory_layers(student)
    assert list(replaced) == [layer]
    for index, block in enumerate(decoder_layers(student)):
        assert isinstance(block.mlp, FeaturalMemory) == (index == layer)
    # Everything but the replaced MLP is an exact copy of the teacher.
    teacher_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        if f".{layer}.mlp." not in name:
            assert torch.equal(tensor, teacher_state[name]), name
    out = logits(student, ids)
    assert out.shape == (2, 16, 259) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_with_a_kv_cache_matches_generation_without(teachers: dict, family: str) -> None:
    student = convert(teachers[family], [0, 2], "featural", **PRODUCT)
    prompt = token_ids(batch=1, length=6)
    with torch.no_grad():
        cached = student.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True,
                                  pad_token_id=0)
        uncached = student.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False,
                                    pad_token_id=0)
    assert cached.shape == (1, 14)
    assert torch.equal(cached, uncached)


def test_the_teacher_is_left_untouched(teachers: dict) -> None:
    teacher = teachers["llama"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = convert(teacher, "all", "featural", **PRODUCT)
    with torch.no_grad():
        for memory in memory_layers(student).values():
            memory.values.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(isinstance(block.mlp, FeaturalMemory) for block in decoder_layers(teacher))


def test_student_spec_records_the_conversion(teachers: dict) -> None:
    student = convert(teachers["gpt2"], [3, 1], "featural", **PRODUCT)
    spec = student_spec(student)
    assert spec is not None
    assert (spec.family, spec.layers, spec.kind, spec.init) == ("gpt2", [1, 3], "featural", "mlp")
    assert spec.hparams["num_subkeys"] == 8 and spec.hparams["topk"] == 4


@pytest.mark.parametrize("init", ["mlp", "data", "random"])
def test_initialisations_build_working_students(teachers: dict, init: str) -> None:
    teacher = teachers["llama"]
    student = convert(teacher, [1], "featural", init=init, calibration=token_ids(4, 64, seed=3),
                      **PRODUCT)
    x, y = mlp_io(teacher, token_ids(), [1])[1]
    prediction = memory_layers(student)[1](x)
    assert prediction.shape == y.shape and torch.isfinite(prediction).all()
    if init == "random":  # a fresh memory adds nothing to the residual stream
        assert prediction.abs().max() == 0


def test_data_init_beats_predicting_the_mean_on_its_own_calibration(teachers: dict) -> None:
    from engine.model.memory_layers.init_featural import unexplained_variance

    teacher = teachers["gpt2"]
    calibration = token_ids(4, 128, seed=4)
    student = convert(teacher, [2], "featural", init="data", calibration=calibration, **PRODUCT)
    x, y = mlp_io(teacher, calibration, [2])[2]
    with torch.no_grad():
        assert unexplained_variance(memory_layers(student)[2](x), y) < 0.9


@pytest.mark.parametrize(
    ("layers", "kind", "hparams", "message"),
    [
        ([4], "featural", {}, "layer index 4 is out of range; this model has 4 layers"),
        ([-1], "featural", {}, "layer index -1 is out of range"),
        ([1, 1], "featural", {}, "repeat an index"),
        (["x"], "featural", {}, "is not an integer"),
        ("some", "featural", {}, "give layer indexes or 'all'"),
        ([0], "mlp", {}, "kind='mlp' is not a memory kind"),
        ([0], "featural", dict(topk=64, num_subkeys=16), "topk=64 exceeds num_subkeys=16"),
        ([0], "featural", dict(query_dim=33), "query_dim=33 is odd"),
        ([0], "featural", dict(keys="flat", slots=500), "slots=500 exceeds the teacher MLP"),
        ([0], "featural", dict(keys="flat", topk=129), "topk=129 exceeds the 128 slots"),
    ],
)
def test_bad_requests_fail_before_any_work(
    teachers: dict, layers: object, kind: str, hparams: dict, message: str
) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        convert(teachers["gpt2"], layers, kind, **hparams)


def test_unsupported_architecture_is_refused() -> None:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(InputError, match="unsupported architecture 'gpt_neox'"):
        convert(model, [0], "featural")


def test_data_init_without_calibration_and_unknown_init_are_refused(teachers: dict) -> None:
    with pytest.raises(InputError, match="init='data' needs calibration"):
        convert(teachers["gpt2"], [0], "featural", init="data")
    with pytest.raises(InputError, match="init='zeros' is not an initialisation"):
        convert(teachers["gpt2"], [0], "featural", init="zeros")


def test_a_student_cannot_be_converted_again(teachers: dict) -> None:
    student = convert(teachers["gpt2"], [0], "featural", **PRODUCT)
    with pytest.raises(InputError, match="already a student"):
        convert(student, [1], "featural")
