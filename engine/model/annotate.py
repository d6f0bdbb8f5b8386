"""Readable memory entries: each featural slot's triggers, what it promotes, and a label.

* **Triggers**: the token windows of a calibration text where the slot is read most strongly
  (strength = |read weight| · ‖value‖), found with the layers' own trace records.
* **Promotes**: the slot's measured effect on the output. On each trigger window the slot's
  read is removed at the trigger token (its ``w·v`` taken out of the layer's output there)
  and the model run on; promoted tokens are those whose logit at the trigger falls most,
  averaged over the triggers. That is the effect through the rest of the network, not the
  raw projection of the value onto the vocabulary.
* **Label**: the most common trigger token and the top promoted tokens, ``"of → France,
  Paris"``; a user's own label replaces it.

Stored per student in ``memory/annotations.sqlite`` (see :class:`Annotations`).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.memory_layers.featural import FeaturalMemory
from engine.model.memory_trace import memory_trace
from engine.model.surgery import memory_layers

ANNOTATIONS_FILE = "annotations.sqlite"
CONTEXT_BEFORE = 12  # tokens of a trigger window shown before the trigger token
ABLATION_BATCH = 16  # ablated copies of a window run in one forward pass
SLOT_CHUNK = 512  # slots whose summed logit drops (one vocabulary-sized row each) are held


@dataclass
class SlotAnnotation:
    layer: int
    slot: int
    triggers: list[str]  # windows of text, the trigger token in [brackets]
    strength: float  # the strongest read
    promotes: list[str]
    label: str


def _windows(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    return [ids[i:i + window] for i in range(0, ids.numel() - 1, window)
            if ids[i:i + window].numel() > 1]


@torch.no_grad()
def find_triggers(model: nn.Module, windows: list[torch.Tensor], layer: int,
                  top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per slot of ``layer``: the ``top`` strongest reads over ``windows``: strengths,
    window index and position, each [slots, top] (strength 0: fewer reads than ``top``)."""
    module = memory_layers(model)[layer]
    assert isinstance(module, FeaturalMemory)
    slots = module.num_slots
    norms = module.values.detach().float().norm(dim=-1)
    best = torch.zeros(slots, top)
    where = torch.zeros(slots, top, 2, dtype=torch.long)
    for index, window in enumerate(windows):
        with memory_trace(model) as recorded:
            model(input_ids=window.view(1, -1))
        reads = recorded[layer][-1]
        strength = (reads.weights.abs().float() * norms[reads.slots]).flatten()
        flat_slots = reads.slots.flatten()
        peak = torch.zeros(slots).scatter_reduce_(0, flat_slots, strength, "amax")
        is_peak = (strength == peak[flat_slots]) & (strength > 0)
        positions = torch.div(torch.arange(strength.numel()), reads.slots.shape[1],
                              rounding_mode="floor")
        position = torch.full((slots,), -1, dtype=torch.long)
        position[flat_slots[is_peak]] = positions[is_peak]
        found = position >= 0
        candidates = torch.cat([best, torch.where(found, peak, 0.0).view(-1, 1)], dim=1)
        places = torch.cat([where, torch.stack([torch.full((slots,), index), position],
                                               dim=1).view(-1, 1, 2)], dim=1)
        best, order = candidates.topk(top, dim=1)
        where = places.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    return best, where[..., 0], where[..., 1]


@torch.no_grad()
def measure_promotes(model: nn.Module, windows: list[torch.Tensor], layer: int,
                     slot: int, places: list[tuple[int, int]], top: int) -> list[int]:
    """Token ids whose logit falls most when ``slot``'s read is removed at its triggers."""
    return measure_all_promotes(model, windows, layer, {slot: places}, top)[slot]


@torch.no_grad()
def measure_all_promotes(model: nn.Module, windows: list[torch.Tensor], layer: int,
                         places: dict[int, list[tuple[int, int]]], top: int,
                         batch: int = ABLATION_BATCH) -> dict[int, list[int]]:
    """For each slot, the ``top`` token ids whose logit falls most, on average over its
    trigger places (window, position), when its read there is removed.

    One plain forward per window, then the ablations of that window in batches: row b of a
    batch is the window with one slot's ``w·v`` taken out of the layer's output at its
    position. Slots are handled :data:`SLOT_CHUNK` at a time, so the summed logit drops in
    memory stay bounded."""
    module = memory_layers(model)[layer]
    assert isinstance(module, FeaturalMemory)
    causal_lm: Any = model  # a Hugging Face causal LM: its trunk and output embedding
    base, head = causal_lm.base_model, causal_lm.get_output_embeddings()
    slots = sorted(places)
    out: dict[int, list[int]] = {}
    for first in range(0, len(slots), SLOT_CHUNK):
        chunk = slots[first:first + SLOT_CHUNK]
        by_window: dict[int, list[tuple[int, int]]] = {}
        for slot in chunk:
            for window, position in places[slot]:
                by_window.setdefault(window, []).append((slot, position))
        drops: dict[int, torch.Tensor] = {}
        for window_index, jobs in sorted(by_window.items()):
            ids = windows[window_index]
            with memory_trace(model) as recorded:
                plain = base(input_ids=ids.view(1, -1)).last_hidden_state[0]
            reads = recorded[layer][-1]
            for start in range(0, len(jobs), batch):
                part = jobs[start:start + batch]
                positions = torch.tensor([position for _, position in part])
                removed = torch.stack([_read_output(module, reads, slot, position)
                                       for slot, position in part])
                rows = torch.arange(len(part))

                def remove(_m: nn.Module, _i: Any, output: torch.Tensor,
                           rows: torch.Tensor = rows, positions: torch.Tensor = positions,
                           removed: torch.Tensor = removed) -> torch.Tensor:
                    output = output.clone()
                    output[rows, positions] -= removed.to(output)
                    return output

                length = int(positions.max()) + 1
                handle = module.register_forward_hook(remove)
                try:
                    ablated = base(input_ids=ids[:length].expand(len(part), -1)
                                   ).last_hidden_state[rows, positions]
                finally:
                    handle.remove()
                fallen = (head(plain[positions]) - head(ablated)).float()
                for (slot, _), drop in zip(part, fallen, strict=True):
                    drops[slot] = drops[slot] + drop if slot in drops else drop
        for slot in chunk:
            out[slot] = (drops[slot] / len(places[slot])).topk(top).indices.tolist()
    return out


def _read_output(module: FeaturalMemory, reads: Any, slot: int, position: int) -> torch.Tensor:
    """What ``slot``'s read added to the layer's output at ``position`` (``w·v``, through
    the output projection and gate for product keys)."""
    hit = reads.slots[position] == slot
    contribution = float(reads.weights[position][hit].sum()) * module.values.detach()[slot]
    if module.out_proj is not None:
        gate = reads.gate[position] if reads.gate is not None else 1.0
        contribution = module.out_proj.weight @ (contribution * gate)
    return contribution


def _trigger_text(tokenizer: Any, window: torch.Tensor, position: int) -> str:
    start = max(0, position - CONTEXT_BEFORE)
    before = tokenizer.decode(window[start:position].tolist())
    token = tokenizer.decode(window[position:position + 1].tolist())
    after = tokenizer.decode(window[position + 1:position + 3].tolist())
    return " ".join(f"{before}[{token}]{after}".split())


def annotate(model: nn.Module, tokenizer: Any, text: str, *, layers: list[int] | None = None,
             tokens: int = 4096, window: int = 128, triggers: int = 4,
             promotes: int = 4) -> list[SlotAnnotation]:
    """Triggers, promoted tokens and a label for every read slot of the featural ``layers``
    (default: all of them), from the first ``tokens`` tokens of ``text``."""
    featural = {n: m for n, m in memory_layers(model).items() if isinstance(m, FeaturalMemory)}
    if not featural:
        raise InputError("this model has no featural memory layers to annotate")
    chosen = sorted(featural) if layers is None else layers
    unknown = [n for n in chosen if n not in featural]
    if unknown:
        raise InputError(f"layer {unknown[0]} has no featural memory; this student's are "
                         f"{', '.join(map(str, sorted(featural)))}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:tokens]
    if ids.numel() < 2:
        raise InputError("the calibration text is too short; give a few sentences or more")
    windows = _windows(ids, window)
    out: list[SlotAnnotation] = []
    for layer in chosen:
        strength, window_of, position_of = find_triggers(model, windows, layer, triggers)
        places = {slot: [(int(w), int(p)) for w, p, s in zip(window_of[slot], position_of[slot],
                                                             strength[slot], strict=True) if s > 0]
                  for slot in torch.nonzero(strength[:, 0] > 0).flatten().tolist()}
        measured = measure_all_promotes(model, windows, layer, places, promotes)
        for slot, where in places.items():
            texts = [_trigger_text(tokenizer, windows[w], p) for w, p in where]
            promoted = [tokenizer.decode([t]).strip() or repr(tokenizer.decode([t]))
                        for t in measured[slot]]
            common = Counter(tokenizer.decode(windows[w][p:p + 1].tolist()).strip()
                             for w, p in where).most_common(1)[0][0]
            out.append(SlotAnnotation(layer, slot, texts, float(strength[slot, 0]), promoted,
                                      f"{common or '·'} → {', '.join(promoted[:2])}"))
    return out


class Annotations:
    """A student's slot annotations: ``memory/annotations.sqlite``, searchable by text."""

    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory) / "memory" / ANNOTATIONS_FILE

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path)
        db.execute("CREATE TABLE IF NOT EXISTS annotations (layer INTEGER, slot INTEGER, "
                   "label TEXT, user_label TEXT, triggers TEXT, promotes TEXT, strength REAL, "
                   "PRIMARY KEY (layer, slot))")
        return db

    def save(self, annotations: list[SlotAnnotation]) -> None:
        """Replace the annotations of their layers (a user's own labels are kept)."""
        with self._connect() as db:
            for a in annotations:
                db.execute(
                    "INSERT INTO annotations (layer, slot, label, triggers, promotes, strength) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (layer, slot) DO UPDATE SET "
                    "label = excluded.label, triggers = excluded.triggers, "
                    "promotes = excluded.promotes, strength = excluded.strength",
                    (a.layer, a.slot, a.label, json.dumps(a.triggers), json.dumps(a.promotes),
                     a.strength))

    def set_label(self, layer: int, slot: int, label: str) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO annotations (layer, slot, user_label) VALUES (?, ?, ?) "
                       "ON CONFLICT (layer, slot) DO UPDATE SET user_label = excluded.user_label",
                       (layer, slot, label))

    def get(self, layer: int, slot: int) -> dict[str, Any] | None:
        return self.get_many(layer, [slot]).get(slot)

    def get_many(self, layer: int, slots: list[int]) -> dict[int, dict[str, Any]]:
        """The annotations of ``slots`` of ``layer`` that exist, by slot (one query)."""
        if not self.path.is_file() or not slots:
            return {}
        marks = ",".join("?" * len(slots))
        with self._connect() as db:
            rows = db.execute("SELECT slot, label, user_label, triggers, promotes, strength "
                              f"FROM annotations WHERE layer = ? AND slot IN ({marks})",
                              (layer, *slots)).fetchall()
        return {int(r[0]): {"layer": layer, "slot": int(r[0]), "label": r[2] or r[1] or "",
                            "triggers": json.loads(r[3] or "[]"),
                            "promotes": json.loads(r[4] or "[]"), "strength": r[5]}
                for r in rows}

    def search(self, text: str, limit: int = 20,
               layer: int | None = None) -> list[dict[str, Any]]:
        """Slots (of ``layer``, or any) whose label, triggers or promoted tokens contain
        ``text`` (any case), the strongest first."""
        if not self.path.is_file():
            return []
        pattern = f"%{text.lower()}%"
        where = "" if layer is None else " AND layer = ?"
        arguments: tuple[Any, ...] = (pattern,) if layer is None else (pattern, layer)
        with self._connect() as db:
            rows = db.execute(
                "SELECT layer, slot FROM annotations WHERE lower(coalesce(user_label, '') || "
                "' ' || coalesce(label, '') || ' ' || coalesce(triggers, '') || ' ' || "
                f"coalesce(promotes, '')) LIKE ?{where} ORDER BY strength DESC LIMIT ?",
                (*arguments, limit)).fetchall()
        found = [self.get(layer, slot) for layer, slot in rows]
        return [f for f in found if f is not None]
