"""Teacher MLP inputs and outputs captured once for the layer-local stage.

Memory layers act on each token alone, so the layer-local stage does not need whole blocks:
one teacher pass over ``tokens`` training tokens records every replaced layer's (input,
output) pairs, and each local step then samples a batch of token rows from them. That turns
the stage from one teacher forward per step into a few matrix products per step, so it can
run thousands of steps over many epochs of the same tokens in the time a handful of teacher
passes would take.

Pairs are stored in bfloat16 (half the memory of float32; the relative rounding, 2^-8, sits
far below the errors the fit reaches) and the batch for a step is a pure function of the
seed, the step and the rank, so a resumed run samples exactly what the original would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.model.anatomy import capture_mlps

STORAGE_DTYPE = torch.bfloat16
CAPTURE_BLOCKS_PER_PASS = 4  # blocks per teacher forward while capturing


@dataclass
class LocalPairs:
    inputs: dict[int, torch.Tensor]  # layer -> [tokens, hidden]
    outputs: dict[int, torch.Tensor]

    @property
    def tokens(self) -> int:
        return next(iter(self.inputs.values())).shape[0] if self.inputs else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for part in (self.inputs, self.outputs) for t in part.values())

    def batch(self, step: int, size: int, *, seed: int, rank: int = 0, world: int = 1,
              ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """``size`` token rows for ``step`` on ``rank`` (as [1, size, hidden] float32)."""
        generator = torch.Generator().manual_seed(
            (seed * 1_000_003 + step) * max(world, 1) + rank)
        rows = torch.randint(0, self.tokens, (size,), generator=generator)
        pick = {layer: t[rows].float().unsqueeze(0) for layer, t in self.inputs.items()}
        want = {layer: t[rows].float().unsqueeze(0) for layer, t in self.outputs.items()}
        return pick, want


@torch.no_grad()
def capture_local_pairs(teacher: nn.Module, mlps: dict[int, nn.Module], blocks: torch.Tensor,
                        tokens: int) -> LocalPairs:
    """The chosen MLPs' (input, output) pairs on the first ``tokens`` tokens of ``blocks``.

    Each teacher pass stops right after the highest chosen layer.
    """
    block_size = blocks.shape[1]
    count = min(len(blocks), max(1, math.ceil(tokens / block_size)))
    inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in mlps}
    outputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in mlps}
    for begin in range(0, count, CAPTURE_BLOCKS_PER_PASS):
        chunk = blocks[begin: min(count, begin + CAPTURE_BLOCKS_PER_PASS)]
        with capture_mlps(mlps, stop_early=True) as captured:
            teacher(input_ids=chunk)
        for layer in mlps:
            hidden = captured.inputs[layer].shape[-1]
            inputs[layer].append(captured.inputs[layer].reshape(-1, hidden).to(STORAGE_DTYPE))
            outputs[layer].append(captured.outputs[layer].reshape(-1, hidden).to(STORAGE_DTYPE))
    return LocalPairs(inputs={k: torch.cat(v) for k, v in inputs.items()},
                      outputs={k: torch.cat(v) for k, v in outputs.items()})
