"""The agent's bookkeeping between replies: rating importance, rolling summaries and
reflection (after Generative Agents, Park et al. 2023).

- **Importance**: each turn's memory gets a 1-10 rating from the model (the ``importance``
  step); an answer that holds no number is reported and the turn gets the neutral 5.
- **Summaries**: when the turns after the last summary no longer fit the context budget, the
  oldest of them are folded into the conversation's rolling summary, which is also kept as
  a ``summary`` memory.
- **Reflection**: when the summed importance of the memories written since the last
  reflection reaches the threshold, the agent asks itself the most salient questions about
  its recent memories, answers each from the memories retrieved for it, citing their ids,
  and stores each answer as a ``reflection`` memory whose evidence is the cited ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.agent import prompts
from engine.agent.cascade import Cascade, StepResult
from engine.agent.context import context_overflow
from engine.agent.dialog import DialogNode
from engine.agent.long_term import LongTermMemory, Memory
from engine.agent.state import AgentState
from engine.errors import InputError
from engine.llm.types import ChatMessage, SamplingParams

NEUTRAL_IMPORTANCE = 5
REFLECTION_MARKER = "reflection_marker"
Report = Callable[[str], None]  # where notices go (the turn's event stream)
StepSink = Callable[[StepResult], None]


@dataclass
class Upkeep:
    cascade: Cascade
    memory: LongTermMemory
    state: AgentState
    report: Report
    on_step: StepSink
    seed: int | None = None

    async def ask(self, step: str, prompt: str, *, max_tokens: int,
                  conversation_id: str | None = None) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, seed=self.seed)
        result = await self.cascade.run(step, [ChatMessage("user", prompt)], params,
                                        conversation_id=conversation_id)
        self.on_step(result)
        return result.text

    async def rate(self, step: str, template: str, conversation_id: str | None,
                   **fields: str) -> int:
        """A 1-10 rating; the neutral 5, with a notice, when the answer holds no number."""
        answer = await self.ask(step, template.format(**fields), max_tokens=6,
                                conversation_id=conversation_id)
        rating = prompts.first_rating(answer)
        if rating is None:
            self.report(f"the {step} rating {answer.strip()[:40]!r} holds no number from 1 "
                        f"to 10; used {NEUTRAL_IMPORTANCE}")
            return NEUTRAL_IMPORTANCE
        return rating

    # Summaries ------------------------------------------------------------------------------

    async def summarise(self, conversation_id: str, old_summary: str,
                        turns: Sequence[DialogNode], covered: int,
                        words: int = 120, chunk_chars: int = 2400) -> tuple[str, int | None]:
        """Fold ``turns`` into the rolling summary, a chunk of at most ``chunk_chars`` of
        turns per call (each call must fit a small model's context); returns the new text
        and its memory id."""
        text = old_summary
        pending = list(turns)
        while pending:
            chunk: list[DialogNode] = []
            size = 0
            for turn in pending:
                if chunk and size + len(turn.content) > chunk_chars:
                    break
                chunk.append(turn)
                size += len(turn.content)
            lines = "\n".join(f"{t.role}: {t.content[:chunk_chars]}" for t in chunk)
            try:
                folded = (await self.ask("summary", prompts.SUMMARY.format(
                    summary=text or "(nothing yet)", turns=lines, words=words),
                    max_tokens=words * 2, conversation_id=conversation_id)).strip()
            except InputError as exc:
                if not context_overflow(exc) or chunk_chars <= 200:
                    raise
                chunk_chars //= 2  # a smaller model's context: fold fewer turns per call
                words = max(30, words // 2)
                continue
            if folded:
                text = folded
            pending = pending[len(chunk):]
        if not text.strip():
            self.report("the summary came back empty; the old turns are kept as they were")
            return old_summary, None
        stored = self.memory.add(f"Summary of the conversation so far: {text}", kind="summary",
                                 importance=6, conversation_id=conversation_id,
                                 node_id=turns[-1].id)
        self.state.set_summary(conversation_id, text, turns[-1].id, covered + len(turns),
                               stored.id)
        return text, stored.id

    # Reflection -----------------------------------------------------------------------------

    def reflection_due(self, threshold: int) -> bool:
        marker = int(self.state.setting(REFLECTION_MARKER, 0))
        return self.memory.importance_since(marker) >= threshold

    async def reflect(self, count: int = 3, *, conversation_id: str | None = None,
                      recent: int = 60) -> tuple[list[str], list[Memory]]:
        """Questions about the recent memories, answered from retrieved ones with citations."""
        memories = self.memory.recent(recent)
        if not memories:
            return [], []
        newest = max(m.id for m in memories)
        while True:  # as many of the newest statements as the model's context holds
            statements = "\n".join(f"[#{m.id}] {m.text[:400]}" for m in memories)
            try:
                answer = await self.ask("reflection", prompts.REFLECTION_QUESTIONS.format(
                    statements=statements, count=count), max_tokens=40 * count,
                    conversation_id=conversation_id)
                break
            except InputError as exc:
                if not context_overflow(exc) or len(memories) == 1:
                    raise
                memories = memories[len(memories) // 2:]
        asked = prompts.questions(answer, count)
        if not asked:
            self.report("reflection found no questions in the model's answer; it will try "
                        "again after more memories")
        written: list[Memory] = []
        for question in asked:
            found = self.memory.search(question, k=8, conversation_id=None)
            if not found:
                continue
            reply = ""
            while found:
                listed = "\n".join(f"[#{s.memory.id}] {s.memory.text[:400]}" for s in found)
                try:
                    reply = (await self.ask("reflection", prompts.REFLECTION_ANSWER.format(
                        statements=listed, question=question), max_tokens=120,
                        conversation_id=conversation_id)).strip()
                    break
                except InputError as exc:
                    if not context_overflow(exc) or len(found) == 1:
                        raise
                    found = found[:len(found) // 2]  # keep the best-scored
            if not reply:
                continue
            retrieved = {s.memory.id for s in found}
            evidence = [i for i in prompts.cited_ids(reply) if i in retrieved]
            if not evidence:
                # An uncited answer still rests on what it was shown; say so, and link that.
                evidence = [s.memory.id for s in found[:3]]
                self.report(f"the reflection on {question!r} cited no memory ids; linked it "
                            "to the memories it was shown")
            written.append(self.memory.add(f"Reflection: {question} {reply}",
                                           kind="reflection", importance=7,
                                           conversation_id=conversation_id,
                                           evidence=evidence))
        self.state.set_setting(REFLECTION_MARKER, max(newest, *(m.id for m in written))
                               if written else newest)
        return asked, written
