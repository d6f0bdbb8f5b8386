"""The straight-through estimator for reads from a non-differentiable store.

A stored key that a query retrieves is close to the query (KeyReturned ≈ Query + noise), and
it was once inserted by a token like the current one. So the gradient that reaches a returned
key is passed to the query and to the key being inserted, and the gradient that reaches a
returned value is passed to the value being inserted:

    dQuery = dKeyReturned,  dKeyInserted = dKeyReturned,  dValueInserted = dValueReturned.

With k entries returned per query ([..., k, dim]) and one query/insert per row ([..., dim]),
the k gradients are summed.
"""

from __future__ import annotations

from typing import Any

import torch


class StraightThrough(torch.autograd.Function):
    """``(key_returned, value_returned)`` unchanged forward; straight-through gradients back."""

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key_inserted: torch.Tensor,
        value_inserted: torch.Tensor,
        key_returned: torch.Tensor,
        value_returned: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.key_summed = key_returned.dim() == query.dim() + 1
        ctx.value_summed = value_returned.dim() == value_inserted.dim() + 1
        return key_returned.detach().clone(), value_returned.detach().clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, d_key_returned: torch.Tensor, d_value_returned: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        d_key = d_key_returned.sum(dim=-2) if ctx.key_summed else d_key_returned
        d_value = d_value_returned.sum(dim=-2) if ctx.value_summed else d_value_returned
        return d_key, d_key, d_value, None, None


def straight_through(
    query: torch.Tensor,
    key_inserted: torch.Tensor,
    value_inserted: torch.Tensor,
    key_returned: torch.Tensor,
    value_returned: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply :class:`StraightThrough` (typed wrapper around ``Function.apply``)."""
    key, value = StraightThrough.apply(query, key_inserted, value_inserted, key_returned,
                                       value_returned)
    return key, value
