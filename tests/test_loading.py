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


# --- configs, pickles and sizes checked before anything is built --------------------------------


def saved_tiny(directory: Path, spec: str = "tiny-llama") -> Path:
    loaded = load_model(spec)
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("edit, message", [
    ({"num_hidden_layers": -3}, r"num_hidden_layers=-3 must be a positive integer"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers=0 must be"),
    ({"num_hidden_layers": "4"}, r"num_hidden_layers='4' must be"),
    ({"num_hidden_layers": True}, r"num_hidden_layers=True must be"),
    ({"num_hidden_layers": None}, r"num_hidden_layers=None must be"),
    ({"hidden_size": 2.0}, r"hidden_size=2\.0 must be"),
    ({"max_position_embeddings": -1}, r"max_position_embeddings=-1"),
    ({"num_key_value_heads": 3}, r"do not split into num_key_value_heads=3"),
], ids=["negative", "zero", "string", "bool", "null", "float", "positions", "kv-groups"])
def test_impossible_config_fields_are_refused_in_one_line(
    tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    directory = saved_tiny(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **edit}))
    for call in (load_model, model_config):
        with pytest.raises(ModelLoadError, match=message) as caught:
            call(str(directory))
        assert "\n" not in str(caught.value)


def test_a_missing_size_is_refused_rather_than_defaulted(tmp_path: Path) -> None:
    """transformers would build a 32-layer Llama from a config without num_hidden_layers."""
    directory = saved_tiny(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["num_hidden_layers"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="lacks num_hidden_layers"):
        load_model(str(directory))


def test_an_empty_spec_is_not_the_current_directory(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(saved_tiny(tmp_path))  # "" would otherwise load this directory
    for spec in ("", "  "):
        with pytest.raises(ModelLoadError, match="--model is empty"):
            load_model(spec)
        with pytest.raises(ModelLoadError, match="--model is empty"):
            model_config(spec)


def test_pickled_weights_alone_are_refused_and_never_opened(tmp_path: Path) -> None:
    directory = saved_tiny(tmp_path)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(directory))
    message = str(caught.value)
    assert message.startswith(f"{directory} holds only pytorch_model.bin; Mindset loads "
                              "safetensors only (never pickles): convert it")
    assert "\n" not in message


def test_from_pretrained_is_told_to_use_safetensors(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    seen: list[object] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("use_safetensors"))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(saved_tiny(tmp_path)))
    assert seen == [True]


def test_a_model_too_large_for_this_machine_is_refused_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.model.memory_layers import budget

    directory = saved_tiny(tmp_path)
    monkeypatch.setattr(budget, "memory_limit_bytes", lambda: 100_000)  # 100 kB of "RAM"
    with pytest.raises(ModelLoadError, match=r"needs about 640\.8 KiB, more than this "
                       r"machine's 97\.7 KiB of RAM"):
        load_model(str(directory))


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_the_size_estimate_is_close_to_the_real_parameter_count(spec: str) -> None:
    from engine.model.model_files import model_parameters

    model = load_model(spec).model
    actual = sum(p.numel() for p in model.parameters())
    estimate = model_parameters(model.config.to_dict())
    assert 0.97 * actual <= estimate <= actual  # norms and biases aside, every matrix counts


def test_spec_checks_need_no_torch(tmp_path: Path) -> None:
    """The workbench checks --model before its first frame, which must not wait for torch."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    directory = saved_tiny(tmp_path)
    code = ("import sys; from engine.model.model_files import check_model_spec; "
            f"check_model_spec({str(directory)!r}); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, check=True)
    assert result.stdout.strip() == "False"
