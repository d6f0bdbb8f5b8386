"""The settings of one distillation run, stored as ``config.json`` in its run directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.errors import InputError

MEMORY_KINDS = ("featural", "associative", "dense")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class DistillConfig:
    """Everything a run needs; a resumed run reads it back from its run directory."""

    teacher: str = "default"
    layers: str = "all"  # "all", or indexes and ranges: "3", "1,4,7", "8-10"
    memory: str = "featural"  # featural | associative | dense (compute-matched control)
    hparams: dict[str, Any] = field(default_factory=dict)  # passed to the memory layers
    data: list[str] = field(default_factory=list)  # text files or folders; empty = data-free
    steps: int = 1000
    local_steps: int = 0  # layer-local matching steps before the end-to-end stage
    # Tokens whose MLP inputs/outputs are captured once for the layer-local stage, which then
    # samples ``local_batch_tokens`` rows per step; 0 = one teacher pass per local step.
    local_tokens: int = 0
    local_batch_tokens: int = 4096
    block_size: int = 256
    batch_size: int = 8
    heldout_fraction: float = 0.1
    heldout_blocks: int = 16  # at most this many held-out blocks are evaluated
    data_free_blocks: int = 256  # blocks sampled from the teacher when no data is given
    lr: float = 1e-3
    value_lr: float | None = None  # memory values; None = 10x lr (Memory Layers at Scale)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 1
    seed: int = 0
    threads: int = 0  # torch CPU threads per process; 0 = torch's default

    def validate(self) -> None:
        if self.memory not in MEMORY_KINDS:
            raise InputError(
                f"unknown memory kind {self.memory!r}; give one of {', '.join(MEMORY_KINDS)}"
            )
        if self.schedule not in SCHEDULES:
            raise InputError(
                f"unknown schedule {self.schedule!r}; give one of {', '.join(SCHEDULES)}"
            )
        positive = {"steps": self.steps, "block_size": self.block_size,
                    "batch_size": self.batch_size, "eval_every": self.eval_every,
                    "checkpoint_every": self.checkpoint_every, "log_every": self.log_every,
                    "heldout_blocks": self.heldout_blocks,
                    "local_batch_tokens": self.local_batch_tokens,
                    "data_free_blocks": self.data_free_blocks}
        for name, value in positive.items():
            if value <= 0:
                raise InputError(f"{name} must be positive (got {value})")
        if min(self.local_steps, self.local_tokens, self.warmup_steps, self.threads) < 0:
            raise InputError(
                "local_steps, local_tokens, warmup_steps and threads must not be negative")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise InputError(
                f"heldout_fraction must be between 0 and 1 (got {self.heldout_fraction})"
            )
        if not (self.lr > 0 and self.temperature > 0 and self.clip_norm >= 0):
            raise InputError("lr and temperature must be positive, clip_norm not negative")
        if self.value_lr is not None and not self.value_lr > 0:
            raise InputError(f"value_lr must be positive (got {self.value_lr})")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise InputError("kl_weight and ce_weight must not be negative, and not both zero")

    @property
    def total_steps(self) -> int:
        return self.local_steps + self.steps

    @property
    def effective_value_lr(self) -> float:
        return self.value_lr if self.value_lr is not None else 10.0 * self.lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown distillation settings: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: Path) -> None:
        from engine.distill.checkpoints import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> DistillConfig:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path} does not exist; is this a run directory?") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is not valid JSON ({exc})") from exc
        return cls.from_dict(data)


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Layer indexes from "all", "3", "1,4,7" or "8-10" (negative indexes count from the end)."""
    text = spec.strip().lower()
    if text == "all":
        return list(range(num_layers))
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                cut = part.index("-", 1)
                low, high = int(part[:cut]), int(part[cut + 1 :])
                indexes = list(range(low, high + 1))
                if not indexes:
                    raise InputError(f"empty layer range {part!r}; write it low-high")
            else:
                indexes = [int(part)]
        except ValueError:
            raise InputError(
                f"bad layer list {spec!r}; write 'all', an index, a comma list or a range like 8-10"
            ) from None
        for index in indexes:
            resolved = index + num_layers if index < 0 else index
            if not 0 <= resolved < num_layers:
                raise InputError(
                    f"unknown layer {index}: the teacher has {num_layers} layers "
                    f"(0..{num_layers - 1})"
                )
            chosen.add(resolved)
    if not chosen:
        raise InputError(f"no layers in {spec!r}; give 'all' or layer indexes")
    return sorted(chosen)
