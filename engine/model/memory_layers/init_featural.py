"""Initialise a featural memory close to the teacher MLP it replaces.

* ``init_flat_from_mlp``: flat keys are the MLP's neurons (the most important ``slots`` of
  them); exact when every neuron is a slot and every slot is read.
* ``init_product_from_neurons``: weights only. The query projection spans the principal
  directions of the neurons' input keys; each half of each head's sub-keys is a k-means
  codebook of the projected neuron keys (product quantisation of the neurons); a slot's value
  is the sum of the output vectors of the neurons quantised to it.
* ``init_product_from_data``: from the MLP's inputs ``x`` and outputs ``y`` on calibration
  text. The query projection whitens the top principal directions of ``x``; sub-keys are
  spherical k-means codebooks of the projected inputs; each slot's value is the weighted mean
  of the outputs of the inputs that read it (a kernel regression), with the softmax
  temperature chosen on a held-out fifth of the calibration tokens.

The SiLU gate starts fully open (zero weights, bias with silu(b) = 1), so the memory's first
output is its value read alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.errors import InputError
from engine.model.memory_layers.featural import GATE_OPEN, FeaturalMemory
from engine.model.memory_layers.kmeans import kmeans
from engine.model.memory_layers.teacher_mlp import MlpWeights

TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0)


@torch.no_grad()
def init_flat_from_mlp(memory: FeaturalMemory, mlp: MlpWeights,
                       x: torch.Tensor | None = None) -> None:
    """Copy the ``slots`` most important neurons (all of them when slots == neurons)."""
    flat = memory.flat
    assert flat is not None and memory.out_bias is not None
    slots = memory.num_slots
    if slots > mlp.neurons:
        raise InputError(f"slots={slots} exceeds the MLP's {mlp.neurons} neurons; flat keys "
                         f"copy neurons, give slots <= {mlp.neurons}")
    if slots == mlp.neurons:
        chosen = torch.arange(slots)
    else:
        chosen = mlp.importance(x).topk(slots).indices.sort().values
    flat.keys.copy_(mlp.keys[chosen])
    flat.bias.copy_(mlp.key_bias[chosen])
    if flat.up is not None:
        assert mlp.up is not None and mlp.up_bias is not None and flat.up_bias is not None
        flat.up.copy_(mlp.up[chosen])
        flat.up_bias.copy_(mlp.up_bias[chosen])
    memory.values.copy_(mlp.values[chosen])
    memory.out_bias.copy_(mlp.out_bias)


def _orthonormal_rows(directions: torch.Tensor, count: int, dim: int, seed: int) -> torch.Tensor:
    """``count`` orthonormal rows: ``directions`` first, random completions after."""
    rows = directions[:count]
    if rows.shape[0] < count:
        generator = torch.Generator().manual_seed(seed)
        extra = torch.randn(count - rows.shape[0], dim, generator=generator)
        rows = torch.cat([rows, F.normalize(extra, dim=-1)])
        if count <= dim:  # orthogonalise the random completions against the directions
            q, r = torch.linalg.qr(rows.t())
            rows = (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).t()
    return rows


def _open_gate(memory: FeaturalMemory) -> None:
    if memory.gate_proj is not None:
        memory.gate_proj.weight.zero_()
        memory.gate_proj.bias.fill_(GATE_OPEN)


def _set_output(memory: FeaturalMemory, outputs: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Set the output projection; return the map from hidden space to value space [hidden, dv]."""
    assert memory.out_proj is not None
    hidden, value_dim = memory.config.hidden_size, memory.config.effective_value_dim
    if value_dim >= hidden:  # the hidden space itself; extra value dimensions start unused
        basis = torch.cat([torch.eye(hidden), torch.zeros(hidden, value_dim - hidden)], dim=1)
    else:  # the value space spans the top principal directions of the outputs
        centred = outputs - outputs.mean(dim=0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        basis = _orthonormal_rows(vh, value_dim, hidden, seed=7).t()  # [hidden, dv]
    memory.out_proj.weight.copy_(basis)
    memory.out_proj.bias.copy_(bias)
    return basis


def _codebooks(memory: FeaturalMemory, projected: torch.Tensor, spherical: bool) -> None:
    """Fit each head's two sub-key tables to the halves of ``projected`` [n, heads, dq]."""
    assert memory.product is not None
    c = memory.config
    half = c.query_dim // 2
    for head in range(c.heads):
        for side in range(2):
            points = projected[:, head, side * half:(side + 1) * half]
            if spherical:
                points = F.normalize(points, dim=-1)
            centroids = kmeans(points, c.num_subkeys, spherical=spherical, seed=97 * head + side)
            memory.product.subkeys[head, side].copy_(centroids)


@torch.no_grad()
def init_product_from_neurons(memory: FeaturalMemory, mlp: MlpWeights) -> None:
    """Product-quantise the MLP's neurons into slots (no data needed)."""
    assert memory.product is not None and memory.query_proj is not None
    c = memory.config
    width = c.heads * c.query_dim
    _, _, vh = torch.linalg.svd(mlp.keys, full_matrices=False)
    basis = _orthonormal_rows(vh, width, c.hidden_size, seed=5)  # [heads*dq, hidden]
    memory.query_proj.weight.copy_(basis)
    memory.query_proj.bias.zero_()
    projected = (mlp.keys @ basis.t()).view(mlp.neurons, c.heads, c.query_dim)
    _codebooks(memory, projected, spherical=False)
    to_values = _set_output(memory, mlp.values, mlp.out_bias)
    values = torch.zeros(c.num_slots, c.effective_value_dim)
    scores, slots = memory.product.search(memory.query_proj(mlp.keys))
    # Each neuron lands in its best slot of every head; heads' reads are summed, so split it.
    best = slots[:, :, 0]  # [I, heads]
    neuron_values = (mlp.values @ to_values) / c.heads
    for head in range(c.heads):
        values.index_add_(0, best[:, head], neuron_values)
    memory.values.copy_(values)
    _open_gate(memory)
    del scores


def _fit_values(memory: FeaturalMemory, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``targets`` [n, dv] over the inputs reading each slot (divided by heads)."""
    slots, weights = memory.lookup(x)
    c = memory.config
    flat_slots = slots.reshape(-1)
    flat_weights = weights.reshape(-1, 1)
    repeated = targets.repeat_interleave(slots.shape[1], dim=0)
    sums = torch.zeros(c.num_slots, targets.shape[1]).index_add_(0, flat_slots,
                                                                 repeated * flat_weights)
    mass = torch.zeros(c.num_slots).index_add_(0, flat_slots, flat_weights.squeeze(1))
    return sums / mass.clamp_min(1e-6).unsqueeze(1) / c.heads


@torch.no_grad()
def init_product_from_data(memory: FeaturalMemory, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fit to the MLP's calibration inputs ``x`` and outputs ``y`` [n, hidden].

    Returns the held-out fraction of output variance left unexplained by the chosen init.
    """
    assert memory.product is not None and memory.query_proj is not None
    c = memory.config
    x, y = x.float(), y.float()
    n = x.shape[0]
    width = c.heads * c.query_dim
    mean_x = x.mean(dim=0)
    _, singular, vh = torch.linalg.svd(x - mean_x, full_matrices=False)
    std = (singular / math.sqrt(max(n - 1, 1))).clamp_min(1e-6)
    rank = min(width, vh.shape[0])
    whitening = vh[:rank] / std[:rank].unsqueeze(1)
    basis = _orthonormal_rows(whitening, width, c.hidden_size, seed=5)
    projected = ((x - mean_x) @ basis.t()).view(n, c.heads, c.query_dim)
    _codebooks(memory, projected, spherical=True)
    mean_y = y.mean(dim=0)
    to_values = _set_output(memory, y, mean_y)
    targets = (y - mean_y) @ to_values
    _open_gate(memory)

    split = max(1, n - max(1, n // 5))
    fit_x, fit_t, held_x, held_y = x[:split], targets[:split], x[split:], y[split:]
    best_error, best_temperature = math.inf, TEMPERATURES[0]
    half_norm = projected.view(n, c.heads, 2, -1).norm(dim=-1).median().clamp_min(1e-6)
    for temperature in TEMPERATURES:
        scale = temperature / float(half_norm)
        memory.query_proj.weight.copy_(basis * scale)
        memory.query_proj.bias.copy_(-(basis @ mean_x) * scale)
        memory.values.copy_(_fit_values(memory, fit_x, fit_t))
        error = unexplained_variance(memory(held_x), held_y)
        if error < best_error:
            best_error, best_temperature = error, temperature
    scale = best_temperature / float(half_norm)
    memory.query_proj.weight.copy_(basis * scale)
    memory.query_proj.bias.copy_(-(basis @ mean_x) * scale)
    memory.values.copy_(_fit_values(memory, x, targets))
    return best_error


def unexplained_variance(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """||prediction - target||² / ||target - mean(target)||²: 0 is perfect, 1 is the mean."""
    prediction = prediction.reshape(-1, target.shape[-1]).float()
    target = target.reshape(-1, target.shape[-1]).float()
    residual = (prediction - target).pow(2).sum()
    spread = (target - target.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    return float(residual / spread)
