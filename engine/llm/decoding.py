"""Turning a stream of token ids into a stream of text: incremental decoding and stop strings."""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """Text for each new token, holding back bytes of an unfinished UTF-8 character.

    Decoding a short window (from the previous emission point) instead of single tokens keeps
    tokenizers that mark word starts on the token (SentencePiece) spaced correctly.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        # A UTF-8 character spans at most 4 tokens: past that, the bytes are simply invalid.
        unfinished = new_text.endswith("\ufffd") and len(self.ids) - self.read_offset < 4
        if len(new_text) > len(prefix_text) and not unfinished:
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


class StopMatcher:
    """Cuts the text at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[:min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for length in range(1, len(self.pending) + 1):
            tail = self.pending[-length:]
            if any(s.startswith(tail) for s in self.stops):
                hold = length
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
