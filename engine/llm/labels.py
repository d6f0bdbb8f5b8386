"""Content labels from a chat's structure: which prompt tokens are data, not instructions.

:func:`content_labels` renders a chat as the model sees it (:func:`render_chat`: the
tokenizer's chat template, or a plain transcript for a base model without one), tokenises it,
and flags each token 1 (data) or 0 (everything else), for a model with a ``content`` label
channel (:mod:`engine.model.label_channels`). The rules, per message role:

* ``tool`` and ``function``: the whole content is data (a tool's or a function's result).
* ``user``: text inside retrieved-document tags ``<document>...</document>``,
  ``<doc>...</doc>`` and ``<context>...</context>`` (any case, attributes allowed:
  ``<document id="2">``); the text of quote lines, those starting with ``"> "`` (up to three
  spaces before it), after the marker; and the lines inside fenced blocks, between a line
  opening with three backticks and the next such line.
* ``system``: text inside the same document tags (retrieved context is often put there).
* ``assistant`` (and any other role): nothing; the model's own words.

An unclosed tag or fence runs to the end of its message. Delimiters stay 0 (the tags, the
``"> "`` markers, the fence lines, and the template's own text: role headers, special
tokens), and so does the generation prompt. A token is flagged when any character it covers
is data (a token that merges a delimiter with data is data: erring towards data is the safe
side). Tokens map to characters through a fast tokenizer's offsets; a slow tokenizer
tokenises the text piece by piece instead (the same text, perhaps split a little
differently at the piece boundaries).

Templates may rewrite a message's text; what the template did is found by rendering the chat
once with markers in place of the contents: a content may be copied as it is, trimmed, or
written as a JSON string (as Llama 3.1's template does for tool results). A template that
changes the text in any other way cannot be followed: that is an ``InputError``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from engine.errors import InputError, flat_text

DATA_ROLES = ("tool", "function")
DOCUMENT_ROLES = ("user", "system")
QUOTE_ROLES = ("user",)

_DOCUMENT_OPEN = re.compile(r"<(document|doc|context)(?:\s[^<>]*)?>", re.IGNORECASE)
_QUOTE_LINE = re.compile(r"^ {0,3}> (.+)$", re.MULTILINE)
_FENCE_LINE = re.compile(r"^ {0,3}```.*$", re.MULTILINE)

Span = tuple[int, int]


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True) -> str:
    """The text a chat becomes (its chat template, or a plain transcript for base models
    without one), ending with the reply's opening when ``add_generation_prompt``; tokenise
    it without special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template([dict(m) for m in messages],
                                                  add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
        return text
    transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return transcript + ("assistant:" if add_generation_prompt else "")


def content_labels(tokenizer: Any, messages: Sequence[Any], *,
                   add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
    """``(input_ids, content_flags)`` of the rendered chat: one flag (0 or 1) per token, by
    the rules in the module docstring."""
    chat = [_as_dict(message, index) for index, message in enumerate(messages)]
    if not chat:
        raise InputError("no messages given; a chat needs at least one message")
    text, spans = data_spans(tokenizer, chat, add_generation_prompt=add_generation_prompt)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [int(i) for i in encoded["input_ids"]]
        return ids, _flags_of_offsets(encoded["offset_mapping"], spans)
    return _piecewise(tokenizer, text, spans)


def data_spans(tokenizer: Any, messages: list[dict[str, Any]], *,
               add_generation_prompt: bool = True) -> tuple[str, list[Span]]:
    """The rendered chat and its data character spans ``[start, end)``, sorted, disjoint."""
    text = _render(tokenizer, messages, add_generation_prompt)
    found: list[Span] = []
    for index, start, position in _locate_messages(tokenizer, messages, text,
                                                   add_generation_prompt):
        for begin, end in message_spans(messages[index]["role"], messages[index]["content"]):
            found.append((start + position(begin), start + position(end)))
    return text, _merged(found)


def message_spans(role: str, content: str) -> list[Span]:
    """The data spans of one message's text, by its role (see the module docstring)."""
    if role in DATA_ROLES:
        return [(0, len(content))] if content else []
    spans: list[Span] = []
    if role in DOCUMENT_ROLES:
        spans += _document_spans(content)
    if role in QUOTE_ROLES:
        spans += [match.span(1) for match in _QUOTE_LINE.finditer(content)]
        spans += _fenced_spans(content)
    return _merged(spans)


# --- spans inside a message ------------------------------------------------------------------


def _document_spans(content: str) -> list[Span]:
    spans: list[Span] = []
    at = 0
    while (opened := _DOCUMENT_OPEN.search(content, at)) is not None:
        closing = re.compile(rf"</{re.escape(opened.group(1))}\s*>", re.IGNORECASE)
        closed = closing.search(content, opened.end())
        end = closed.start() if closed is not None else len(content)
        spans.append((opened.end(), end))
        at = closed.end() if closed is not None else len(content)
    return spans


def _fenced_spans(content: str) -> list[Span]:
    fences = list(_FENCE_LINE.finditer(content))
    spans: list[Span] = []
    for index in range(0, len(fences), 2):
        begin = min(fences[index].end() + 1, len(content))  # after the opening line
        end = fences[index + 1].start() if index + 1 < len(fences) else len(content)
        spans.append((begin, end))
    return spans


def _merged(spans: list[Span]) -> list[Span]:
    result: list[Span] = []
    for begin, end in sorted(span for span in spans if span[1] > span[0]):
        if result and begin <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], end))
        else:
            result.append((begin, end))
    return result


# --- where each message's text lies in the rendered chat -------------------------------------


Position = Callable[[int], int]


def _locate_messages(tokenizer: Any, messages: list[dict[str, Any]], text: str,
                     add_generation_prompt: bool) -> list[tuple[int, int, Position]]:
    """``(message index, start in text, position of a content character)`` for every place a
    message's content appears in the rendered chat."""
    nonce = uuid.uuid4().hex[:12]
    marker = re.compile(rf"mindsetslot{nonce}n(\d+)x")
    marked = _render(tokenizer, [{**m, "content": f"mindsetslot{nonce}n{i}x"}
                                 for i, m in enumerate(messages)], add_generation_prompt)
    parts = marker.split(marked)  # literal, index, literal, index, ..., literal
    literals, indexes = parts[0::2], [int(i) for i in parts[1::2]]
    if not text.startswith(literals[0]):
        raise _unfollowable(0)
    at = len(literals[0])
    located: list[tuple[int, int, Position]] = []
    for number, (index, following) in enumerate(zip(indexes, literals[1:], strict=True)):
        last = number == len(indexes) - 1
        for rendered, position in _renderings(messages[index]["content"]):
            end = at + len(rendered)
            if text.startswith(rendered, at) and (
                    text[end:] == following if last else text.startswith(following, end)):
                located.append((index, at, position))
                at = end + len(following)
                break
        else:
            raise _unfollowable(index)
    return located


def _renderings(content: str) -> list[tuple[str, Position]]:
    """The ways a template may write ``content``, each with where character ``k`` lands."""
    lead = len(content) - len(content.lstrip())
    stripped = content.strip()
    ways: list[tuple[str, Position]] = [
        (content, lambda k: k),
        (stripped, lambda k: min(max(k - lead, 0), len(stripped))),
    ]
    for ascii_only in (False, True):
        # A JSON string: its quotes come out around the marker too, so only the escaped
        # text stands for the content; escaping goes character by character.
        def position(k: int, ascii_only: bool = ascii_only) -> int:
            return len(json.dumps(content[:k], ensure_ascii=ascii_only)) - 2
        ways.append((json.dumps(content, ensure_ascii=ascii_only)[1:-1], position))
    return ways


def _unfollowable(index: int) -> InputError:
    return InputError(f"the chat template rewrites message {index}'s text in a way content "
                      "labels cannot follow; use a model whose template copies messages as "
                      "they are")


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except InputError:
        raise
    except Exception as exc:  # a template may raise anything (jinja's TemplateError...)
        raise InputError(f"the chat template refuses this chat ({flat_text(exc)[:200]})"
                         ) from None


def _as_dict(message: Any, index: int) -> dict[str, Any]:
    if isinstance(message, Mapping):
        chat = dict(message)
    else:
        chat = {"role": getattr(message, "role", None), "content": getattr(message, "content",
                                                                            None)}
    if not isinstance(chat.get("role"), str) or not isinstance(chat.get("content"), str):
        raise InputError(f"message {index} needs a role and a text content (strings)")
    return chat


# --- characters to tokens --------------------------------------------------------------------


def _flags_of_offsets(offsets: Sequence[Sequence[int]], spans: list[Span]) -> list[int]:
    """1 for each token whose characters overlap a data span (both sorted by position)."""
    flags: list[int] = []
    current = 0
    for begin, end in offsets:
        while current < len(spans) and spans[current][1] <= begin:
            current += 1
        overlaps = end > begin and current < len(spans) and spans[current][0] < end
        flags.append(int(overlaps))
    return flags


def _piecewise(tokenizer: Any, text: str, spans: list[Span]) -> tuple[list[int], list[int]]:
    """Tokens and flags of ``text`` tokenised piece by piece (for tokenizers without
    offsets): data spans and the text between them separately."""
    ids: list[int] = []
    flags: list[int] = []
    at = 0
    for begin, end in [*spans, (len(text), len(text))]:
        for piece, flag in ((text[at:begin], 0), (text[begin:end], 1)):
            if piece:
                piece_ids = [int(i) for i in tokenizer(piece, add_special_tokens=False)
                             ["input_ids"]]
                ids += piece_ids
                flags += [flag] * len(piece_ids)
        at = end
    return ids, flags
