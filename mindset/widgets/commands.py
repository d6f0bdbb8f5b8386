"""The command palette provider: every action of the workbench, by name."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol, cast

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider


class CommandHost(Protocol):
    """What the palette needs from the app (the app module imports this one, not back)."""

    def binding_sections(self) -> list[tuple[str, list[Binding]]]: ...

    def key_for(self, binding: Binding) -> str: ...

    def run_section_action(self, section: str, action: str) -> Awaitable[None]: ...


class WorkbenchCommands(Provider):
    """Offers each binding's action of the app and its panes, with its key."""

    def _commands(self) -> list[tuple[str, str, Callable[[], Any]]]:
        app = cast(CommandHost, self.app)
        commands: list[tuple[str, str, Callable[[], Any]]] = []
        for section, bindings in app.binding_sections():
            for binding in bindings:
                if not binding.description or binding.id is None:
                    continue
                name = f"{section}: {binding.description}"
                help_text = f"key {app.key_for(binding)}  ·  id {binding.id}"
                commands.append((name, help_text, partial(app.run_section_action, section,
                                                          binding.action)))
        return commands

    async def discover(self) -> Hits:
        for name, help_text, callback in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, callback in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
