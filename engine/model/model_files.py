"""What a model spec names, told from its files alone: no torch, no weights read.

The CLI checks a spec with :func:`check_model_spec` before it opens the workbench or starts
anything, and :mod:`engine.model.loading` reads configs through :func:`read_config`, so a
broken directory (an empty spec, a config with ``num_hidden_layers=-3``, pickled weights
only) is refused in one line before any model is built. Importing this module stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError, flat_text
from engine.model import anatomy

TINY_SPECS = {"tiny-gpt2": "gpt2", "tiny-llama": "llama"}
BUILTIN_SPECS = ("default", *TINY_SPECS)
STUDENT_FILE = "mindset_student.json"
STUDENT_WEIGHTS = "model.safetensors"

# The config fields each family's model is built from; transformers would silently fill a
# missing one with its own default (a 32-layer Llama), which then fails far from the cause.
REQUIRED_FIELDS = {
    "gpt2": ("n_layer", "n_embd", "n_head", "vocab_size"),
    "llama": ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "vocab_size"),
}
OPTIONAL_FIELDS = {
    "gpt2": ("n_positions", "n_inner"),
    "llama": ("num_key_value_heads", "max_position_embeddings", "head_dim"),
}
FAMILIES = anatomy.SUPPORTED_FAMILIES
assert set(REQUIRED_FIELDS) == set(FAMILIES), "a supported family needs its required fields"
# Files torch.load or pickle would read; Mindset never does.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = ("convert it once where you trust the file, e.g. AutoModelForCausalLM."
                "from_pretrained(dir).save_pretrained(dir) with transformers")


def check_spec_text(spec: Any, option: str = "--model") -> str:
    """``spec`` as a usable string: an empty one would silently mean the current directory."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"{option} is empty; give default, tiny-gpt2, tiny-llama or a "
                             "model directory")
    if "\x00" in spec:
        raise ModelLoadError(f"{option} {spec!r} holds a NUL byte; give a model directory")
    return spec


def model_directory(spec: str) -> Path:
    """The directory a path spec names, checked to exist."""
    check_spec_text(spec)
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
    return path


def is_student_dir(path: Path | str) -> bool:
    return (Path(path) / STUDENT_FILE).is_file()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_config_fields(config: dict[str, Any], source: Path) -> None:
    """The sizes a model is built from are present, positive integers, and consistent."""
    family = str(config["model_type"])
    for name in REQUIRED_FIELDS[family]:
        if name not in config:
            raise ModelLoadError(f"{source} lacks {name}; it is not a complete {family} "
                                 "config, re-create the model")
        if not _positive_int(config[name]):
            raise ModelLoadError(f"{source}: {name}={config[name]!r} must be a positive "
                                 "integer; fix or re-create the config")
    for name in OPTIONAL_FIELDS[family]:
        value = config.get(name)
        if value is not None and not _positive_int(value):
            raise ModelLoadError(f"{source}: {name}={value!r} must be a positive integer; "
                                 "fix or re-create the config")
    if family == "gpt2":
        hidden, heads, kv_heads, head_dim = config["n_embd"], config["n_head"], None, None
    else:
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        kv_heads, head_dim = config.get("num_key_value_heads"), config.get("head_dim")
    if head_dim is None and hidden % heads:
        raise ModelLoadError(f"{source}: hidden size {hidden} is not a multiple of the "
                             f"{heads} attention heads; fix or re-create the config")
    if kv_heads is not None and heads % kv_heads:
        raise ModelLoadError(f"{source}: {heads} attention heads do not split into "
                             f"num_key_value_heads={kv_heads} groups; fix the config")


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a model directory: valid JSON, a supported family, sane sizes."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{directory} has no config.json; give a Hugging Face causal-LM directory "
            "(config.json, weights and tokenizer files)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"{config_file}: cannot read ({exc.strerror})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = flat_text(exc)
        raise ModelLoadError(f"{config_file} is not valid JSON ({reason}); re-create the "
                             "model") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} is not a JSON object; re-create the model")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"{directory} holds a {model_type!r} model; supported families: "
            f"{', '.join(FAMILIES)}"
        )
    check_config_fields(config, config_file)
    return config


def safetensors_files(directory: Path) -> list[Path]:
    """The directory's safetensors weights; pickled weights alone are refused, never read."""
    weights = sorted(directory.glob("*.safetensors"))
    if weights:
        return weights
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(f"{directory} holds only {', '.join(pickles[:3])}; Mindset loads "
                             f"safetensors only (never pickles): {CONVERT_HINT}")
    raise ModelLoadError(f"{directory} has no weight files (*.safetensors); give a Hugging "
                         "Face model directory saved with safetensors")


def model_parameters(config: dict[str, Any]) -> int:
    """About how many parameters a checked config builds (embeddings, attention, MLPs)."""
    family = anatomy.family_of(config)
    layers, hidden, inner = (anatomy.num_layers(config), anatomy.hidden_size(config),
                             anatomy.mlp_size(config))
    vocab = config["vocab_size"]
    if family == "gpt2":
        positions = config.get("n_positions") or 1024
        per_layer = 4 * hidden * hidden + 2 * hidden * inner
        embeddings = (vocab + positions) * hidden
    else:
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        kv_heads = config.get("num_key_value_heads") or heads
        per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
        per_layer += 3 * hidden * inner
        embeddings = vocab * hidden
    tied = config.get("tie_word_embeddings", family == "gpt2")
    return int(layers * per_layer + embeddings * (1 if tied else 2))


def check_model_spec(spec: Any, option: str = "--model") -> None:
    """Refuse, from the files alone, a spec that cannot load (``default`` is not checked: its
    conversion and load report their own progress and errors)."""
    check_spec_text(spec, option)
    if spec in BUILTIN_SPECS:
        return
    path = model_directory(spec)
    if is_student_dir(path):
        try:
            data = json.loads((path / STUDENT_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path / STUDENT_FILE} is unreadable "
                                 f"({type(exc).__name__}); re-save the student") from exc
        if not isinstance(data, dict):
            raise ModelLoadError(f"{path / STUDENT_FILE} is not a JSON object; re-save the "
                                 "student")
        read_config(path)
        if not (path / STUDENT_WEIGHTS).is_file():
            raise ModelLoadError(f"{path / STUDENT_WEIGHTS} is missing; re-save the student")
        return
    read_config(path)
    safetensors_files(path)
