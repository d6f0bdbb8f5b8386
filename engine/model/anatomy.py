"""What a model looks like: its family, sizes, decoder layers, MLPs and layer specs.

The one place that knows where GPT-2 and Llama keep their blocks (``transformer.h`` /
``model.layers``), what their configs call the hidden and MLP sizes, and how a layer spec
("all", "3", "1,5,9", "8-10", "-1", "middle") becomes indexes. Everything here reads a model,
a Hugging Face config, a ``config.json`` dict or a path to one: sizes and layer specs resolve
without loading any weight. Importing it costs nothing heavy: torch loads only when a
model is handed in (so file-only checks before the workbench's first frame can use it too).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from engine.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

SUPPORTED_FAMILIES = ("gpt2", "llama")
LAYER_PATHS = {"gpt2": ("transformer", "h"), "llama": ("model", "layers")}
GATED = {"gpt2": False, "llama": True}  # Llama's MLP is SwiGLU (gate * up), GPT-2's is not


# --- the model and its config ----------------------------------------------------------------


def _is_module(value: Any, kind: str = "Module") -> bool:
    """``isinstance(value, torch.nn.<kind>)`` without importing torch: a model can only
    exist once torch has been imported."""
    loaded = sys.modules.get("torch")
    return loaded is not None and isinstance(value, getattr(loaded.nn, kind))


def unwrap(model: Any) -> nn.Module:
    """Accept a ``LoadedModel`` (anything with ``.model`` and ``.tokenizer``) or a bare model."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "tokenizer") and _is_module(inner):
        return inner
    if not _is_module(model):
        raise InputError(f"expected a model, got {type(model).__name__}")
    return model


def config_of(source: Any) -> Any:
    """The config of ``source``: a model, a ``LoadedModel``, a config object, a ``config.json``
    dict, or a path to a ``config.json`` (or the directory holding one)."""
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        path = path / "config.json" if path.is_dir() else path
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is not a readable config.json ({exc})") from exc
        return data
    if isinstance(source, dict):
        return source
    if _is_module(source) or hasattr(source, "tokenizer"):
        config = getattr(unwrap(source), "config", None)
        if config is None:
            raise InputError(f"{type(source).__name__} has no config; give a Hugging Face model")
        return config
    return source


def _field(config: Any, *names: str) -> Any:
    """The first of ``names`` set in ``config`` (an object or a dict), else None."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return None


def family_of(source: Any) -> str:
    """"gpt2" or "llama", from the config's ``model_type``; anything else is refused."""
    family = _field(config_of(source), "model_type")
    if family not in SUPPORTED_FAMILIES:
        raise InputError(f"unsupported architecture {family!r}; model surgery supports the "
                         f"{' and '.join(SUPPORTED_FAMILIES)} families")
    return str(family)


def num_layers(source: Any) -> int:
    """How many decoder layers ``source`` has (``num_hidden_layers``, GPT-2's ``n_layer``)."""
    count = _field(config_of(source), "num_hidden_layers", "n_layer")
    if count is None:
        raise InputError("the model's config gives no layer count (num_hidden_layers)")
    return int(count)


def hidden_size(source: Any) -> int:
    """The width of the hidden states (``hidden_size``, GPT-2's ``n_embd``)."""
    size = _field(config_of(source), "hidden_size", "n_embd")
    if size is None:
        raise InputError("the model's config gives no hidden size (hidden_size)")
    return int(size)


def mlp_size(source: Any) -> int:
    """The MLP's neuron count: Llama's ``intermediate_size``; GPT-2's ``n_inner``, which is
    unset (4 x hidden) in most GPT-2 configs."""
    config = config_of(source)
    if family_of(config) == "gpt2":
        inner = _field(config, "n_inner")
        return int(inner) if inner is not None else 4 * hidden_size(config)
    return int(_field(config, "intermediate_size"))


def mlp_size_field(family: str) -> str:
    """The config field that holds the MLP width of ``family``."""
    return "n_inner" if family == "gpt2" else "intermediate_size"


def activation(source: Any) -> str:
    """The MLP's activation name as the config gives it (``gelu_new``, ``silu``...)."""
    config = config_of(source)
    if family_of(config) == "gpt2":
        return str(_field(config, "activation_function") or "gelu_new")
    return str(_field(config, "hidden_act") or "silu")


def mlp_shape(source: Any) -> tuple[int, int, str, bool]:
    """(hidden size, MLP width, activation name, gated) of the model's MLPs."""
    config = config_of(source)
    return hidden_size(config), mlp_size(config), activation(config), GATED[family_of(config)]


# --- decoder layers and their MLPs -----------------------------------------------------------


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder blocks, in order (``transformer.h`` for GPT-2, ``model.layers`` for Llama)."""
    module = unwrap(model)
    for path in LAYER_PATHS.values():
        node: Any = module
        for part in path:
            node = getattr(node, part, None)
        if _is_module(node, "ModuleList"):
            return node
    raise InputError(
        f"{type(module).__name__} is not a supported architecture; give a GPT-2 or Llama model"
    )


def mlp_of(model: Any, layer: int) -> nn.Module:
    """The module in the MLP position of ``layer`` (a memory layer in a student)."""
    mlp = decoder_layers(model)[layer].mlp
    assert _is_module(mlp)
    return cast("nn.Module", mlp)


def set_mlp(model: Any, layer: int, module: nn.Module) -> None:
    """Put ``module`` in the MLP position of ``layer`` (it must take and return hidden states)."""
    decoder_layers(model)[layer].mlp = module


def layer_mlps(model: Any, layers: Iterable[int]) -> dict[int, nn.Module]:
    """The MLP (or the memory module that replaced it) of each chosen layer, checked."""
    blocks = decoder_layers(model)
    out: dict[int, nn.Module] = {}
    for index in layers:
        if not 0 <= index < len(blocks):
            raise InputError(
                f"unknown layer {index}: the model has {len(blocks)} layers (0..{len(blocks) - 1})"
            )
        out[index] = mlp_of(model, index)
    return out


def layer_prefixes(model: Any, layers: Iterable[int]) -> list[str]:
    """State-dict prefixes of the chosen layers' MLP modules ("model.layers.2.mlp.")."""
    module = unwrap(model)
    names = {id(child): name for name, child in module.named_modules()}
    return [names[id(mlp)] + "." for mlp in layer_mlps(module, layers).values()]


# --- MLP hooks -------------------------------------------------------------------------------


@dataclass
class Captured:
    """Each captured layer's MLP input and output ([batch, tokens, hidden], detached)."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


class StopForward(Exception):
    """Raised by a capture hook once the last wanted layer ran: the rest is not needed."""


@contextmanager
def capture_mlps(mlps: dict[int, nn.Module], *, stop_early: bool = False) -> Iterator[Captured]:
    """Record each given MLP's input and output during the forward passes inside the block
    (the last forward wins).

    With ``stop_early`` the forward pass is cut short (``StopForward``, swallowed here) right
    after the highest chosen MLP, which saves running the layers above it.
    """
    captured = Captured()
    handles = []
    last = max(mlps) if mlps else -1
    for index, module in mlps.items():
        def hook(_module: nn.Module, inputs: Any, output: Any, index: int = index) -> None:
            captured.inputs[index] = inputs[0].detach()
            captured.outputs[index] = output.detach()
            if stop_early and index == last:
                raise StopForward
        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def mlp_io(model: Any, input_ids: torch.Tensor, layers: Iterable[int]
           ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One forward of ``input_ids``; each layer's MLP input and output flattened to [T, hidden].

    On a teacher this is the teacher-forced input of a memory layer and the output it should
    match; on a student, the memory layer's own input and output.
    """
    import torch

    module = unwrap(model)
    chosen = list(layers)
    with torch.no_grad(), capture_mlps(layer_mlps(module, chosen)) as captured:
        module(input_ids=input_ids)
    return {
        layer: (captured.inputs[layer].reshape(-1, captured.inputs[layer].shape[-1]),
                captured.outputs[layer].reshape(-1, captured.outputs[layer].shape[-1]))
        for layer in chosen
    }


def zeroed_mlps_hooks(model: Any, layers: Iterable[int]) -> list[Any]:
    """Forward hooks that make the chosen MLPs output zeros (remove the hooks to undo)."""

    import torch

    def zero(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        return torch.zeros_like(output)

    return [mlp.register_forward_hook(zero) for mlp in layer_mlps(model, layers).values()]


# --- layer specs -----------------------------------------------------------------------------

LAYER_SPEC_HELP = ("give layer indexes or 'all': an index, a comma list like 1,5,9, a range "
                   "like 8-10, negative indexes from the end, or 'middle'")


def resolve_layers(layers: str | int | Iterable[int], source: Any) -> list[int]:
    """Sorted unique layer indexes of a model with ``source`` layers (a count, a model or a
    config: see :func:`config_of`; no weights are read).

    A string is a spec a person wrote: "all", "middle" (the layer at half depth), an index,
    a comma list and ranges ("3,1-2"); negative indexes count from the end and repeats
    merge. Integers (one or an iterable) are exact indexes from code and are checked
    strictly: in range, not negative, each given once.
    """
    count = source if isinstance(source, int) and not isinstance(source, bool) \
        else num_layers(source)
    if isinstance(layers, str):
        return _parse_spec(layers, count)
    given: Any = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    try:
        items = list(given)
    except TypeError:
        raise InputError(f"layers={layers!r}: give layer indexes or 'all'") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise InputError(f"layer index {item!r} is not an integer")
        if not 0 <= item < count:
            raise InputError(f"layer index {item} is out of range; this model has {count} "
                             f"layers (0..{count - 1})")
    if len(set(items)) != len(items):
        raise InputError(f"layers {items} repeat an index; give each layer once")
    return sorted(items)


def _parse_spec(spec: str, count: int) -> list[int]:
    text = spec.strip().lower()
    if text == "all":
        return list(range(count))
    chosen: set[int] = set()
    parts = [piece.strip() for piece in text.split(",")]
    if not any(parts):
        raise InputError(f"no layers in {spec!r}; give 'all' or layer indexes")
    for part in parts:
        if not part:  # "1,,2" or "3,": a slip, not a request for fewer layers
            raise InputError(f"bad layer list {spec!r} (an empty item); {LAYER_SPEC_HELP}")
        try:
            if part == "middle":
                low = high = count // 2
            elif "-" in part[1:]:
                cut = part.index("-", 1)
                low, high = int(part[:cut]), int(part[cut + 1:])
            else:
                low = high = int(part)
        except ValueError:
            raise InputError(f"bad layer list {spec!r}; {LAYER_SPEC_HELP}") from None
        for end in (low, high):  # before listing: "0-999999999999" would fill RAM
            if not -count <= end < count:
                raise InputError(
                    f"unknown layer {end}: the teacher has {count} layers (0..{count - 1})")
        indexes = list(range(low, high + 1))
        if not indexes:  # outside the try: InputError is a ValueError too
            raise InputError(f"empty layer range {part!r}; write it low-high")
        for index in indexes:
            resolved = index + count if index < 0 else index
            if not 0 <= resolved < count:
                raise InputError(
                    f"unknown layer {index}: the teacher has {count} layers (0..{count - 1})"
                )
            chosen.add(resolved)
    return sorted(chosen)
