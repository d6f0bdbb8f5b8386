"""Text and JSON summaries of a model's shape and measured importance, for ``mindset model
inspect``: a line per layer with its heads (importance as a bar per head, gates), its MLP or
memory layer, and how much of each was used on the calibration text."""

from __future__ import annotations

from typing import Any

from engine.model.anatomy import decoder_layers, mlp_of, unwrap
from engine.model.architecture.attention import attention_shape
from engine.model.architecture.counts import LAYER_PARTS, PART_LABELS, PartCounts
from engine.model.architecture.importance import HeadImportance, NeuronUsage, SlotUsage
from engine.model.architecture.record import dense_width, is_dense_mlp

BARS = " ▁▂▃▄▅▆▇█"


def bar(value: float, top: float) -> str:
    """One block character for ``value`` on a scale up to ``top``."""
    if top <= 0:
        return BARS[0]
    return BARS[min(len(BARS) - 1, round(value / top * (len(BARS) - 1)))]


def count_lines(counts: PartCounts) -> list[str]:
    """The parts of a model and their parameter counts, one per line."""
    rows = [("embeddings", counts.embeddings), ("lm head", counts.lm_head),
            ("final norm", counts.final_norm), ("feedback", counts.feedback),
            ("other", counts.other)]
    rows += [(f"{PART_LABELS[part]} (all layers)", counts.layer_part(part))
             for part in LAYER_PARTS]
    return [f"{label:<26} {value:>14,}" for label, value in rows if value]


def layer_table(model: Any, importance: HeadImportance | None = None) -> list[dict[str, Any]]:
    """Per layer: heads, key/value heads, MLP width or memory kind, gates and importance."""
    module = unwrap(model)
    table: list[dict[str, Any]] = []
    for index in range(len(decoder_layers(module))):
        shape = attention_shape(module, index)
        mlp = mlp_of(module, index)
        row: dict[str, Any] = {"layer": index, "heads": shape.heads, "kv_heads": shape.kv_heads,
                               "head_dim": shape.head_dim}
        if is_dense_mlp(mlp):
            row["mlp"] = dense_width(mlp)
        else:
            row["memory"] = type(mlp).__name__
        if importance is not None:
            row["importance"] = importance.normalised[index]
            row["gates"] = importance.gates[index]
        table.append(row)
    return table


def usage_lines(model: Any, importance: HeadImportance, neurons: dict[int, NeuronUsage],
                slots: dict[int, SlotUsage]) -> list[str]:
    """A readable block: per layer the heads' importance bars and what its MLP/memory did."""
    top = max((max(scores) for scores in importance.normalised if scores), default=1.0)
    lines = [f"head importance (Michel et al. 2019, normalised per layer; calibration loss "
             f"{importance.loss:.3f}):"]
    for row in layer_table(model, importance):
        index = row["layer"]
        bars = "".join(bar(score, top) for score in row["importance"])
        gates = row.get("gates")
        gate_text = f"  gates {min(gates):.2f}..{max(gates):.2f}" if gates else ""
        if index in neurons:
            summary = neurons[index].summary()
            part = (f"mlp {row['mlp']}: {summary['mean_active_share']:.0%} active on average, "
                    f"{summary['never_active_share']:.0%} never")
        elif index in slots:
            summary = slots[index].summary()
            part = (f"memory {summary['slots']} slots: {summary['never_read_share']:.0%} "
                    f"never read")
        else:
            part = f"mlp {row.get('mlp', row.get('memory'))}"
        lines.append(f"  layer {index:>2}  heads {row['heads']:>2}/{row['kv_heads']:<2} "
                     f"[{bars}]{gate_text}  {part}")
    least = importance.ranked()[:5]
    lines.append("least important heads: " + ", ".join(f"{layer}:{head} ({score:.3f})"
                                                      for layer, head, score in least))
    return lines
