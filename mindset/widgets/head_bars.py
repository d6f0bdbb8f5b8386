"""What the Model pane draws from a :class:`engine.views.ShapeReport`: per-head importance bars,
the details of a selected layer, head, MLP or memory, a tree of a reshaped model, and the
original and the result side by side.

Head importance is Michel et al.'s score normalised per layer, so heads compare within a
layer: each bar's length and colour is the head's score over the layer's highest (green from
two thirds of it, yellow from one third, red below). Everything here is plain functions of
view data, so the pane's look is tested without a model.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.markup import escape

from engine.views import LayerStat, ModelNode, ShapeReport
from mindset.screens.surgery_form import changed_counts

BAR_WIDTH = 16


def human(count: int) -> str:
    """A parameter count as 135.5M / 98.3K / 512."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def importance_style(share: float) -> str:
    """The theme colour of a head whose score is ``share`` of its layer's highest."""
    return "$success" if share >= 2 / 3 else "$warning" if share >= 1 / 3 else "$error"


def head_bars(layer: LayerStat, selected: int | None = None) -> list[str]:
    """One markup line per head: a bar of its importance, the score, its gate if any."""
    scores = [h.importance for h in layer.head_stats if h.importance is not None]
    top = max(scores, default=0.0)
    lines = []
    for stat in layer.head_stats:
        mark = "▶" if stat.head == selected else " "
        gate = f"  gate {stat.gate:.3f}" if stat.gate is not None else ""
        if stat.importance is None:
            lines.append(f"{mark} head {stat.head:>2}  [dim]{'·' * BAR_WIDTH}  not measured"
                         f"[/dim]{gate}")
            continue
        share = stat.importance / top if top > 0 else 0.0
        filled = round(share * BAR_WIDTH)
        bar = "█" * filled + "░" * (BAR_WIDTH - filled)
        lines.append(f"{mark} head {stat.head:>2}  [{importance_style(share)}]{bar}[/]  "
                     f"{stat.importance:.3f}{gate}")
    return lines


def layer_shape(layer: LayerStat) -> str:
    """``heads 4 (kv 2) · mlp 128`` or ``heads 4 · memory featural``."""
    heads = f"heads {layer.heads}" + (f" (kv {layer.kv_heads})"
                                      if layer.kv_heads != layer.heads else "")
    part = f"mlp {layer.mlp}" if layer.mlp is not None else f"memory {layer.memory or '?'}"
    return f"{heads} · {part}"


def _find(report: ShapeReport | None, index: int | None) -> LayerStat | None:
    if report is None or index is None:
        return None
    return next((layer for layer in report.layers if layer.layer == index), None)


def details(node: ModelNode | None, report: ShapeReport | None, state: str) -> str:
    """The details panel's markup for the selected node. ``state`` says how far the
    measurement is ("" when none has started, "measuring", "done", or an error line)."""
    if node is None:
        lines = ["[b]Select a layer, a head or a memory[/b] in the tree (↑↓): its importance "
                 "and usage are measured on calibration text.", "",
                 "[dim]o: operation on the selection · p: prune heads · ctrl+p: every "
                 "command[/dim]"]
        if report is not None:
            lines[1:1] = ["", f"{escape(report.title)}: {len(report.layers)} layers, "
                          f"{human(report.total)} parameters"]
        return "\n".join(lines)
    lines = [f"[b]{escape(node.label)}[/b]  {human(node.params)} parameters"]
    if node.detail:
        lines.append(f"[i]{escape(node.detail)}[/i]")
    layer = _find(report, node.layer)
    if state == "measuring":
        lines.append("[dim]measuring importance and usage…[/dim]")
    elif state not in ("", "done"):
        lines.append(f"[$error]{escape(state)}[/]")
    if layer is None:
        if node.layer is None and report is not None:
            lines.append(f"{len(report.layers)} layers, {human(report.total)} parameters")
            if report.calibration:
                lines.append(f"[dim]measured on {escape(report.calibration)}[/dim]")
        return "\n".join(lines)
    lines.append(f"layer {layer.layer}: {layer_shape(layer)} · {human(layer.params)} parameters")
    if node.kind in ("layer", "attention", "head"):
        lines.append("")
        lines.append("[b]head importance[/b]" + (" (and gates)" if any(
            h.gate is not None for h in layer.head_stats) else ""))
        lines.extend(head_bars(layer, node.head))
        if node.kind == "head" and node.head is not None:
            lines.append("")
            lines.append(_head_rank(layer, node.head))
    if node.kind in ("layer", "mlp", "memory"):
        lines.append("")
        lines.append(escape(layer.usage) if layer.usage else
                     "[dim]usage: not measured yet[/dim]")
    return "\n".join(lines)


def _head_rank(layer: LayerStat, head: int) -> str:
    scored = sorted((h for h in layer.head_stats if h.importance is not None),
                    key=lambda h: -(h.importance or 0.0))
    rank = next((i + 1 for i, h in enumerate(scored) if h.head == head), None)
    if rank is None:
        return "[dim]importance not measured yet[/dim]"
    where = ("the most important" if rank == 1 else "the least important"
             if rank == len(scored) else f"{_ordinal(rank)} most important")
    return f"head {head} is {where} of the layer's {len(scored)} heads"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def report_tree(report: ShapeReport) -> ModelNode:
    """A reshaped model's structure as a tree (the engine describes only the originals)."""
    root = ModelNode(report.title, report.total)
    for layer in report.layers:
        heads = [ModelNode(f"head {h.head}", 0, f"gate {h.gate:.3f}" if h.gate is not None
                           else "", kind="head", layer=layer.layer, head=h.head)
                 for h in layer.head_stats]
        # The report counts whole layers: the parts show no count of their own.
        attention = ModelNode("attention", 0, layer_shape(layer).split(" · ")[0],
                              heads, kind="attention", layer=layer.layer)
        if layer.mlp is not None:
            part = ModelNode("mlp", 0, f"{layer.mlp} neurons", kind="mlp", layer=layer.layer)
        else:
            part = ModelNode("memory", 0, layer.memory or "", kind="memory", layer=layer.layer)
        root.children.append(ModelNode(f"layer {layer.layer}", layer.params, "",
                                       [attention, part], kind="layer", layer=layer.layer))
    return root


def _ppl(value: float | None) -> str:
    return "…" if value is None else f"{value:.2f}"


def comparison(original: ShapeReport | None, result: ShapeReport | None,
               perplexity: dict[str, float], history: list[str], counts: list[str],
               role: str, evaluating: bool) -> RenderableType:
    """The original and the result side by side: parameters, changed layers, held-out
    perplexity and its ratio, then the applied operations and the last one's counts."""
    if result is None and not history:
        return Text("No result yet: run an operation (o, or ctrl+p and type its name); "
                    "the original is never changed.", style="dim")
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("")
    table.add_column(f"original ({role})", justify="right")
    table.add_column("result", justify="right")
    table.add_column("change", justify="right")
    if original is not None and result is not None:
        change = result.total - original.total
        share = f" ({100 * change / original.total:+.1f}%)" if original.total else ""
        table.add_row("parameters", human(original.total), human(result.total),
                      f"{change:+,}{share}")
        table.add_row("layers", str(len(original.layers)), str(len(result.layers)), "")
        table.add_row("heads", str(sum(x.heads for x in original.layers)),
                      str(sum(x.heads for x in result.layers)), "")
        for index in range(max(len(original.layers), len(result.layers))):
            old = original.layers[index] if index < len(original.layers) else None
            new = result.layers[index] if index < len(result.layers) else None
            if old is not None and new is not None and layer_shape(old) == layer_shape(new) \
                    and old.params == new.params:
                continue
            table.add_row(f"layer {index}",
                          "—" if old is None else f"{layer_shape(old)} · {human(old.params)}",
                          "—" if new is None else f"{layer_shape(new)} · {human(new.params)}",
                          "")
    old_ppl, new_ppl = perplexity.get("original"), perplexity.get("result")
    ratio = f"×{new_ppl / old_ppl:.3f}" if old_ppl and new_ppl is not None else ""
    table.add_row("perplexity", _ppl(old_ppl), _ppl(new_ppl) if result is not None else "—",
                  ratio)
    parts: list[RenderableType] = [table]
    if evaluating:
        parts.append(Text("evaluating held-out perplexity…", style="dim"))
    if history:
        parts.append(Text("\napplied:", style="bold"))
        # A history line joins an operation's first change lines: one line, one space each.
        parts.extend(Text(f"  {i}. {' '.join(line.split()).replace(':;', ':')}")
                     for i, line in enumerate(history, 1))
    changed = changed_counts(counts)
    if changed:
        parts.append(Text("\nthe last operation's parameters, before → after:", style="bold"))
        parts.extend(Text(line, no_wrap=True, overflow="ellipsis") for line in changed)
    return Group(*parts)

