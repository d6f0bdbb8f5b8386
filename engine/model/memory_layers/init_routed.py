"""Start a routed memory as the teacher MLP it replaces, its neurons grouped and routed.

1. **Slots.** Slot i copies a neuron (keys, up keys, biases, value). When the memory holds
   more slots than the MLP has neurons, the most important neurons are split: every copy
   keeps the keys (perturbed by 1e-3 of their norm, so copies can drift apart in training)
   and a share of the value, so reading all copies sums to the neuron again.
2. **Groups** (MoEfication): balanced spherical k-means over each slot's signature, its
   absolute contribution |weight|·‖value‖ on calibration tokens when there are any (neurons
   that fire together share a group), else its normalised key and up key. Every group gets
   exactly ``group_size`` slots, stored contiguously.
3. **Router**: a ridge regression from the calibration inputs to each token's share of group
   mass, truncated to rank ``router_rank`` by SVD; without calibration, each group's score
   is the input's product with the group's mean key. The distillation's router stage then
   fits it further (``router_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.memory_layers.featural import FeaturalMemory
from engine.model.memory_layers.teacher_mlp import MlpWeights

SIGNATURE_TOKENS = 4096  # calibration tokens that shape the neurons' co-activation signature
KMEANS_ROUNDS = 12
SPLIT_NOISE = 1e-3
RIDGE = 1e-2


def split_neurons(mlp: MlpWeights, slots: int, x: torch.Tensor | None) -> MlpWeights:
    """``slots`` slots from the MLP's neurons: all of them, the most important ones split."""
    neurons = mlp.neurons
    if slots == neurons:
        return mlp
    copies = torch.full((neurons,), slots // neurons, dtype=torch.long)
    extra = slots - int(copies.sum())
    if extra:
        copies[mlp.importance(x).topk(extra).indices] += 1
    source = torch.repeat_interleave(torch.arange(neurons), copies)
    first = torch.ones(slots, dtype=torch.bool)
    first[1:] = source[1:] != source[:-1]
    generator = torch.Generator().manual_seed(11)

    def perturbed(rows: torch.Tensor) -> torch.Tensor:
        out = rows[source].clone()
        noise = torch.randn(out.shape, generator=generator) * SPLIT_NOISE
        out[~first] += noise[~first] * out[~first].norm(dim=-1, keepdim=True) / out.shape[1]**0.5
        return out

    share = (1.0 / copies.float())[source].unsqueeze(1)
    return MlpWeights(
        keys=perturbed(mlp.keys), key_bias=mlp.key_bias[source],
        up=perturbed(mlp.up) if mlp.up is not None else None,
        up_bias=mlp.up_bias[source] if mlp.up_bias is not None else None,
        values=mlp.values[source] * share, out_bias=mlp.out_bias, activation=mlp.activation,
    )


def balanced_groups(features: torch.Tensor, groups: int, seed: int = 3) -> torch.Tensor:
    """Assign each row of ``features`` [n, d] to one of ``groups`` groups of exactly
    n / groups rows, by spherical k-means with a greedy capacity-limited assignment."""
    n = features.shape[0]
    size = n // groups
    points = F.normalize(features.float(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(n, generator=generator)[:groups]].clone()
    assignment = torch.zeros(n, dtype=torch.long)
    for _ in range(KMEANS_ROUNDS):
        similarity = points @ centroids.t()  # [n, G]
        order = similarity.flatten().argsort(descending=True).tolist()
        chosen = [-1] * n
        room = [size] * groups
        placed = 0
        # Greedy over (point, group) pairs from the most to the least similar: each point
        # goes to its most similar group that still has room.
        for pair in order:
            point, group = divmod(pair, groups)
            if chosen[point] >= 0 or room[group] == 0:
                continue
            chosen[point] = group
            room[group] -= 1
            placed += 1
            if placed == n:
                break
        assignment = torch.tensor(chosen, dtype=torch.long)
        updated = torch.zeros_like(centroids).index_add_(0, assignment, points)
        centroids = F.normalize(updated, dim=-1)
    return assignment


def signatures(mlp: MlpWeights, x: torch.Tensor | None) -> torch.Tensor:
    if x is not None:
        sample = x[:SIGNATURE_TOKENS].float()
        return (mlp.neuron_weights(sample).abs() * mlp.values.norm(dim=-1)).t()
    parts = [F.normalize(mlp.keys, dim=-1)]
    if mlp.up is not None:
        parts.append(F.normalize(mlp.up, dim=-1))
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def init_routed_from_mlp(memory: FeaturalMemory, mlp: MlpWeights,
                         x: torch.Tensor | None = None) -> None:
    """Copy, group and route the MLP's neurons (see the module docstring)."""
    routed = memory.routed
    assert routed is not None and memory.out_bias is not None
    slots = split_neurons(mlp, memory.num_slots, x)
    groups = routed.num_groups
    assignment = balanced_groups(signatures(slots, x), groups)
    order = assignment.argsort(stable=True)  # group by group, contiguous
    up = slots.up[order] if slots.up is not None else None
    up_bias = slots.up_bias[order] if slots.up_bias is not None else None
    routed.set_slots(slots.keys[order], slots.key_bias[order], up, up_bias)
    memory.values.copy_(slots.values[order])
    memory.out_bias.copy_(slots.out_bias)
    fit_router(memory, x)


@torch.no_grad()
def fit_router(memory: FeaturalMemory, x: torch.Tensor | None) -> None:
    """Set the router in closed form (ridge regression to group-mass shares, or mean keys)."""
    routed = memory.routed
    assert routed is not None
    hidden = routed.group_keys.shape[1]
    if x is not None:
        inputs = x.float()
        mass = routed.group_mass(inputs, memory.values)
        target = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
        mean = inputs.mean(0)
        centred = inputs - mean
        gram = centred.t() @ centred
        gram += RIDGE * gram.diagonal().mean() * torch.eye(hidden)
        weight = torch.linalg.solve(gram, centred.t() @ (target - target.mean(0)))  # [h, G]
        bias = target.mean(0) - mean @ weight
    else:
        means = routed.keys.view(routed.num_groups, routed.group_size, hidden).mean(1)
        weight, bias = F.normalize(means, dim=-1).t(), torch.zeros(routed.num_groups)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # weight = u diag(s) vh
    rank = min(routed.router_down.shape[0], s.numel())
    root = s[:rank].sqrt()
    routed.router_down.zero_()
    routed.router_up.zero_()
    routed.router_down[:rank] = (u[:, :rank] * root).t()
    routed.router_up[:, :rank] = (vh[:rank].t() * root)
    routed.router_bias.copy_(bias)
