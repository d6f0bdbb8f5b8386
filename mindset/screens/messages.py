"""Messages that screens post to the app (kept apart: the app imports them before its first
frame, and the screens themselves load later)."""

from __future__ import annotations

from textual.message import Message


class OpenMemoryEntry(Message):
    """Show one entry of a memory table in the Memory pane (posted to the app)."""

    def __init__(self, table: str, entry_id: int) -> None:
        super().__init__()
        self.table = table
        self.entry_id = entry_id
