"""Save and load reshaped models: a Hugging Face directory plus the architecture record.

:func:`save_model` writes any model, reshaped or not, student or not: a student goes through
:func:`engine.model.student.save_student`; a plain model is written the same atomic way
(a staging directory renamed into place) as ``config.json`` (with the record, see
:mod:`engine.model.architecture.record`), ``model.safetensors``, the generation config and
the tokenizer. :func:`load_reshaped` builds a plain model from its config, reshapes it from the
record, and reads the safetensors weights (never a pickle).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.atomic import swap_directory
from engine.errors import InputError, MindsetError, ModelLoadError, flat_text
from engine.model.anatomy import unwrap
from engine.model.architecture.record import apply_architecture, record_of_config, stamp_record
from engine.model.model_files import STUDENT_WEIGHTS, is_student_dir

WEIGHTS_FILE = STUDENT_WEIGHTS  # model.safetensors, as a student's


def check_target(final: Path) -> None:
    """Refuse a target that would overwrite something that is not a saved model."""
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} is a file; give a directory to save the model in")
    if final.exists() and any(final.iterdir()) and not (
            (final / "config.json").is_file() and (final / WEIGHTS_FILE).is_file()):
        raise InputError(f"{final} is not empty and holds no saved model; give a new or empty "
                         "directory so nothing is overwritten")


def save_model(model: Any, directory: Path | str, tokenizer: Any = None) -> Path:
    """Write ``model`` (and its tokenizer) to ``directory``; returns the resolved path."""
    from engine.model.surgery import student_spec

    module = unwrap(model)
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    final = Path(directory).expanduser().resolve()
    stamp_record(module)
    if student_spec(module) is not None:
        from engine.model.student import save_student

        return save_student(module, final, tokenizer)
    check_target(final)
    if is_student_dir(final):
        raise InputError(f"{final} holds a student; save this plain model somewhere else")
    from safetensors.torch import save_model as write_weights

    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        config: Any = module.config
        config.save_pretrained(str(staging))
        generation = getattr(module, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(staging))
        write_weights(module, str(staging / WEIGHTS_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        swap_directory(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def load_reshaped(directory: Path, *, dtype: Any = None) -> nn.Module:
    """The plain (not student) reshaped model saved in ``directory``, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from engine.model.student import read_weights_into

    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{weights} is missing; re-save the model")
    with no_init_weights():
        try:
            config = AutoConfig.from_pretrained(str(directory))
            model = AutoModelForCausalLM.from_config(config)
        except Exception as exc:
            raise ModelLoadError(f"{directory}/config.json cannot be used "
                                 f"({flat_text(exc)[:300]})") from exc
        try:
            apply_architecture(model, record_of_config(config))
        except MindsetError as exc:
            raise ModelLoadError(f"{directory}: {exc}") from exc
    model.tie_weights()
    try:
        read_weights_into(model, weights)
    except (ModelLoadError, OSError) as exc:
        raise ModelLoadError(f"{weights} does not load ({exc}); re-save the model") from exc
    model.to(dtype or torch.float32)
    model.eval()
    return model
