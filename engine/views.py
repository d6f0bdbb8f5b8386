"""Plain data the engine hands to front ends: what the workbench shows and asks for.

Kept apart from :mod:`engine.facade` so that services, panes and their protocols can name
these types without importing the engine's wiring; importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Availability:
    """Whether an engine part can be used; ``reason`` says why not, and what to do."""

    ok: bool
    reason: str = ""


@dataclass
class ModelNode:
    """One node of a model's structure, for display."""

    label: str
    params: int = 0
    detail: str = ""
    children: list[ModelNode] = field(default_factory=list)
    kind: str = ""  # "layer", "attention", "head", "mlp", "memory", ... ("" for the rest)
    layer: int | None = None
    head: int | None = None


@dataclass
class EntryView:
    """One memory entry as the workbench shows it."""

    id: int
    label: str
    tags: list[str]
    access_count: int
    last_access: str
    norm: float
    top_tokens: list[str] = field(default_factory=list)
    # From the student's annotations (``mindset memory annotate``): measured promotes (else
    # ``top_tokens`` is the raw projection of the value), triggers, and a label to show when
    # the user has given none.
    promotes_measured: bool = False
    triggers: list[str] = field(default_factory=list)
    auto_label: str = ""
    slot: int | None = None  # a featural mirror row's slot
    source: str = ""  # a read entry: the document and position that wrote it


@dataclass
class DeletedEntries:
    """What a delete removed, kept so that it can be undone."""

    table: str
    ids: list[int]
    keys: np.ndarray  # float32 (n, key_dim)
    values: np.ndarray  # float32 (n, value_dim)
    labels: list[str | None]
    tags: list[list[str]]
    metas: list[dict[str, Any]] = field(default_factory=list)
    # (created, last access, access count) per entry: an undo gives them back.
    stats: list[tuple[float, float, int]] = field(default_factory=list)


@dataclass
class MemoryUse:
    """A memory entry a reply read, with the share of attention it got."""

    table: str
    id: int
    weight: float
    label: str = ""


@dataclass
class JobRequest:
    """What the Training pane's form asks for."""

    teacher: str = "default"
    layers: str = "middle"  # "middle", an index, a list/range, or "all"
    memory: str = "featural"
    data: str | None = None  # a text file or folder; None samples text from the teacher
    steps: int = 200
    lr: float = 1e-3
    # Further DistillConfig fields (block_size, batch_size, data_free_blocks, ...).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobView:
    """One distillation job as the job list shows it."""

    id: str
    state: str
    step: int
    total_steps: int
    teacher: str
    layers: str
    memory: str
    loss: float | None = None
    error: str = ""
    run_dir: str = ""


@dataclass(frozen=True)
class JobOutcome:
    """A finished job's figures on held-out text, for its summary."""

    ppl_teacher: float
    ppl_student: float
    ppl_zeroed: float
    ppl_ratio: float
    gap_closed: float
    kl_per_token: float
    top1_agreement: float
    has_student: bool = False


def short_spec(spec: str) -> str:
    """A model spec for display: built-in names as they are, paths by their last two parts."""
    if "/" not in spec:
        return spec
    parts = Path(spec).parts
    return "/".join(parts[-2:])


@dataclass
class TracedRow:
    """One memory read of a traced reply token, ranked by its influence on that token."""

    layer: int
    kind: str  # "featural" or "associative"
    table: str  # the mirror table that holds the entry
    entry_id: int | None  # its row id there (None: not mirrored, or deleted)
    slot: int  # featural slot or associative cache position
    head: int
    weight: float
    influence: float
    label: str = ""


@dataclass
class ReplyTrace:
    """Which memory entries one token of a reply used (see :mod:`engine.model.memory_trace`)."""

    tokens: list[str]  # the reply, token by token
    token: int  # the index of the traced token in ``tokens``
    logit: float
    rows: list[TracedRow]
    layers: list[int]  # memory layers by summed positive influence, highest first


@dataclass
class EditRecord:
    """One journaled knowledge edit, as the history lists it."""

    id: int
    time: str
    op: str  # "value", "insert" or "undo"
    layer: int
    slots: list[int]
    what: str
    note: str
    undone_by: int | None = None
    undoes: int | None = None


@dataclass
class HeadStat:
    """One attention head as the Model pane shows it."""

    layer: int
    head: int
    importance: float | None  # Michel et al.'s score, normalised per layer
    gate: float | None  # sigmoid(contribution) where the layer has head gates


@dataclass
class LayerStat:
    """One decoder layer's shape, parameters and measured use."""

    layer: int
    heads: int
    kv_heads: int
    params: int
    mlp: int | None  # dense MLP width (None for a memory layer)
    memory: str | None  # the memory layer's kind
    usage: str  # "mlp: 41% of neurons active on average", "memory: 12% never read"
    head_stats: list[HeadStat] = field(default_factory=list)


@dataclass
class ShapeReport:
    """A model's layers with importance and usage on a calibration text."""

    title: str
    total: int
    layers: list[LayerStat]
    calibration: str


@dataclass
class SurgeryView:
    """What an operation did (or would do): its changes and the counts before and after."""

    operation: str
    params: dict[str, Any]
    changes: list[str]
    counts: list[str]
    before_total: int
    after_total: int
