"""Which rank this process is under ``torchrun``, and the few collectives the loop needs.

Without ``WORLD_SIZE`` > 1 the context is a single CPU process and every helper is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def mean_across_ranks(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return float(tensor) / ctx.world


def sum_across_ranks(value: float, ctx: DistContext) -> float:
    return mean_across_ranks(value, ctx) * ctx.world


def broadcast_choice(choice: T, options: Sequence[T], ctx: DistContext) -> T:
    """Rank 0's ``choice`` on every rank."""
    if not ctx.enabled:
        return choice
    code = torch.tensor([options.index(choice)], device=ctx.device)
    dist.broadcast(code, src=0)
    return options[int(code)]
