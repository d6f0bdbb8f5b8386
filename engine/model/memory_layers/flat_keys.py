"""Flat keys in the hidden space: the MLP's own form, one key (and bias) per slot.

The weight of slot i is ``act(x·k_i + b_i)``, times ``x·u_i + e_i`` when gated (SwiGLU). With every
slot read this is exactly a two-layer MLP whose values are the output weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FlatKeys(nn.Module):
    def __init__(self, hidden_size: int, slots: int, activation: str, gated: bool) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.activation_name = activation
        self.act = ACT2FN[activation]
        bound = 1 / math.sqrt(hidden_size)
        self.keys = nn.Parameter(torch.empty(slots, hidden_size))
        nn.init.uniform_(self.keys, -bound, bound)
        self.bias = nn.Parameter(torch.zeros(slots))
        self.up: nn.Parameter | None = None
        self.up_bias: nn.Parameter | None = None
        if gated:
            self.up = nn.Parameter(torch.empty(slots, hidden_size))
            nn.init.uniform_(self.up, -bound, bound)
            self.up_bias = nn.Parameter(torch.zeros(slots))

    @property
    def num_slots(self) -> int:
        return int(self.keys.shape[0])

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Every slot's weight for each row of ``x`` [T, hidden]: [T, slots]."""
        weight = self.act(torch.addmm(self.bias, x, self.keys.t()))
        if self.up is not None:
            assert self.up_bias is not None
            weight = weight * torch.addmm(self.up_bias, x, self.up.t())
        return weight
