"""The Chat pane's side panel: what went into and came out of the last reply.

From the top: the long-term memories the agent recalled for the reply, each with its
recency, importance and relevance (each normalised over the candidates) and their weighted
total; the memory-layer entries a student's reply read most; the reply's feeling (and the
pinned one, when the user holds it); the model that answered (and the one it deferred
from); the tools it called; and the notices of the turn (an unreadable feeling tag, a
rating that held no number).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from engine.services.agent import Affect, ScoredMemory, StepDone, ToolUsed
from engine.views import MemoryUse

RECALLED_HINT = "The memories the agent recalls for a reply, with their scores."
MEMORY_HINT = "Chat with a student to see which memory entries its reply used most."
TEXT_CHARS = 90
SCORES_LEGEND = "total (recency, importance, relevance)"


@dataclass
class TurnReport:
    """What one turn reported, as the side panel shows it."""

    target: str
    recalled: tuple[ScoredMemory, ...] | None = None  # None: no Retrieved event yet
    steps: list[StepDone] = field(default_factory=list)
    tools: list[ToolUsed] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    affect: Affect | None = None
    estimated: bool = False  # the feeling was estimated from the text, not read from a tag
    replied: bool = False
    tokens: int = 0  # Token events streamed


def describe_affect(affect: Affect) -> str:
    name = affect.label or "unnamed"
    return f"{escape(name)}  arousal {affect.arousal:+.2f}  valence {affect.valence:+.2f}"


def recalled_lines(memories: tuple[ScoredMemory, ...]) -> str:
    if not memories:
        return "[dim]No memory was recalled for this reply.[/dim]"
    lines = [f"[dim]{SCORES_LEGEND}[/dim]"]
    for scored in memories:
        memory = scored.memory
        text = memory.text if len(memory.text) <= TEXT_CHARS \
            else memory.text[:TEXT_CHARS - 1] + "…"
        lines.append(f"[b]#{memory.id}[/b] {memory.kind}  {scores(scored)}\n"
                     f"  [dim]{escape(text)}[/dim]")
    return "\n".join(lines)


def scores(scored: ScoredMemory) -> str:
    """The total and its three parts, each min-max normalised over the candidates."""
    return (f"{scored.score:.2f} ({scored.recency:.2f}, {scored.importance:.2f}, "
            f"{scored.relevance:.2f})")


def memory_use_lines(usage: list[MemoryUse] | None) -> str:
    if usage is None:
        return "Memory use is shown for student models with memory layers."
    if not usage:
        return "The reply used no memory entries."
    return "\n".join(f"{u.table} #{u.id}  {u.weight:.2f}  {escape(u.label)}" for u in usage)


def answered_lines(steps: list[StepDone], models: list[str]) -> str:
    answers = [step for step in steps if step.step == "answer"]
    if not answers:
        return "[dim]—[/dim]"
    lines = []
    for step in answers:
        line = escape(step.model)
        if step.deferred:
            small = models[0] if models else "the small model"
            unsure = f", {step.measure} {step.uncertainty:.2f}" \
                if step.uncertainty is not None else ""
            line += f"  (deferred from {escape(small)}{unsure})"
        lines.append(line)
    others = len(steps) - len(answers)
    if others:
        lines.append(f"[dim]+ {others} upkeep call{'s' if others > 1 else ''} "
                     "(ratings, summaries, reflection)[/dim]")
    return "\n".join(lines)


class AgentSide(VerticalScroll):
    """The side panel of the Chat pane."""

    DEFAULT_CSS = """
    AgentSide .side-title { margin-top: 1; }
    AgentSide .side-body { height: auto; }
    """

    def compose(self) -> ComposeResult:
        for title, widget_id, hint in (
            ("memories recalled", "chat-recalled", RECALLED_HINT),
            ("memory used", "chat-memory", MEMORY_HINT),
            ("feeling", "chat-feeling", "[dim]—[/dim]"),
            ("answered by", "chat-answered", "[dim]—[/dim]"),
            ("tools", "chat-tools", "[dim]none[/dim]"),
            ("notices", "chat-notices", "[dim]none[/dim]"),
        ):
            yield Static(f"[b]{title}[/b]", classes="side-title")
            yield Static(hint, id=widget_id, classes="side-body")

    def _set(self, widget_id: str, text: str) -> None:
        self.query_one(f"#{widget_id}", Static).update(text)

    def begin(self, recalling: bool = True) -> None:
        """A turn starts: clear what the last one showed (a reply recalls memories first;
        a command's turn, such as ``/reflect``, recalls none)."""
        self._set("chat-recalled", "[dim]recalling…[/dim]" if recalling else "[dim]—[/dim]")
        self._set("chat-answered", "[dim]—[/dim]")
        self._set("chat-tools", "[dim]none[/dim]")
        self._set("chat-notices", "[dim]none[/dim]")

    def show(self, report: TurnReport, models: list[str] | None = None) -> None:
        if report.recalled is not None:
            self._set("chat-recalled", recalled_lines(report.recalled))
        self._set("chat-answered", answered_lines(report.steps, models or []))
        self._set("chat-tools", "\n".join(
            f"{escape(t.name)}({escape(t.argument[:40])}) → "
            f"{'ok' if t.result.ok else 'failed'}: {escape(t.result.text[:80])}"
            for t in report.tools) or "[dim]none[/dim]")
        self._set("chat-notices", "\n".join(f"• {escape(n)}" for n in report.notices)
                  or "[dim]none[/dim]")

    def show_feeling(self, report: TurnReport | None, held: Affect | None,
                     pinned: bool) -> None:
        """The reply's feeling; and the one the next prompt carries when it is pinned."""
        lines = []
        if report is not None and report.affect is not None:
            lines.append(describe_affect(report.affect)
                         + ("  [dim](estimated from the text)[/dim]" if report.estimated
                            else ""))
        elif report is not None and report.replied:
            lines.append("[dim]the reply's feeling could not be read[/dim]")
        if pinned and held is not None:
            lines.append(f"pinned: {describe_affect(held)}  [dim](/emotion off)[/dim]")
        self._set("chat-feeling", "\n".join(lines) or "[dim]—[/dim]")

    def show_memory_use(self, usage: list[MemoryUse] | None) -> None:
        self._set("chat-memory", memory_use_lines(usage))

    def reset(self) -> None:
        """A new conversation: nothing shown from the old one."""
        self.begin()
        self._set("chat-recalled", RECALLED_HINT)
        self._set("chat-memory", MEMORY_HINT)
        self._set("chat-feeling", "[dim]—[/dim]")
