"""The embedded default model: conversion once, atomic and verified, then fast loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.errors import ModelLoadError
from engine.evaluation import perplexity
from engine.model import default_model
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_default_model_is_smollm2(default_model) -> None:  # type: ignore[no-untyped-def]
    config = default_model.model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        30,
        576,
        1536,
    )
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == 49152
    assert default_model.family == "llama"
    assert next(default_model.model.parameters()).dtype == torch.float32
    assert getattr(config, "quantization_config", None) is None


def test_default_model_predicts_english(default_model) -> None:  # type: ignore[no-untyped-def]
    text = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower from 1887 to 1889. "
    ) * 3
    result = perplexity(default_model.model, default_model.tokenizer, text, window=256)
    # Repeated factual English: a working 135M model is confident; a broken conversion is not.
    assert result.ppl < 10


def test_conversion_is_recorded_in_a_verified_manifest(default_model_dir: Path) -> None:
    manifest = json.loads((default_model_dir / default_model.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"]
    assert default_model.is_valid_conversion(default_model_dir)


def test_corrupted_file_invalidates_the_conversion(default_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / default_model.CONVERTED_NAME
    shutil.copytree(default_model_dir, copy)
    assert default_model.is_valid_conversion(copy)
    config = copy / "tokenizer_config.json"
    data = bytearray(config.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    config.write_bytes(bytes(data))
    assert not default_model.is_valid_conversion(copy)
    (copy / default_model.MANIFEST).unlink()
    assert not default_model.is_valid_conversion(copy)


def test_interrupted_conversion_is_never_loaded_and_is_redone(tmp_path: Path) -> None:
    root = tmp_path / "models"
    code = (
        "from pathlib import Path\n"
        "from engine.model.default_model import convert\n"
        f"convert(Path({str(root)!r}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it once it has started writing its staging directory.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and writer.poll() is None:
        staged = list(root.glob(f".{default_model.CONVERTED_NAME}.tmp-*/*"))
        if staged:
            break
        time.sleep(0.05)
    assert writer.poll() is None, "the conversion finished before it could be interrupted"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()

    final = default_model.converted_dir(root)
    assert not final.exists() or not default_model.is_valid_conversion(final)
    assert list(root.glob(f".{default_model.CONVERTED_NAME}.tmp-*")), "staging left behind"

    directory = default_model.ensure_converted(root)
    assert directory == final
    assert default_model.is_valid_conversion(final)
    assert not list(root.glob(f".{default_model.CONVERTED_NAME}.tmp-*")), "stale staging kept"

    from engine.model.loading import load_directory

    loaded = load_directory(final)
    assert loaded.model.config.num_hidden_layers == 30


def test_corrupt_gguf_is_refused(tmp_path: Path) -> None:
    source = default_model.gguf_path()
    truncated = tmp_path / "truncated.gguf"
    with source.open("rb") as handle:
        truncated.write_bytes(handle.read(1 << 20))
    with pytest.raises(ModelLoadError, match="corrupt"):
        default_model.check_gguf(truncated)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        default_model.check_gguf(foreign)
