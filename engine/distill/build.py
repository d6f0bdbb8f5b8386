"""Building the student of a run: the teacher's clone with chosen MLPs replaced.

Memory students (featural, associative) come from the model surgery in
:mod:`engine.model.surgery`. The ``dense`` kind is the compute-matched control of the benchmark:
a dense MLP of a chosen width in place of each replaced MLP, trained the same way, so a memory
layer can be compared against a dense layer of the same active width. ``init="zero"`` (the
default) starts it as "MLP removed"; ``init="mlp"`` starts it as the teacher's MLP pruned to its
``width`` most important neurons, the fair control for a memory initialised from the MLP: the
same neurons available, chosen once for all tokens instead of per token.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from engine.errors import InputError
from engine.model.anatomy import family_of, hidden_size, layer_mlps, mlp_io, set_mlp
from engine.model.memory_layers.config import FeaturalConfig
from engine.model.memory_layers.featural import FeaturalMemory
from engine.model.memory_layers.init_featural import init_flat_from_mlp


class DenseMLP(nn.Module):
    """A plain two-layer MLP with the teacher MLP's call signature (the control)."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, width)
        self.act = nn.GELU()
        self.down = nn.Linear(width, hidden_size)
        nn.init.zeros_(self.down.weight)  # starts as "MLP removed" and learns from there
        nn.init.zeros_(self.down.bias)

    def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        return self.down(self.act(self.up(hidden_states)))


class PrunedMLP(FeaturalMemory):
    """The teacher MLP restricted to some of its neurons, every token using the same ones: a
    flat-key memory whose slots are those neurons and which reads every slot (dense)."""


DENSE_INITS = ("zero", "mlp")


def dense_settings(hparams: dict[str, Any], default: int) -> tuple[int, str]:
    width = hparams.get("width", default)
    init = hparams.get("init", "zero")
    unknown = sorted(set(hparams) - {"width", "init"})
    if unknown:
        raise InputError(
            f"unknown dense hyper-parameter(s) {', '.join(unknown)}; known: init, width")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise InputError(f"width={width!r} must be a positive integer")
    if init not in DENSE_INITS:
        raise InputError(f"init={init!r} for the dense control must be one of "
                         f"{', '.join(DENSE_INITS)}")
    return width, init


def pruned_mlps(teacher: nn.Module, layers: list[int], width: int,
                calibration: Any) -> dict[int, PrunedMLP]:
    """Each layer's MLP cut to its ``width`` most important neurons (measured on the
    calibration tokens when given, else from the weights)."""
    from engine.model.memory_layers.teacher_mlp import mlp_weights

    family = family_of(teacher)
    inputs = mlp_io(teacher, calibration, layers) if calibration is not None else {}
    out: dict[int, PrunedMLP] = {}
    for index, mlp in layer_mlps(teacher, layers).items():
        weights = mlp_weights(mlp, family, teacher.config)
        if width > weights.neurons:
            raise InputError(f"width={width} exceeds the {weights.neurons} neurons of layer "
                             f"{index}'s MLP; give width <= {weights.neurons}")
        config = FeaturalConfig.from_hparams(
            hidden_size(teacher), {"keys": "flat", "slots": width, "topk": 0},
            intermediate_size=weights.neurons, activation=weights.activation,
            gated=weights.gated)
        pruned = PrunedMLP(config)
        x = inputs[index][0].float() if index in inputs else None
        init_flat_from_mlp(pruned, weights, x)  # keeps the most important neurons on x
        out[index] = pruned
    return out


def build_student(teacher: nn.Module, layers: list[int], kind: str, hparams: dict[str, Any],
                  *, calibration: Any = None, teacher_spec: str | None = None) -> nn.Module:
    """A student whose only trainable parameters are the replaced layers.

    ``hparams`` go to the memory layers (``init`` included: "mlp", "data" or "random");
    ``calibration`` token ids feed ``init="data"``.
    """
    if kind == "dense":
        width, init = dense_settings(hparams, 64)
        layer_mlps(teacher, layers)  # checks the layer indexes first
        pruned = pruned_mlps(teacher, layers, width, calibration) if init == "mlp" else {}
        student = copy.deepcopy(teacher)
        for index in layers:
            set_mlp(student, index, pruned.get(index) or DenseMLP(hidden_size(student), width))
    else:
        from engine.model.surgery import convert

        options = dict(hparams)
        if (options.get("init") == "data" or options.get("keys") == "routed"
                or kind == "associative"):
            # Routed keys group neurons that fire together; read keys are whitened.
            options["calibration"] = calibration
        student = convert(teacher, layers, kind, teacher_spec=teacher_spec, **options)
    freeze_all_but(student, layers)
    return student


def freeze_all_but(student: nn.Module, layers: list[int]) -> None:
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    for module in layer_mlps(student, layers).values():
        if getattr(module, "base", None) is not None:
            continue  # the associative recipe: the teacher's entries, exact; reading writes
        for parameter in module.parameters():
            parameter.requires_grad_(True)
