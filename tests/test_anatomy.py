"""Model anatomy: families, sizes, decoder layers, MLP hooks and layer specs, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import (
    activation,
    capture_mlps,
    config_of,
    decoder_layers,
    family_of,
    hidden_size,
    layer_mlps,
    layer_prefixes,
    mlp_io,
    mlp_of,
    mlp_shape,
    mlp_size,
    num_layers,
    resolve_layers,
    set_mlp,
    zeroed_mlps_hooks,
)
from engine.model.loading import load_model
from engine.model.tiny import tiny_config, tiny_model

FAMILIES = ("gpt2", "llama")
SHAPES = {"gpt2": (64, 128, "gelu_new", False), "llama": (64, 128, "silu", True)}


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {family: tiny_model(family) for family in FAMILIES}


def token_ids(batch: int = 2, tokens: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (batch, tokens), generator=generator)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_family_and_sizes_of_a_model(models: dict[str, Any], family: str) -> None:
    model = models[family]
    blocks = decoder_layers(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 4 == num_layers(model)
    expected = model.transformer.h if family == "gpt2" else model.model.layers
    assert blocks is expected
    assert family_of(model) == family
    assert mlp_shape(model) == SHAPES[family]
    assert (hidden_size(model), mlp_size(model), activation(model)) == SHAPES[family][:3]
    assert layer_prefixes(model, [1]) == [
        "transformer.h.1.mlp." if family == "gpt2" else "model.layers.1.mlp."]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_loaded_model_is_unwrapped(family: str) -> None:
    loaded = load_model(f"tiny-{family}")
    assert decoder_layers(loaded) is decoder_layers(loaded.model)
    assert family_of(loaded) == family and num_layers(loaded) == loaded.num_layers == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_sizes_come_from_a_config_without_weights(tmp_path: Path, family: str) -> None:
    config = tiny_config(family, **({"n_layer": 6} if family == "gpt2"
                                    else {"num_hidden_layers": 6}))
    config.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    for source in (config, raw, tmp_path, tmp_path / "config.json", str(tmp_path)):
        assert family_of(source) == family
        assert num_layers(source) == 6
        assert mlp_shape(source) == SHAPES[family]
        assert resolve_layers("middle", source) == [3]
        assert resolve_layers("all", source) == list(range(6))


def test_gpt2_mlp_width_defaults_to_four_times_hidden() -> None:
    config = tiny_config("gpt2", n_inner=None)
    assert mlp_size(config) == 4 * 64
    assert mlp_size({"model_type": "gpt2", "n_embd": 32, "n_inner": None}) == 128


def test_unsupported_models_and_configs_are_refused() -> None:
    with pytest.raises(InputError, match="unsupported architecture 'gpt_neox'"):
        family_of({"model_type": "gpt_neox"})
    with pytest.raises(InputError, match="is not a supported architecture"):
        decoder_layers(nn.Linear(2, 2))
    with pytest.raises(InputError, match="expected a model"):
        decoder_layers(object())
    with pytest.raises(InputError, match="no layer count"):
        num_layers({"model_type": "llama"})
    with pytest.raises(InputError, match=r"not a readable config\.json"):
        config_of(Path("/nonexistent/model"))


def test_text_layer_specs() -> None:
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("ALL", 4) == [0, 1, 2, 3]
    assert resolve_layers("3", 4) == [3]
    assert resolve_layers("3,1-2", 4) == [1, 2, 3]
    assert resolve_layers("1, 5, 9", 30) == [1, 5, 9]
    assert resolve_layers("8-10", 30) == [8, 9, 10]
    assert resolve_layers("-1", 30) == [29]
    assert resolve_layers("-3--1", 30) == [27, 28, 29]
    assert resolve_layers("2,2,1-2", 4) == [1, 2]  # repeats merge in a written spec
    assert resolve_layers("middle", 30) == [15]
    assert resolve_layers("middle", 4) == [2]
    assert resolve_layers("0,middle", 5) == [0, 2]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("7", "unknown layer 7: the teacher has 4 layers (0..3)"),
        ("-5", "unknown layer -5"),
        ("x", "bad layer list 'x'"),
        ("some", "give layer indexes or 'all'"),
        ("1-x", "bad layer list"),
        ("3-1", "empty layer range '3-1'"),
        ("", "no layers in ''"),
        (" , ", "no layers"),
    ],
)
def test_bad_text_layer_specs(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_layers(spec, 4)


def test_index_layer_specs() -> None:
    assert resolve_layers(2, 4) == [2]
    assert resolve_layers([3, 0], 4) == [0, 3]
    assert resolve_layers((1, 2), 4) == [1, 2]
    assert resolve_layers([], 4) == []


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([4], "layer index 4 is out of range; this model has 4 layers (0..3)"),
        ([-1], "layer index -1 is out of range"),  # negatives only in written specs
        ([1, 1], "repeat an index"),
        (["x"], "is not an integer"),
        ([True], "is not an integer"),
        (2.5, "give layer indexes or 'all'"),
    ],
)
def test_bad_index_layer_specs(layers: Any, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_layers(layers, 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_capture_what_the_mlp_computes(models: dict[str, Any], family: str) -> None:
    model = models[family]
    ids = token_ids()
    with torch.no_grad(), capture_mlps(layer_mlps(model, [1, 3])) as captured:
        model(input_ids=ids)
    assert sorted(captured.inputs) == sorted(captured.outputs) == [1, 3]
    for layer in (1, 3):
        x = captured.inputs[layer]
        assert x.shape == (2, 12, 64)
        with torch.no_grad():
            torch.testing.assert_close(captured.outputs[layer], mlp_of(model, layer)(x))
    flat = mlp_io(model, ids, [3])[3]
    torch.testing.assert_close(flat[0], captured.inputs[3].reshape(-1, 64))
    torch.testing.assert_close(flat[1], captured.outputs[3].reshape(-1, 64))


def test_stop_early_skips_the_layers_above(models: dict[str, Any]) -> None:
    model = models["llama"]
    ran: list[int] = []
    handle = mlp_of(model, 2).register_forward_hook(lambda *_: ran.append(2))
    try:
        with torch.no_grad(), capture_mlps(layer_mlps(model, [1]), stop_early=True) as captured:
            model(input_ids=token_ids())
        assert 1 in captured.inputs and not ran
        with torch.no_grad():  # the capture hooks are gone: a full forward runs again
            assert model(input_ids=token_ids()).logits.shape[1] == 12
        assert ran == [2]
    finally:
        handle.remove()


def test_zeroed_mlps_and_set_mlp() -> None:
    model = tiny_model("gpt2")
    ids = token_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        handles = zeroed_mlps_hooks(model, [0, 2])
        with capture_mlps(layer_mlps(model, [0])) as captured:
            zeroed = model(input_ids=ids).logits
        for handle in handles:
            handle.remove()
        assert not captured.outputs[0].any()
        assert not torch.allclose(before, zeroed)
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    replacement = nn.Identity()
    set_mlp(model, 1, replacement)
    assert mlp_of(model, 1) is replacement and layer_mlps(model, [1])[1] is replacement
    with pytest.raises(InputError, match="unknown layer 4: the model has 4 layers"):
        layer_mlps(model, [4])
