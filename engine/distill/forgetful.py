"""Forgetful causal masking of the student (Liu et al. 2022, "Forgetful Causal Masking Makes
Causal Language Models Better Zero-Shot Learners").

During training, each earlier token is hidden from attention at a rate ``r``: the student
must predict the next token from an incomplete context, which the paper finds makes causal
language models better zero-shot learners, at no extra cost. The mask here is the 2-D
``attention_mask`` [batch, tokens] that Hugging Face models take for padding: a 0 at column
``k`` removes key ``k`` from every query's attention (the causal mask still applies), in
every layer, so a hidden token influences nothing; its own position still predicts from the
kept earlier tokens. (The paper samples the mask per query-key pair; one mask per key column
is the form the models take directly, with no 4-D mask to build.) Position 0 is never
hidden, so every query keeps at least one key. Llama and GPT-2 were checked to compute,
at the kept positions, exactly what they compute on the kept tokens alone at their
original positions (``tests/test_distill_options.py``).

The mask of a step is a pure function of the seed, the step and the rank, so a resumed run
draws the same masks as an uninterrupted one. Only the student's end-to-end training
forwards are masked: the teacher always sees the whole block, and evaluation never masks.
"""

from __future__ import annotations

import torch

SEED_STRIDE = 1_000_033  # keeps the masks of nearby steps and seeds apart


def forgetful_mask(batch: int, tokens: int, rate: float, *, seed: int, step: int,
                   rank: int = 0, world: int = 1,
                   device: torch.device | str | None = None) -> torch.Tensor | None:
    """The attention mask [batch, tokens] (1 = attend, 0 = hidden) of training ``step`` on
    ``rank``: each position but the first hidden with probability ``rate``; None when
    ``rate`` is 0 (no mask: the models' unmasked fast path)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"the forgetful mask rate must be within [0, 1), got {rate}")
    if rate == 0.0:
        return None
    generator = torch.Generator().manual_seed(
        ((seed * SEED_STRIDE + step) * max(world, 1) + rank) % (2**63))
    keep = (torch.rand(batch, tokens, generator=generator) >= rate).long()
    keep[:, 0] = 1
    return keep if device is None else keep.to(device)


def hidden_share(mask: torch.Tensor | None) -> float:
    """The share of positions after the first that ``mask`` hides (0 without a mask)."""
    if mask is None or mask.shape[1] < 2:
        return 0.0
    return float((mask[:, 1:] == 0).float().mean())
