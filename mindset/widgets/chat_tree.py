"""A conversation as a tree: editing an earlier turn or regenerating a reply adds a branch.

Each node is one message. The visible conversation is the path from the root that follows
each node's selected child; moving between branches changes which sibling is selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)  # turns are compared by identity: two replies may read the same
class Turn:
    role: str
    content: str
    parent: Turn | None = None
    children: list[Turn] = field(default_factory=list)
    selected: int = 0

    def siblings(self) -> list[Turn]:
        return self.parent.children if self.parent is not None else [self]

    def position(self) -> tuple[int, int]:
        """(1-based index among its siblings, number of siblings)."""
        siblings = self.siblings()
        return siblings.index(self) + 1, len(siblings)


class ChatTree:
    """The conversation tree with a root that holds no message."""

    def __init__(self) -> None:
        self.root = Turn("root", "")

    def path(self) -> list[Turn]:
        """The visible conversation, oldest first."""
        turns: list[Turn] = []
        node = self.root
        while node.children:
            node = node.children[min(node.selected, len(node.children) - 1)]
            turns.append(node)
        return turns

    def add(self, parent: Turn, role: str, content: str) -> Turn:
        """Add a child to ``parent`` and make it the selected branch."""
        turn = Turn(role, content, parent=parent)
        parent.children.append(turn)
        parent.selected = len(parent.children) - 1
        return turn

    def append(self, role: str, content: str) -> Turn:
        """Add a message at the end of the visible conversation."""
        path = self.path()
        return self.add(path[-1] if path else self.root, role, content)

    def branch_from(self, turn: Turn, content: str) -> Turn:
        """A new sibling of ``turn`` with other content (an edit or a regeneration)."""
        assert turn.parent is not None
        return self.add(turn.parent, turn.role, content)

    def switch(self, turn: Turn, step: int) -> Turn:
        """Select the sibling ``step`` places away from ``turn``; returns the new one."""
        if turn.parent is None:
            return turn
        parent = turn.parent
        index = (parent.children.index(turn) + step) % len(parent.children)
        parent.selected = index
        return parent.children[index]

    def history_before(self, turn: Turn) -> list[Turn]:
        """The messages that lead up to ``turn`` (its context)."""
        turns: list[Turn] = []
        node = turn.parent
        while node is not None and node is not self.root:
            turns.append(node)
            node = node.parent
        return list(reversed(turns))
