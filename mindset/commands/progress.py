"""Progress bars for long CLI commands: on a terminal only, never with --json or when piped."""

from __future__ import annotations

import sys
from typing import Any


class NoBar:
    """What a command holds when no bar is shown: every call does nothing."""

    n = 0
    total = 0

    def update(self, count: int = 1) -> None:
        self.n += count

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def write(self, text: str) -> None:
        print(text)  # where tqdm.write prints: stdout

    def close(self) -> None:
        pass


def wanted(json_output: bool = False) -> bool:
    """A bar is drawn only for a person watching: stderr is a terminal and no --json."""
    return not json_output and sys.stderr.isatty()


def progress(total: int, desc: str, unit: str, *, json_output: bool = False) -> Any:
    """A tqdm bar with an ETA (on stderr), or a :class:`NoBar` where none is wanted."""
    if not wanted(json_output):
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, ncols=width(), leave=False)


def width() -> int:
    """The terminal's width; 80 where it reports none (a fresh pseudo-terminal says 0,
    which would draw an empty bar)."""
    import shutil

    return shutil.get_terminal_size((80, 24)).columns or 80
