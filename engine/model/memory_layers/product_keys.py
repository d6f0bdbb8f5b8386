"""Exact top-k search over product keys (Lample et al. 2019).

A slot's key is the concatenation of two sub-keys, one from each of two tables of ``n``
sub-keys, so ``n**2`` slots cost ``2n`` dot products per query. The top-k of a sum of two
independent scores lies within the k x k pairs of each half's top-k, so searching those
candidates is exact. Fewer suffice: with both halves sorted, pair (i, j) (0-based) is beaten
by the (i+1)(j+1) - 1 pairs (i' <= i, j' <= j), so only pairs with (i+1)(j+1) <= k can make
the top-k (about k ln k of the k**2, 50 instead of 256 for k = 16).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ProductKeys(nn.Module):
    """Sub-key tables for ``heads`` heads: ``subkeys[h, half, i]`` has ``query_dim // 2`` dims."""

    pair_left: torch.Tensor
    pair_right: torch.Tensor

    def __init__(self, heads: int, query_dim: int, num_subkeys: int, topk: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_dim = query_dim
        self.num_subkeys = num_subkeys
        self.topk = topk
        half = query_dim // 2
        self.subkeys = nn.Parameter(torch.empty(heads, 2, num_subkeys, half))
        nn.init.uniform_(self.subkeys, -1 / math.sqrt(half), 1 / math.sqrt(half))
        left, right = candidate_pairs(topk)
        self.register_buffer("pair_left", left, persistent=False)
        self.register_buffer("pair_right", right, persistent=False)

    @property
    def num_slots(self) -> int:
        return self.num_subkeys**2

    def search(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and slot indexes of each head's top-k, for ``query`` of shape [T, heads*dq].

        Returns ``(scores [T, heads, k], slots [T, heads, k])``; scores are differentiable with
        respect to both the query and the sub-keys.
        """
        tokens = query.shape[0]
        k, n = self.topk, self.num_subkeys
        halves = query.view(tokens, self.heads, 2, self.query_dim // 2)
        # [heads, 2, T, n] in one batched matmul: every half of every head at once.
        sub_scores = torch.matmul(halves.permute(1, 2, 0, 3), self.subkeys.transpose(-1, -2))
        best_scores, best_index = sub_scores.topk(k, dim=-1)  # [heads, 2, T, k], sorted
        left, right = self.pair_left, self.pair_right  # the pairs that can make the top-k
        pair_scores = best_scores[:, 0, :, left] + best_scores[:, 1, :, right]  # [heads, T, P]
        scores, pair = pair_scores.topk(k, dim=-1)  # [heads, T, k]
        slots = best_index[:, 0, :, left].gather(-1, pair) * n + \
            best_index[:, 1, :, right].gather(-1, pair)
        return scores.transpose(0, 1), slots.transpose(0, 1)

    def slot_keys(self, head: int) -> torch.Tensor:
        """Every full key of one head, [n**2, query_dim] (for inspection and tests)."""
        left, right = self.subkeys[head, 0], self.subkeys[head, 1]
        n = self.num_subkeys
        return torch.cat(
            [left.repeat_interleave(n, dim=0), right.repeat(n, 1)], dim=-1
        )


def candidate_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) positions of the sorted halves' pairs with (i+1)(j+1) <= k."""
    pairs = [(i, j) for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= k]
    left = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    right = torch.tensor([j for _, j in pairs], dtype=torch.long)
    return left, right
