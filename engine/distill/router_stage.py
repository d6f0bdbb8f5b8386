"""The router stage of routed memories: fit each router to the teacher MLP's group mass.

Before the layer-local stage, each routed layer's router learns which groups of neurons
matter for an input: the target of token t is its share of every group's mass
(sum of |weight|·‖value‖ over the group's slots, computed from the slots while they still
are the teacher's neurons), the loss the cross-entropy of the router's softmax against it
(:func:`engine.model.memory_layers.routed_keys.router_loss`). The stage also reports the
routers' recall of the oracle's top-k slot mass, the fraction of what an exact top-k of
the MLP would read that the routed groups hold.

The router parameters are registered here (the same ``Parameter`` objects as the memory's),
so DistributedDataParallel can wrap this module and reduce exactly their gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.memory_layers.routed_keys import RoutedKeys, router_loss, router_recall


def routed_parts(memories: dict[int, nn.Module]) -> dict[int, tuple[RoutedKeys, nn.Parameter]]:
    """``{layer: (routed keys, value table)}`` of the memories that have routed keys."""
    out: dict[int, tuple[RoutedKeys, nn.Parameter]] = {}
    for layer, memory in memories.items():
        routed = getattr(memory, "routed", None)
        if isinstance(routed, RoutedKeys):
            out[layer] = (routed, memory.values)  # type: ignore[assignment]
    return out


class RouterFitter(nn.Module):
    """Mean router loss over the routed layers; :attr:`last_recall` after each call."""

    def __init__(self, memories: dict[int, nn.Module]) -> None:
        super().__init__()
        self.parts = routed_parts(memories)
        self.order = sorted(self.parts)
        self.routers = nn.ParameterList(
            [p for layer in self.order for p in self.parts[layer][0].router_parameters()])
        self.last_recall = float("nan")

    def forward(self, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        losses, recalls = [], []
        for position, layer in enumerate(self.order):
            routed, values = self.parts[layer]
            x = inputs[layer].reshape(-1, inputs[layer].shape[-1]).float()
            down, up, bias = self.routers[3 * position: 3 * position + 3]
            scores = torch.addmm(bias, x @ down.t(), up.t())
            with torch.no_grad():
                slot_mass = routed.slot_mass(x, values)
                mass = routed.group_mass(x, values, slot_mass)
                g = min(routed.groups_read, routed.num_groups)
                chosen = scores.topk(g, dim=-1).indices
                recalls.append(router_recall(chosen, routed.group_size, slot_mass))
            losses.append(router_loss(scores, mass))
        self.last_recall = sum(recalls) / max(1, len(recalls))
        return torch.stack(losses).mean()
