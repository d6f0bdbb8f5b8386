"""Model surgery: clone a GPT-2 or Llama model and replace the MLPs of chosen layers.

``convert(teacher, layers, kind, **hparams)`` deep-copies the teacher, swaps the ``mlp``
module of each chosen decoder layer for a memory layer with the same call signature
(``mlp(hidden_states) -> hidden_states``), and leaves every other weight untouched, so Hugging
Face ``forward`` and ``generate`` (with its KV cache) run the student unchanged.

Everything about the request (family, layer indexes, kind, hyper-parameters, init) is checked
before the model is cloned.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import (
    family_of,
    mlp_io,
    mlp_of,
    mlp_shape,
    resolve_layers,
    set_mlp,
    unwrap,
)
from engine.model.memory_layers.config import (
    ASSOCIATIVE_RECIPE,
    AssociativeConfig,
    FeaturalConfig,
)
from engine.model.memory_layers.teacher_mlp import MlpWeights, mlp_weights

KINDS = ("featural", "associative")
INITS = ("mlp", "data", "random")
STUDENT_ATTRIBUTE = "mindset_student"
SPEC_FORMAT = 1


@dataclass
class StudentSpec:
    """What makes a student: its teacher, the replaced layers, their kind and settings."""

    teacher: str
    family: str
    layers: list[int]
    kind: str
    hparams: dict[str, Any]  # the resolved config of every memory layer (same for all)
    init: str = "mlp"
    format: int = SPEC_FORMAT
    notes: dict[str, Any] = field(default_factory=dict)
    # Per-layer settings over ``hparams`` ({"15": {"slots": 1600, ...}}): layers grown later.
    layer_hparams: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- a student's parts ----------------------------------------------------------------------


def student_spec(model: Any) -> StudentSpec | None:
    """The student spec of a converted model, ``None`` for a plain teacher."""
    spec = getattr(unwrap(model), STUDENT_ATTRIBUTE, None)
    return spec if isinstance(spec, StudentSpec) else None


def memory_layers(model: Any) -> dict[int, nn.Module]:
    """``{layer index: memory module}`` for every replaced layer of a student ({} otherwise)."""
    spec = student_spec(model)
    if spec is None:
        return {}
    return {layer: mlp_of(model, layer) for layer in spec.layers}


# --- validation ------------------------------------------------------------------------------


def memory_config(model: nn.Module, kind: str, hparams: dict[str, Any]
                  ) -> FeaturalConfig | AssociativeConfig:
    hidden, inner, activation, gated = mlp_shape(model)
    if kind == "featural":
        config = FeaturalConfig.from_hparams(hidden, hparams, intermediate_size=inner,
                                             activation=activation, gated=gated)
        if config.keys == "routed" and config.slots < inner:
            raise InputError(f"slots={config.slots} is fewer than the teacher MLP's {inner} "
                             f"neurons; routed keys start from every neuron, give slots >= "
                             f"{inner} (more slots split neurons)")
        if config.keys == "flat" and config.slots > inner:
            raise InputError(f"slots={config.slots} exceeds the teacher MLP's {inner} neurons; "
                             f"flat keys are initialised from them, give slots <= {inner}")
        return config
    if kind == "associative":
        return AssociativeConfig.from_hparams(hidden, hparams)
    raise InputError(f"kind={kind!r} is not a memory kind; use one of {', '.join(KINDS)}")


def associative_base(model: nn.Module, config: FeaturalConfig | AssociativeConfig
                     ) -> FeaturalConfig | None:
    """The featural memory holding the teacher's neurons inside an associative layer of the
    recipe's form (None for the original form and for featural layers)."""
    if not isinstance(config, AssociativeConfig) or not config.reads:
        return None
    hidden, inner, activation, gated = mlp_shape(model)
    return FeaturalConfig.from_hparams(hidden, {"keys": config.base}, intermediate_size=inner,
                                       activation=activation, gated=gated)


def build_memory(config: FeaturalConfig | AssociativeConfig,
                 base: FeaturalConfig | None = None) -> nn.Module:
    if isinstance(config, FeaturalConfig):
        from engine.model.memory_layers.featural import FeaturalMemory

        return FeaturalMemory(config)
    from engine.model.memory_layers.associative import AssociativeMemory

    return AssociativeMemory(config, base)


# --- conversion ------------------------------------------------------------------------------


def convert(
    teacher: Any,
    layers: Any,
    kind: str = "featural",
    *,
    init: str = "mlp",
    calibration: torch.Tensor | None = None,
    teacher_spec: str | None = None,
    **hparams: Any,
) -> nn.Module:
    """A student: a copy of ``teacher`` with the MLPs of ``layers`` replaced by memory layers.

    ``teacher``: a Hugging Face GPT-2/Llama causal LM or a ``LoadedModel``. ``layers``: an
    index, indexes, or "all". ``kind``: "featural" or "associative". ``init``: "mlp" (from
    the replaced MLP's own weights), "data" (fitted to that MLP's inputs and outputs on
    ``calibration`` token ids [batch, tokens]) or "random". ``hparams``: the memory layer's
    settings (see ``FeaturalConfig`` / ``AssociativeConfig``). The teacher is not modified.
    """
    model = unwrap(teacher)
    family = family_of(model)
    if student_spec(model) is not None:
        raise InputError("this model is already a student; convert its teacher instead")
    chosen = resolve_layers(layers, model)
    if kind == "associative":
        hparams = {**ASSOCIATIVE_RECIPE, **hparams}
    config = memory_config(model, kind, hparams)
    if init not in INITS:
        raise InputError(f"init={init!r} is not an initialisation; use one of {', '.join(INITS)}")
    if init == "data" and chosen and calibration is None:
        raise InputError("init='data' needs calibration token ids (calibration=[batch, tokens])")
    if teacher_spec is None:
        teacher_spec = str(getattr(teacher, "spec", None) or
                           getattr(model.config, "_name_or_path", "") or family)

    io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    routed = isinstance(config, FeaturalConfig) and config.keys == "routed"
    base = associative_base(model, config)
    if base is not None and calibration is None and chosen:
        calibration = sample_token_ids(model)  # whitening the read keys needs some inputs
    if (init == "data" or routed or base is not None) and chosen and calibration is not None:
        assert calibration is not None
        io = mlp_io(model, calibration, chosen)
    student = copy.deepcopy(model)
    parameter = next(model.parameters())
    for layer in chosen:
        teacher_mlp = mlp_weights(mlp_of(model, layer), family, model.config)
        memory = build_memory(config, base)
        inputs, outputs = io.get(layer, (None, None))
        initialise(memory, init, teacher_mlp, inputs, outputs)
        memory.to(dtype=parameter.dtype, device=parameter.device)
        set_mlp(student, layer, memory)
    spec = StudentSpec(teacher=teacher_spec, family=family, layers=chosen, kind=kind,
                       hparams=_public_hparams(config), init=init)
    setattr(student, STUDENT_ATTRIBUTE, spec)
    student.eval()
    return student


def sample_token_ids(model: nn.Module, rows: int = 8, tokens: int = 64) -> torch.Tensor:
    """Fixed pseudo-random token ids: inputs for statistics when no calibration text is given."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 256)
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (rows, tokens), generator=generator)


def _public_hparams(config: FeaturalConfig | AssociativeConfig) -> dict[str, Any]:
    data = config.as_dict()
    data.pop("hidden_size")
    return data


def initialise(memory: nn.Module, init: str, teacher_mlp: MlpWeights,
               inputs: torch.Tensor | None, outputs: torch.Tensor | None) -> None:
    """Start ``memory`` close to ``teacher_mlp`` (or leave it random)."""
    if init == "random":
        return
    from engine.model.memory_layers.featural import FeaturalMemory

    if isinstance(memory, FeaturalMemory):
        from engine.model.memory_layers import init_featural

        if memory.routed is not None:
            from engine.model.memory_layers.init_routed import init_routed_from_mlp

            init_routed_from_mlp(memory, teacher_mlp,
                                 inputs.float() if inputs is not None else None)
        elif memory.flat is not None:
            x = inputs.float() if inputs is not None else None
            init_featural.init_flat_from_mlp(memory, teacher_mlp, x)
        elif init == "data":
            assert inputs is not None and outputs is not None
            init_featural.init_product_from_data(memory, inputs, outputs)
        else:
            init_featural.init_product_from_neurons(memory, teacher_mlp)
        return
    from engine.model.memory_layers.associative import AssociativeMemory
    from engine.model.memory_layers.init_associative import init_associative

    assert isinstance(memory, AssociativeMemory)
    if memory.base is not None:
        from engine.model.memory_layers import init_featural
        from engine.model.memory_layers.init_associative import whiten_read_keys

        init_featural.init_flat_from_mlp(memory.base, teacher_mlp)
        assert inputs is not None
        whiten_read_keys(memory, inputs.float())
        return
    init_associative(memory, init, teacher_mlp, inputs, outputs)


def attach_memory_layers(model: nn.Module, spec: StudentSpec) -> nn.Module:
    """Put freshly built (random) memory layers into ``model`` in place, as ``spec`` says.

    Used when loading a saved student: the weights are loaded afterwards.
    """
    family = family_of(model)
    if family != spec.family:
        raise InputError(f"the student was made from a {spec.family} model, not {family}")
    chosen = resolve_layers(spec.layers, model)
    parameter = next(model.parameters())
    for layer in chosen:
        own = spec.layer_hparams.get(str(layer), {})
        config = memory_config(model, spec.kind, {**spec.hparams, **own})
        memory = build_memory(config, associative_base(model, config))
        memory = memory.to(dtype=parameter.dtype, device=parameter.device)
        set_mlp(model, layer, memory)
    setattr(model, STUDENT_ATTRIBUTE, spec)
    return model


def add_memory_slots(student: nn.Module, layer: int, keys: torch.Tensor, values: torch.Tensor,
                     query: torch.Tensor, *, up: torch.Tensor | None = None,
                     selectivity: float = 1.0, fact: bool = False) -> list[int]:
    """Grow the routed memory of ``layer`` by slots that ``query`` routes to (see
    :meth:`FeaturalMemory.add_slots`); the student's spec records the layer's new size so
    that a saved student loads with it."""
    spec = student_spec(student)
    layers = memory_layers(student)
    if spec is None or layer not in layers:
        raise InputError(f"layer {layer} has no memory layer; this student's memory layers "
                         f"are {', '.join(map(str, sorted(layers))) or 'none'}")
    module = layers[layer]
    add = getattr(module, "add_slots", None)
    if add is None:
        raise InputError(f"layer {layer} holds an associative memory, which grows by itself")
    slots: list[int] = add(keys, values, query, up=up, selectivity=selectivity, fact=fact)
    record_layer_size(student, layer)
    return slots


def record_layer_size(student: nn.Module, layer: int) -> None:
    """Write a routed layer's current size into the student's spec (a save keeps it)."""
    spec = student_spec(student)
    config: Any = memory_layers(student)[layer].config
    if spec is not None:
        spec.layer_hparams[str(layer)] = {"slots": config.slots,
                                          "groups_fixed": config.groups_fixed,
                                          "fact_groups": config.fact_groups}
