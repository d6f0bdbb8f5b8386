"""Exact top-k search over product keys (Lample et al. 2019).

A slot's key is the concatenation of two sub-keys, one from each of two tables of ``n``
sub-keys, so ``n**2`` slots cost ``2n`` dot products per query. The top-k of a sum of two
independent scores lies within the k x k pairs of each half's top-k, so searching those k**2
candidates is exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ProductKeys(nn.Module):
    """Sub-key tables for ``heads`` heads: ``subkeys[h, half, i]`` has ``query_dim // 2`` dims."""

    def __init__(self, heads: int, query_dim: int, num_subkeys: int, topk: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_dim = query_dim
        self.num_subkeys = num_subkeys
        self.topk = topk
        half = query_dim // 2
        self.subkeys = nn.Parameter(torch.empty(heads, 2, num_subkeys, half))
        nn.init.uniform_(self.subkeys, -1 / math.sqrt(half), 1 / math.sqrt(half))

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
        best_scores, best_index = sub_scores.topk(k, dim=-1)  # [heads, 2, T, k]
        left_s, right_s = best_scores[:, 0], best_scores[:, 1]  # [heads, T, k]
        left_i, right_i = best_index[:, 0], best_index[:, 1]
        pair_scores = (left_s.unsqueeze(-1) + right_s.unsqueeze(-2)).flatten(-2)  # [heads,T,k*k]
        scores, pair = pair_scores.topk(k, dim=-1)  # [heads, T, k]
        slots = left_i.gather(-1, pair // k) * n + right_i.gather(-1, pair % k)
        return scores.transpose(0, 1), slots.transpose(0, 1)

    def slot_keys(self, head: int) -> torch.Tensor:
        """Every full key of one head, [n**2, query_dim] (for inspection and tests)."""
        left, right = self.subkeys[head, 0], self.subkeys[head, 1]
        n = self.num_subkeys
        return torch.cat(
            [left.repeat_interleave(n, dim=0), right.repeat(n, 1)], dim=-1
        )
