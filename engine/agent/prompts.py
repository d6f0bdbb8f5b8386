"""The agent's prompts. The default system prompt carries the proposal's heuristic
imperatives; the user can replace it (``/system`` in the terminal chat, saved per agent)."""

from __future__ import annotations

import re

DEFAULT_SYSTEM_PROMPT = (
    "You are Mindset's assistant, a helpful and honest companion with a long-term memory. "
    "Three heuristic imperatives guide you: reduce suffering, increase prosperity, and "
    "increase understanding. Answer briefly and truthfully; when you remember something "
    "relevant, use it; when you do not know, say so."
)

FEELING_INSTRUCTION = (
    "End every reply with one line naming your feeling: "
    "[feeling: <a word> | arousal <-1 to 1> | valence <-1 to 1>]"
)

TOOL_INSTRUCTION = (
    "To use a tool, write one line <tool name=\"NAME\">ARGUMENT</tool> and stop; its result "
    "comes back to you as a message. Tools:\n{tools}"
)

# Handled by the agent itself, beside the tool box's tools.
TASK_TOOL = "- add_task(description): queue a task for later; its priority is rated for you"

IMPORTANCE = (
    "On a scale of 1 to 10, where 1 is purely mundane (small talk, greetings) and 10 is "
    "extremely important to remember (a name, a date, a promise, a life event), rate how "
    "important it is to remember the following for future conversations.\n\n"
    "{text}\n\nAnswer with one number from 1 to 10."
)

PRIORITY = (
    "On a scale of 1 to 10, where 1 can wait indefinitely and 10 must be done now, rate the "
    "priority of this task.\n\nTask: {task}\n\nAnswer with one number from 1 to 10."
)

SUMMARY = (
    "Summary so far:\n{summary}\n\nNew turns:\n{turns}\n\n"
    "Write an updated summary of the whole conversation in at most {words} words. Keep "
    "names, numbers, dates, facts the user told you and anything promised."
)

INNER = (
    "Before you answer, think privately in two or three sentences: what does the user want, "
    "what do you remember that matters, and how will you answer? Do not answer yet."
)

REFLECTION_QUESTIONS = (
    "Statements:\n{statements}\n\nGiven only the information above, what are the "
    "{count} most salient high-level questions we can answer about the subjects in the "
    "statements? Write one question per line."
)

REFLECTION_ANSWER = (
    "Statements:\n{statements}\n\nQuestion: {question}\n\nAnswer in one or two sentences "
    "from the statements only, and cite the statements you used by their ids, like [#12]."
)

_INTEGER = re.compile(r"\b(10|[1-9])\b")


def first_rating(text: str) -> int | None:
    """The first whole number from 1 to 10 in a model's answer, or None."""
    match = _INTEGER.search(text)
    return int(match.group(1)) if match else None


_QUESTION_PREFIX = re.compile(r"^\s*(?:[-*•]|\d+[.)]|q\d*[:.)])\s*", re.IGNORECASE)


def questions(text: str, count: int) -> list[str]:
    """Up to ``count`` questions, one per line (numbering and bullets dropped)."""
    found: list[str] = []
    for line in text.splitlines():
        line = _QUESTION_PREFIX.sub("", line).strip()
        if len(line) > 8 and line not in found:
            found.append(line if line.endswith("?") else line.rstrip(".") + "?")
        if len(found) == count:
            break
    return found


_CITATION = re.compile(r"#\s*(\d+)")


def cited_ids(text: str) -> list[int]:
    """The memory ids an answer cites (``[#12]``, ``#12``), in order, without repeats."""
    ids: list[int] = []
    for match in _CITATION.finditer(text):
        value = int(match.group(1))
        if value not in ids:
            ids.append(value)
    return ids


_TOOL_CALL = re.compile(
    r"<tool\s+name\s*=\s*[\"']?([A-Za-z_][\w]*)[\"']?\s*>(.*?)(?:</tool>|$)"
    r"|<tool>\s*([A-Za-z_][\w]*)\s*[:(]\s*(.*?)\)?\s*(?:</tool>|$)",
    re.DOTALL)


def find_tool_call(text: str) -> tuple[str, str, int] | None:
    """(tool name, argument, where the call starts) of the first tool call in a reply."""
    match = _TOOL_CALL.search(text)
    if match is None:
        return None
    name = match.group(1) or match.group(3)
    argument = match.group(2) if match.group(1) else match.group(4)
    return name, (argument or "").strip(), match.start()
