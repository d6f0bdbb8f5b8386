"""Widen and narrow the MLP of one decoder layer (GPT-2 and Llama).

An MLP is a sum over its neurons: ``mlp(x) = Σ_j a_j(x) · w_j + b``, with ``a_j`` the
neuron's activation (GPT-2: ``act(x·c_fc_j + c)``; Llama: ``act(x·gate_j) · (x·up_j)``) and
``w_j`` its output weights (a column of ``down_proj``, a row of GPT-2's ``c_proj``).

* **Growing** appends neurons whose input weights (and biases) are drawn from a normal
  distribution with the mean and standard deviation of the existing ones, per projection,
  and whose output weights are zero: they add ``a_j · 0`` and the layer's function is
  unchanged; training gives them a share.
* **Pruning** removes exactly the named neurons (their input rows and output weights), or the
  ``count`` least important ones on calibration text.
* **Importance** of neuron ``j`` on calibration tokens ``t``:
  ``I_j = mean_t |a_j(x_t)| · ‖w_j‖₂``, the mean size of what it adds to the residual stream.

The result is always the family's own Hugging Face MLP class (``LlamaMLP`` with three
``nn.Linear``, ``GPT2MLP`` with two ``Conv1D``), so state-dict names stay standard; a layer
whose width differs from the config is described by the architecture record
(:mod:`engine.model.architecture.record`), which rebuilds it with :func:`build_mlp`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import (
    StopForward,
    decoder_layers,
    family_of,
    hidden_size,
    mlp_of,
    set_mlp,
    unwrap,
)

MAX_WIDTH_FACTOR = 16  # a layer's MLP may hold at most this many times the hidden size


# --- reading an MLP --------------------------------------------------------------------------


def _check_layer(model: nn.Module, layer: int) -> None:
    count = len(decoder_layers(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < count:
        raise InputError(f"layer {layer!r} is out of range; the model has {count} layers "
                         f"(0..{count - 1})")


def dense_mlp(model: Any, layer: int) -> nn.Module:
    """The Hugging Face MLP of ``layer``, checked to be one (not a memory layer)."""
    from engine.model.surgery import student_spec

    source = unwrap(model)
    _check_layer(source, layer)
    spec = student_spec(source)
    if spec is not None and layer in spec.layers:
        raise InputError(f"layer {layer} holds a memory layer, not an MLP; resize it with "
                         "engine.model.architecture.memory_size.resize_memory")
    mlp = mlp_of(source, layer)
    family = family_of(source)
    if family == "llama":
        ok = all(isinstance(getattr(mlp, name, None), nn.Linear)
                 for name in ("gate_proj", "up_proj", "down_proj"))
    else:
        from transformers.pytorch_utils import Conv1D

        ok = all(isinstance(getattr(mlp, name, None), Conv1D) for name in ("c_fc", "c_proj"))
    if not ok:
        raise InputError(f"layer {layer} holds a {type(mlp).__name__}, not the model's own "
                         "MLP; only a Hugging Face MLP can be resized here")
    return mlp


def mlp_width(model: Any, layer: int) -> int:
    """The neuron count of ``layer``'s MLP, read from its weights."""
    mlp: Any = dense_mlp(model, layer)
    if hasattr(mlp, "up_proj"):
        return int(mlp.up_proj.weight.shape[0])
    return int(mlp.c_fc.weight.shape[1])  # Conv1D weights are [in, out]


def _output_weights(mlp: Any) -> torch.Tensor:
    """Each neuron's output weights as rows, [width, hidden] (a view, not a copy)."""
    if hasattr(mlp, "down_proj"):
        return mlp.down_proj.weight.t()  # Linear [hidden, width]
    return mlp.c_proj.weight  # Conv1D [width, hidden]


def _output_module(mlp: Any) -> nn.Module:
    module = mlp.down_proj if hasattr(mlp, "down_proj") else mlp.c_proj
    assert isinstance(module, nn.Module)
    return module


# --- building an MLP of a given width --------------------------------------------------------


def _fresh_mlp(model: nn.Module, like: nn.Module, width: int) -> nn.Module:
    """An MLP of ``like``'s class, dtype and device with ``width`` neurons (weights unset)."""
    from transformers.initialization import no_init_weights

    config: Any = model.config
    reference = next(like.parameters())
    fresh: Any
    with no_init_weights():  # every weight is written by the caller
        if family_of(model) == "gpt2":
            fresh = type(like)(width, config)
        else:
            # LlamaMLP sizes itself from the config: build from a copy that has the new width,
            # then point it back at the model's own config.
            sized = copy.copy(config)
            sized.intermediate_size = width
            fresh = type(like)(sized)
            fresh.config = config
    return fresh.to(dtype=reference.dtype, device=reference.device)


def build_mlp(model: Any, layer: int, width: int) -> None:
    """Put a fresh MLP of ``width`` neurons in ``layer`` (in place), of the layer's own class,
    dtype and device, every weight zero: a skeleton to load saved weights into."""
    source = unwrap(model)
    old = dense_mlp(source, layer)
    _check_width(source, layer, width)
    fresh = _fresh_mlp(source, old, width)
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    fresh.train(old.training)
    set_mlp(source, layer, fresh)


def _check_width(model: nn.Module, layer: int, width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise InputError(f"MLP width {width!r} for layer {layer}: give a positive whole number")
    limit = MAX_WIDTH_FACTOR * hidden_size(model)
    if width > limit:
        raise InputError(f"layer {layer} would have {width} MLP neurons, past the limit of "
                         f"{limit} ({MAX_WIDTH_FACTOR}x the hidden size {hidden_size(model)})")


def _neuron_tensors(mlp: Any) -> dict[str, tuple[nn.Parameter, int]]:
    """Every tensor with one entry per neuron, and the dimension that indexes the neurons."""
    tensors: dict[str, tuple[nn.Parameter, int]] = {}
    if hasattr(mlp, "gate_proj"):
        for name in ("gate_proj", "up_proj"):
            linear = getattr(mlp, name)
            tensors[f"{name}.weight"] = (linear.weight, 0)
            if linear.bias is not None:
                tensors[f"{name}.bias"] = (linear.bias, 0)
        tensors["down_proj.weight"] = (mlp.down_proj.weight, 1)
    else:
        tensors["c_fc.weight"] = (mlp.c_fc.weight, 1)
        tensors["c_fc.bias"] = (mlp.c_fc.bias, 0)
        tensors["c_proj.weight"] = (mlp.c_proj.weight, 0)
    return tensors


def _is_output(name: str) -> bool:
    return name.startswith(("down_proj", "c_proj"))


def _rebuilt(model: nn.Module, layer: int, pieces: dict[str, torch.Tensor]) -> None:
    """Replace ``layer``'s MLP by one holding ``pieces`` (per-neuron tensors, new width);
    the output bias is carried over from the old MLP."""
    old: Any = mlp_of(model, layer)
    width = pieces["up_proj.weight" if hasattr(old, "up_proj") else "c_fc.bias"].shape[0]
    fresh: Any = _fresh_mlp(model, old, int(width))
    with torch.no_grad():
        new_state = dict(fresh.named_parameters())
        for name, tensor in pieces.items():
            new_state[name].copy_(tensor)
        out_bias: Any = _output_module(old).bias
        if out_bias is not None:
            target: Any = _output_module(fresh).bias
            target.copy_(out_bias)
    for parameter, source in zip(fresh.parameters(), old.parameters(), strict=True):
        parameter.requires_grad_(source.requires_grad)
    fresh.train(old.training)
    set_mlp(model, layer, fresh)


# --- importance ------------------------------------------------------------------------------


def check_calibration_ids(model: nn.Module, ids: Any) -> torch.Tensor:
    """``ids`` as calibration token ids [batch, tokens] within the model's vocabulary."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0 \
            or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError("calibration_ids must be token ids [batch, tokens] (a non-empty "
                         "integer tensor)")
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(f"calibration_ids hold ids outside the vocabulary (0..{vocab - 1})")
    return ids


def neuron_importance(model: Any, layer: int, calibration_ids: torch.Tensor) -> torch.Tensor:
    """``mean over tokens |activation_j| · ‖output weights_j‖`` for each neuron of ``layer``,
    [width] (float32), on the token ids ``calibration_ids`` [batch, tokens]."""
    source = unwrap(model)
    mlp: Any = dense_mlp(source, layer)
    ids = check_calibration_ids(source, calibration_ids)
    total: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: Any, _output: Any) -> None:
        # The output projection's input is exactly the neurons' activations.
        activations = inputs[0].detach().float()
        total.append(activations.abs().reshape(-1, activations.shape[-1]).mean(0))
        raise StopForward  # the layers above are not needed

    handle = _output_module(mlp).register_forward_hook(hook)
    was_training = source.training
    source.eval()
    try:
        with torch.no_grad():
            source(input_ids=ids.to(next(source.parameters()).device))
    except StopForward:
        pass
    finally:
        handle.remove()
        source.train(was_training)
    assert total, "the forward pass never reached the MLP"
    with torch.no_grad():
        norms = _output_weights(mlp).float().norm(dim=-1)
    return (total[0] * norms).cpu()


# --- growing and pruning ---------------------------------------------------------------------


def _draw(like: torch.Tensor, dim: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` new entries along ``dim`` from N(mean, std) of ``like``'s entries."""
    values = like.detach().float()
    mean = values.mean()
    std = values.std() if values.numel() > 1 else torch.tensor(0.0)
    if not math.isfinite(float(std)) or float(std) == 0.0:
        std = torch.tensor(0.02)
    shape = list(like.shape)
    shape[dim] = count
    noise = torch.randn(shape, generator=generator)
    return (noise * std + mean).to(like.dtype)


def grow_mlp(model: Any, layer: int, add: int, *, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose ``layer`` MLP has ``add`` more neurons; the function is
    unchanged (the new neurons' output weights are zero)."""
    source = unwrap(model)
    width = mlp_width(source, layer)
    if isinstance(add, bool) or not isinstance(add, int) or add < 1:
        raise InputError(f"grow by {add!r} neurons: give a positive whole number")
    _check_width(source, layer, width + add)
    result = copy.deepcopy(source)
    generator = torch.Generator().manual_seed(seed)
    pieces: dict[str, torch.Tensor] = {}
    for name, (tensor, dim) in _neuron_tensors(mlp_of(result, layer)).items():
        old = tensor.detach()
        if _is_output(name):
            extra = old.new_zeros([add if d == dim else s for d, s in enumerate(old.shape)])
        else:
            extra = _draw(old, dim, add, generator).to(old.device)
        pieces[name] = torch.cat([old, extra], dim=dim)
    _rebuilt(result, layer, pieces)
    return result


def prune_mlp(model: Any, layer: int, *, remove: list[int] | None = None,
              count: int | None = None, calibration_ids: torch.Tensor | None = None
              ) -> nn.Module:
    """A copy of ``model`` without the named neurons of ``layer`` (``remove``), or without its
    ``count`` least important ones on ``calibration_ids`` (see :func:`neuron_importance`).
    The remaining neurons keep their weights and their order."""
    source = unwrap(model)
    width = mlp_width(source, layer)
    if (remove is None) == (count is None):
        raise InputError("give either remove=[neuron indexes] or count=N (with "
                         "calibration_ids), not both or neither")
    if remove is not None:
        chosen = list(remove)
        for index in chosen:
            if isinstance(index, bool) or not isinstance(index, int) or \
                    not 0 <= index < width:
                raise InputError(f"neuron {index!r} is out of range: layer {layer} has "
                                 f"{width} neurons (0..{width - 1})")
        if len(set(chosen)) != len(chosen):
            raise InputError(f"neuron indexes {chosen} repeat; name each once")
        if not chosen:
            raise InputError("no neurons named to prune; give neuron indexes")
    else:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputError(f"count={count!r}: give a positive number of neurons to prune")
        if calibration_ids is None:
            raise InputError("count=N prunes the least important neurons, which needs "
                             "calibration_ids [batch, tokens] to measure them")
        chosen = []
    if (count is not None and count >= width) or len(chosen) >= width:
        raise InputError(f"pruning every neuron of layer {layer} leaves it no MLP; keep at "
                         "least one, or drop the layer instead")
    if remove is None:
        assert count is not None and calibration_ids is not None
        importance = neuron_importance(source, layer, calibration_ids)
        chosen = importance.argsort(stable=True)[:count].tolist()
    dropped = set(chosen)
    keep = torch.tensor([j for j in range(width) if j not in dropped], dtype=torch.long)
    result = copy.deepcopy(source)
    pieces = {name: tensor.detach().index_select(dim, keep.to(tensor.device))
              for name, (tensor, dim) in _neuron_tensors(mlp_of(result, layer)).items()}
    _rebuilt(result, layer, pieces)
    return result
