"""Initialise an associative memory close to the teacher MLP it replaces.

* ``mlp``: queries and keys project onto the principal directions of the MLP's input keys,
  values onto those of its output vectors; the memory starts holding one entry per neuron
  and head (the neuron's key and output vector, projected).
* ``data``: queries and keys whiten the principal directions of the MLP's calibration inputs;
  the memory starts holding calibration tokens (key: the projected input, value: the projected
  MLP output), so attention over the nearest entries is a kernel regression of the MLP; the
  value projection is the least-squares linear map from inputs to those values.
* ``random``: an empty memory and an output projection of zeros.

The recipe's form (``base="flat"``) copies the MLP into its base exactly and only needs the
read keys whitened (:func:`whiten_read_keys`).
"""

from __future__ import annotations

import math

import torch

from engine.model.memory_layers.associative import AssociativeMemory
from engine.model.memory_layers.teacher_mlp import MlpWeights


def _principal_rows(points: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` orthonormal directions: the top principal ones, random ones after."""
    _, _, vh = torch.linalg.svd(points, full_matrices=False)
    rows = vh[:count]
    if rows.shape[0] < count:
        generator = torch.Generator().manual_seed(seed)
        extra = torch.randn(count - rows.shape[0], points.shape[1], generator=generator)
        rows = torch.cat([rows, torch.nn.functional.normalize(extra, dim=-1)])
    return rows


def _per_head(rows: torch.Tensor, heads: int) -> torch.Tensor:
    return rows.view(heads, -1, rows.shape[-1])  # [heads, dim, hidden]


def _cap(count: int, memory: AssociativeMemory) -> int:
    limit = memory.config.initial_entries or memory.config.capacity
    return min(count, limit)


@torch.no_grad()
def init_associative(memory: AssociativeMemory, init: str, mlp: MlpWeights,
                     inputs: torch.Tensor | None, outputs: torch.Tensor | None) -> None:
    if init == "random":
        return
    if init == "data":
        assert inputs is not None and outputs is not None
        _init_from_data(memory, inputs.float(), outputs.float())
    else:
        _init_from_neurons(memory, mlp)


def _init_from_neurons(memory: AssociativeMemory, mlp: MlpWeights) -> None:
    c = memory.config
    key_rows = _principal_rows(mlp.keys, c.heads * c.key_dim, seed=11)
    value_rows = _principal_rows(mlp.values, c.heads * c.value_dim, seed=13)
    for proj in (memory.query_proj, memory.key_proj):
        proj.weight.copy_(key_rows)
        proj.bias.zero_()
    # A token's own entry carries no value until training teaches the value projection.
    assert memory.value_proj is not None
    memory.value_proj.weight.zero_()
    memory.value_proj.bias.zero_()
    memory.out_proj.weight.copy_(value_rows.t())
    memory.out_proj.bias.copy_(mlp.out_bias)
    keys = torch.einsum("hkd,nd->nhk", _per_head(key_rows, c.heads), mlp.keys)
    values = torch.einsum("hvd,nd->nhv", _per_head(value_rows, c.heads), mlp.values) / c.heads
    count = _cap(keys.shape[0] * c.heads, memory)
    memory.fill(keys.reshape(-1, c.key_dim)[:count], values.reshape(-1, c.value_dim)[:count])


def _init_from_data(memory: AssociativeMemory, x: torch.Tensor, y: torch.Tensor) -> None:
    c = memory.config
    n = x.shape[0]
    mean_x, mean_y = x.mean(0), y.mean(0)
    centred_x, centred_y = x - mean_x, y - mean_y
    _, singular, vh = torch.linalg.svd(centred_x, full_matrices=False)
    width = c.heads * c.key_dim
    rank = min(width, vh.shape[0])
    std = (singular[:rank] / math.sqrt(max(n - 1, 1))).clamp_min(1e-6)
    key_rows = _principal_rows(centred_x, width, seed=11)
    key_rows[:rank] = vh[:rank] / std.unsqueeze(1)
    for proj in (memory.query_proj, memory.key_proj):
        proj.weight.copy_(key_rows)
        proj.bias.copy_(-(key_rows @ mean_x))
    value_rows = _principal_rows(centred_y, c.heads * c.value_dim, seed=13)
    # Each head's softmax mixes values to a weighted mean, and the heads are summed.
    targets = centred_y @ value_rows.t() / c.heads  # [n, heads*dv]
    design = torch.cat([centred_x, torch.ones(n, 1)], dim=1)
    ridge = 1e-3 * torch.eye(design.shape[1])
    solution = torch.linalg.solve(design.t() @ design + ridge, design.t() @ targets)
    assert memory.value_proj is not None
    memory.value_proj.weight.copy_(solution[:-1].t())
    memory.value_proj.bias.copy_(solution[-1] - solution[:-1].t() @ mean_x)
    memory.out_proj.weight.copy_(value_rows.t())
    memory.out_proj.bias.copy_(mean_y)
    tokens = _cap(n * c.heads, memory) // c.heads
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(17))[:tokens]
    keys = ((x[chosen] - mean_x) @ key_rows.t()).view(-1, c.key_dim)
    values = targets[chosen].reshape(-1, c.value_dim)
    memory.fill(keys, values)


@torch.no_grad()
def whiten_read_keys(memory: AssociativeMemory, x: torch.Tensor) -> None:
    """Queries and keys of read entries: the top principal directions of the MLP's inputs,
    each scaled to unit variance, so distances have a known scale (unrelated contexts lie
    about ``2 * key_dim`` apart, squared) and the thresholds can be set per dimension."""
    dim = memory.config.key_dim
    mean = x.mean(0)
    centred = x - mean
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    rank = min(dim, vh.shape[0])
    rows = _principal_rows(centred, dim, seed=11)
    std = (singular[:rank] / math.sqrt(max(x.shape[0] - 1, 1))).clamp_min(1e-6)
    rows[:rank] = vh[:rank] / std.unsqueeze(1)
    for proj in (memory.query_proj, memory.key_proj):
        proj.weight.copy_(rows)
        proj.bias.copy_(-(rows @ mean))
