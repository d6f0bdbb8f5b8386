"""The settings of one distillation run, stored as ``config.json`` in its run directory.

:meth:`DistillConfig.validate` checks the settings alone (types, ranges, finite numbers, the
memory hyper-parameters' names and types); :meth:`DistillConfig.preflight` adds what the
teacher's config tells without loading its weights (the layers exist, blocks fit its context,
the run fits in RAM). Both run before a run directory is created, so a bad setting costs
milliseconds and leaves nothing behind.

Three optional training ideas have their settings here too: ``augment`` (noise on the
training text, :mod:`engine.distill.augment`), ``forgetful_mask`` (forgetful causal masking of
the student, :mod:`engine.distill.forgetful`) and ``channels`` (label channels trained by
paired context distillation after the main stages, :mod:`engine.distill.channel_stage`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from engine.errors import InputError

MEMORY_KINDS = ("featural", "associative", "dense")
SCHEDULES = ("cosine", "linear", "constant")
MAX_STEPS = 10**9  # more is a typo: at a step per millisecond it would run for 11 days
MAX_THREADS = 1024
MAX_SEED = 2**32 - 1  # the block order multiplies the seed; torch seeds are 64-bit
CHANNEL_NAMES = ("content", "affect")  # engine.model.label_channels.CHANNELS (without torch)
CHANNEL_TRAIN = ("channels", "all")


@dataclass
class DistillConfig:
    """Everything a run needs; a resumed run reads it back from its run directory."""

    teacher: str = "default"
    layers: str = "all"  # a layer spec (engine.model.anatomy): "all", "middle", "1,4,7", "8-10"
    memory: str = "featural"  # featural | associative | dense (compute-matched control)
    hparams: dict[str, Any] = field(default_factory=dict)  # passed to the memory layers
    data: list[str] = field(default_factory=list)  # text files or folders; empty = data-free
    steps: int = 1000
    # Routed memories: router fitting steps first (to the teacher MLP's group mass), at
    # ``router_lr``; then the layer-local steps; then end to end.
    router_steps: int = 0
    router_lr: float = 3e-3
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
    # Reuse a data-free corpus sampled earlier with the same teacher and settings (kept under
    # <data dir>/cache/data_free); False samples afresh.
    data_free_cache: bool = True
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
    # Noise on the training text: a transform spec such as "typo=0.02,homoglyph=0.01";
    # held-out text stays clean unless ``augment_heldout``.
    augment: str = ""
    augment_heldout: bool = False
    # Forgetful causal masking: the student's end-to-end forwards drop each earlier token
    # from attention at this rate (0 = off); the teacher and evaluation see everything.
    forgetful_mask: float = 0.0
    # Label channels ("content", "affect") added to the student, then ``channel_steps`` of
    # paired context distillation after the main stages on ``channel_pairs`` pairs per
    # channel, training the channels alone ("channels") or with the replaced layers ("all").
    channels: list[str] = field(default_factory=list)
    channel_steps: int = 200
    channel_pairs: int = 64
    channel_lr: float | None = None  # None = lr
    channel_train: str = "channels"

    def validate(self) -> None:
        self._check_types()
        for name in ("teacher", "layers"):
            if not getattr(self, name).strip():
                raise InputError(f"{name} is empty; give a value (see `mindset distill --help`)")
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
        if min(self.local_steps, self.local_tokens, self.warmup_steps, self.threads,
               self.router_steps) < 0:
            raise InputError("router_steps, local_steps, local_tokens, warmup_steps and "
                             "threads must not be negative")
        for name in ("steps", "local_steps", "router_steps", "warmup_steps", "eval_every",
                     "checkpoint_every"):
            if getattr(self, name) > MAX_STEPS:
                raise InputError(f"{name}={getattr(self, name)} is more than {MAX_STEPS:,}; "
                                 "give a realistic number of steps")
        if self.threads > MAX_THREADS:
            raise InputError(f"threads={self.threads} is more than {MAX_THREADS}; give at most "
                             "the machine's core count (0 = torch's choice)")
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed={self.seed} must be within 0..{MAX_SEED}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise InputError(
                f"heldout_fraction must be between 0 and 1 (got {self.heldout_fraction})"
            )
        if not (self.lr > 0 and self.temperature > 0 and self.clip_norm >= 0):
            raise InputError("lr and temperature must be positive, clip_norm not negative")
        if not self.router_lr > 0:
            raise InputError(f"router_lr must be positive (got {self.router_lr})")
        if self.router_steps and not (self.memory == "featural"
                                      and self.hparams.get("keys") == "routed"):
            raise InputError("router_steps applies to routed memories only; add --hparam "
                             "keys=routed or drop --router-steps")
        if self.value_lr is not None and not self.value_lr > 0:
            raise InputError(f"value_lr must be positive (got {self.value_lr})")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise InputError("kl_weight and ce_weight must not be negative, and not both zero")
        if self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise InputError("weight_decay must not be negative and min_lr_ratio must be "
                             "within 0..1")
        check_memory_hparams(self.memory, self.hparams)
        self._check_options()

    def _check_options(self) -> None:
        """Augmentation, forgetful masking and label channels."""
        if self.augment.strip():
            from engine.distill.augment import parse_spec

            try:
                parse_spec(self.augment)
            except InputError as exc:
                raise InputError(f"augment: {exc}") from None
        elif self.augment_heldout:
            raise InputError("augment_heldout needs an augment spec; give --augment "
                             "NAME=RATE,... or drop --augment-heldout")
        if not 0.0 <= self.forgetful_mask < 1.0:
            raise InputError(f"forgetful_mask must be within [0, 1) (got "
                             f"{self.forgetful_mask}); 0 turns it off")
        unknown = [name for name in self.channels if name not in CHANNEL_NAMES]
        if unknown:
            raise InputError(f"channels: unknown channel {unknown[0]!r}; give "
                             f"{' and/or '.join(CHANNEL_NAMES)}")
        if len(set(self.channels)) != len(self.channels):
            raise InputError(f"channels {self.channels} name a channel twice; name each once")
        if self.channel_steps < 0 or self.channel_steps > MAX_STEPS:
            raise InputError(f"channel_steps must be within 0..{MAX_STEPS:,} (got "
                             f"{self.channel_steps})")
        if self.channel_pairs <= 0:
            raise InputError(f"channel_pairs must be positive (got {self.channel_pairs})")
        if self.channel_lr is not None and not self.channel_lr > 0:
            raise InputError(f"channel_lr must be positive (got {self.channel_lr})")
        if self.channel_train not in CHANNEL_TRAIN:
            raise InputError(f"channel_train {self.channel_train!r} is not one of "
                             f"{', '.join(CHANNEL_TRAIN)}")

    def _check_types(self) -> None:
        """Each field holds its type, numbers finite: a resumed run reads them from JSON, and
        ``nan`` passes every comparison a range check makes."""
        for item in fields(self):
            value = getattr(self, item.name)
            kind = str(item.type)
            if kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind == "bool":
                ok = isinstance(value, bool)
            elif kind in ("float", "float | None"):
                ok = (value is None and kind != "float") or (
                    isinstance(value, int | float) and not isinstance(value, bool)
                    and math.isfinite(value))
            elif kind == "str":
                ok = isinstance(value, str)
            elif kind.startswith("list"):
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            else:
                ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
            if not ok:
                raise InputError(f"{item.name}={value!r} must be {TYPE_WORDS.get(kind, kind)}")

    def preflight(self) -> None:
        """:meth:`validate`, then the checks that need the teacher's config (read without its
        weights): call it before creating anything for the run."""
        self.validate()
        from engine.distill.preflight import check_against_teacher

        check_against_teacher(self)

    @property
    def total_steps(self) -> int:
        return self.router_steps + self.local_steps + self.steps

    @property
    def pre_e2e_steps(self) -> int:
        """Steps before the end-to-end stage (router, then layer-local)."""
        return self.router_steps + self.local_steps

    def stage_of(self, step: int) -> Literal["router", "local", "e2e"]:
        """"router", "local" or "e2e" for ``step`` (0-based)."""
        if step < self.router_steps:
            return "router"
        return "local" if step < self.pre_e2e_steps else "e2e"

    @property
    def channel_stage_steps(self) -> int:
        """Steps of the label-channel stage after the main stages (0 without channels)."""
        return self.channel_steps if self.channels else 0

    @property
    def effective_value_lr(self) -> float:
        return self.value_lr if self.value_lr is not None else 10.0 * self.lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        if not isinstance(data, dict):
            raise InputError("a run's config.json must hold a JSON object; is this a run "
                             "directory?")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown distillation settings: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: Path) -> None:
        from engine.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> DistillConfig:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path} does not exist; is this a run directory?") from None
        except NotADirectoryError:
            raise InputError(f"{path.parent} is not a directory; give a run directory") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is not valid JSON ({' '.join(str(exc).split())})") from exc
        return cls.from_dict(data)


TYPE_WORDS = {"int": "an integer", "bool": "true or false", "float": "a finite number",
              "float | None": "a finite number (or null)", "str": "a string",
              "list[str]": "a list of strings", "dict[str, Any]": "an object of settings"}


def check_memory_hparams(memory: str, hparams: dict[str, Any]) -> None:
    """The memory layers' settings: known names, right types (the sizes are checked against
    the teacher in :mod:`engine.distill.preflight`)."""
    if memory == "dense":
        from engine.distill.build import dense_settings

        dense_settings(hparams, 64)
        return
    from engine.model.memory_layers.config import check_hparams
    from engine.model.surgery import INITS

    options = dict(hparams)
    init = options.pop("init", "mlp")
    if init not in INITS:
        raise InputError(f"init={init!r} is not an initialisation; use one of {', '.join(INITS)}")
    check_hparams(memory, options)
