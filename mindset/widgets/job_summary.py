"""A finished distillation job's result as a small table a newcomer can read."""

from __future__ import annotations

import math

from rich.console import Group
from rich.table import Table
from rich.text import Text

from engine.views import JobOutcome


def verdict(ratio: float) -> str:
    """What a perplexity ratio (student / teacher) means for the user."""
    if not math.isfinite(ratio):
        return "the student's perplexity is not finite: its weights are broken; train again"
    if ratio <= 1.01:
        return "within 1% of the teacher: a faithful student"
    if ratio <= 1.05:
        return (f"{(ratio - 1) * 100:.1f}% worse than the teacher: usable; more steps or a "
                "routed/flat memory close the rest")
    return (f"{(ratio - 1) * 100:.0f}% worse than the teacher: train longer, give more text, "
            "or replace fewer layers")


def summary_table(outcome: JobOutcome) -> Group:
    table = Table(title="finished: the student against its teacher on held-out text",
                  title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column("figure", style="bold")
    table.add_column("value")
    table.add_column("meaning", style="dim")
    table.add_row("perplexity", f"teacher {outcome.ppl_teacher:.2f}  student "
                  f"{outcome.ppl_student:.2f}", "lower is better")
    table.add_row("ratio", f"{outcome.ppl_ratio:.4f}", "student / teacher; 1 = as good")
    table.add_row("gap closed", f"{outcome.gap_closed:.3f}",
                  f"1 = the teacher, 0 = the MLP removed (perplexity {outcome.ppl_zeroed:.2f})")
    table.add_row("KL", f"{outcome.kl_per_token:.4f}", "nats per token; 0 = the same "
                  "next-token distribution")
    table.add_row("top-1 agreement", f"{outcome.top1_agreement * 100:.1f}%",
                  "tokens where both predict the same next token")
    hint = Text("o: open the student in Memory and Chat" if outcome.has_student else "")
    return Group(table, Text(verdict(outcome.ppl_ratio), style="bold"), hint)
