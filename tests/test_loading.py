"""Model loading: tiny models, local Hugging Face directories, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.errors import ModelLoadError
from engine.model.anatomy import num_layers, resolve_layers
from engine.model.loading import load_model, model_config
from engine.model.tiny import TINY_VOCAB


@pytest.mark.parametrize("spec, model_type", [("tiny-gpt2", "gpt2"), ("tiny-llama", "llama")])
def test_tiny_models_are_deterministic_causal_lms(spec: str, model_type: str) -> None:
    first = load_model(spec)
    second = load_model(spec)
    assert first.family == model_type
    assert first.model.config.model_type == model_type
    ids = first.tokenizer("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_a = first.model(input_ids=ids).logits
        logits_b = second.model(input_ids=ids).logits
    assert logits_a.shape == (1, ids.shape[1], TINY_VOCAB)
    assert torch.equal(logits_a, logits_b)
    assert first.tokenizer.decode(ids[0]) == "hello world"


def test_tiny_tokenizer_round_trips_any_unicode() -> None:
    tokenizer = load_model("tiny-llama").tokenizer
    text = "naïve café — 東京 🙂\n\ttabs"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_has_a_chat_template() -> None:
    tokenizer = load_model("tiny-gpt2").tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_local_directory_loads_to_identical_outputs(spec: str, tmp_path: Path) -> None:
    original = load_model(spec)
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    assert reloaded.source == tmp_path.resolve()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(original.model(ids).logits, reloaded.model(ids).logits)


def test_a_spec_config_is_read_without_weights(tmp_path: Path) -> None:
    assert num_layers(model_config("tiny-gpt2")) == num_layers(model_config("tiny-llama")) == 4
    load_model("tiny-llama").model.config.save_pretrained(str(tmp_path))  # no weights saved
    assert resolve_layers("middle", model_config(str(tmp_path))) == [2]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match=r"'bert'.*supported families"):
        model_config(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such path"):
        model_config(str(tmp_path / "missing"))


def test_unknown_spec_names_the_builtins() -> None:
    with pytest.raises(ModelLoadError, match="tiny-gpt2"):
        load_model("no-such-model")


def test_missing_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such path"):
        load_model(str(tmp_path / "missing"))


def test_file_instead_of_directory_is_reported(tmp_path: Path) -> None:
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(file))


def test_directory_without_config_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_unsupported_family_is_reported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match=r"'bert'.*supported families"):
        load_model(str(tmp_path))


def test_truncated_safetensors_is_reported(tmp_path: Path) -> None:
    original = load_model("tiny-llama")
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(tmp_path))


def test_garbage_safetensors_header_is_reported(tmp_path: Path) -> None:
    original = load_model("tiny-gpt2")
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 4096)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(str(tmp_path))
