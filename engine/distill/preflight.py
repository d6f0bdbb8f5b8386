"""Checks of a distillation run against its teacher's config, before anything is created.

Only the teacher's ``config.json`` is read (no weights): the layers must exist, a block must
fit the teacher's context, and the run must fit in this machine's RAM. The memory estimate
is a lower bound (parameters x 4 bytes: the teacher, its student copy, the memory layers,
the logits of one batch, the captured layer-local pairs), so it only refuses runs that
cannot possibly fit, such as ``num_subkeys=1000000`` on thirty layers.
"""

from __future__ import annotations

from typing import Any, Protocol

from engine.errors import InputError
from engine.model.memory_layers.budget import BYTES_PER_PARAMETER, check_fits, format_bytes


class RunSettings(Protocol):
    """The settings of a ``DistillConfig`` these checks read (``DistillConfig.preflight`` calls
    them, so this module cannot import it back)."""

    teacher: str
    layers: str
    memory: str
    hparams: dict[str, Any]
    block_size: int
    batch_size: int
    local_tokens: int


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    data: dict[str, Any] = config.to_dict()
    return data


def teacher_context(config: dict[str, Any]) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def memory_layer_bytes(run: RunSettings, teacher: dict[str, Any]) -> int:
    """Bytes of one replaced layer, its settings checked against the teacher's shapes."""
    from engine.model.anatomy import mlp_shape

    hidden, inner, _activation, _gated = mlp_shape(teacher)
    if run.memory == "dense":
        from engine.distill.build import dense_settings

        width, init = dense_settings(run.hparams, 64)
        if init == "mlp" and width > inner:
            raise InputError(f"width={width} exceeds the teacher MLP's {inner} neurons; give "
                             f"width <= {inner}")
        parameters = 2 * hidden * width + width + hidden
        check_fits(parameters * BYTES_PER_PARAMETER, f"one dense layer of width {width}",
                   "give a smaller width")
        return parameters * BYTES_PER_PARAMETER
    from engine.model.surgery import memory_config

    options = {k: v for k, v in run.hparams.items() if k != "init"}
    return memory_config(teacher, run.memory, options).memory_bytes()  # type: ignore[arg-type]


def check_against_teacher(run: RunSettings) -> None:
    """Refuse ``run`` when its teacher's config shows it cannot work (see the module doc)."""
    from engine.model.anatomy import hidden_size, resolve_layers
    from engine.model.loading import model_config
    from engine.model.model_files import (
        BUILTIN_SPECS,
        check_model_spec,
        check_spec_text,
        is_student_dir,
        model_parameters,
    )

    check_spec_text(run.teacher, "--teacher")
    if run.teacher not in BUILTIN_SPECS and is_student_dir(run.teacher):
        raise InputError(f"{run.teacher} is a student; distill from its teacher instead")
    check_model_spec(run.teacher, "--teacher")  # config and weight files, none read yet
    teacher = _as_dict(model_config(run.teacher))
    layers = resolve_layers(run.layers, teacher)
    context = teacher_context(teacher)
    if context is not None and run.block_size > context:
        raise InputError(f"block_size={run.block_size} exceeds the teacher's context of "
                         f"{context} tokens; give --block-size {context} or less")
    per_layer = memory_layer_bytes(run, teacher)
    try:
        teacher_bytes = model_parameters(teacher) * BYTES_PER_PARAMETER
    except (KeyError, TypeError):  # a config without every size (a GGUF read): skip it
        teacher_bytes = 0
    vocab = teacher.get("vocab_size") or 0
    logits = 2 * run.batch_size * run.block_size * int(vocab) * BYTES_PER_PARAMETER
    pairs = 2 * run.local_tokens * hidden_size(teacher) * len(layers) * BYTES_PER_PARAMETER
    memory = per_layer * len(layers)
    needed = 2 * teacher_bytes + memory + logits + pairs
    parts = [f"teacher and student copy {format_bytes(2 * teacher_bytes)}",
             f"{len(layers)} memory layer(s) {format_bytes(memory)}",
             f"logits of a batch {format_bytes(logits)}"]
    if pairs:
        parts.append(f"local pairs {format_bytes(pairs)}")
    check_fits(needed, f"this run ({', '.join(parts)})",
               "give fewer --layers, smaller --hparam sizes, or a smaller --batch-size, "
               "--block-size or --local-tokens")
