"""The teacher MLP's weights in one layout for both families.

An MLP is ``sum_i w_i(x) * v_i + b`` with neuron weight ``w_i(x) = act(x·k_i + c_i)``
(times ``x·u_i + e_i`` for SwiGLU). GPT-2 keeps ``c_fc``/``c_proj`` as Conv1D ([in, out]
weights); Llama keeps ``gate_proj``/``up_proj``/``down_proj`` as Linear ([out, in]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import InputError


@dataclass
class MlpWeights:
    keys: torch.Tensor  # [I, hidden]
    key_bias: torch.Tensor  # [I]
    up: torch.Tensor | None  # [I, hidden] (SwiGLU only)
    up_bias: torch.Tensor | None  # [I]
    values: torch.Tensor  # [I, hidden]
    out_bias: torch.Tensor  # [hidden]
    activation: str

    @property
    def neurons(self) -> int:
        return int(self.keys.shape[0])

    @property
    def gated(self) -> bool:
        return self.up is not None

    def neuron_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Every neuron's weight for rows of ``x`` [T, hidden]: [T, I]."""
        from transformers.activations import ACT2FN

        weight = ACT2FN[self.activation](x @ self.keys.t() + self.key_bias)
        if self.up is not None:
            assert self.up_bias is not None
            weight = weight * (x @ self.up.t() + self.up_bias)
        return weight

    def importance(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """How much each neuron contributes: mean |weight| on ``x`` (or key norms) x |value|."""
        if x is not None:
            strength = self.neuron_weights(x).abs().mean(dim=0)
        else:
            strength = self.keys.norm(dim=-1)
            if self.up is not None:
                strength = strength * self.up.norm(dim=-1)
        return strength * self.values.norm(dim=-1)


def mlp_weights(mlp: Any, family: str, config: Any) -> MlpWeights:
    """Read the weights of a GPT-2 or Llama MLP module (detached copies, float32)."""

    def grab(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().clone()

    if family == "gpt2":
        keys = grab(mlp.c_fc.weight).t().contiguous()
        return MlpWeights(
            keys=keys, key_bias=grab(mlp.c_fc.bias), up=None, up_bias=None,
            values=grab(mlp.c_proj.weight), out_bias=grab(mlp.c_proj.bias),
            activation=str(config.activation_function),
        )
    if family == "llama":
        neurons, hidden = mlp.gate_proj.weight.shape

        def bias_of(linear: Any, size: int) -> torch.Tensor:
            return grab(linear.bias) if linear.bias is not None else torch.zeros(size)

        return MlpWeights(
            keys=grab(mlp.gate_proj.weight), key_bias=bias_of(mlp.gate_proj, neurons),
            up=grab(mlp.up_proj.weight), up_bias=bias_of(mlp.up_proj, neurons),
            values=grab(mlp.down_proj.weight).t().contiguous(),
            out_bias=bias_of(mlp.down_proj, hidden), activation=str(config.hidden_act),
        )
    raise InputError(f"unsupported model family {family!r}; supported: gpt2, llama")
