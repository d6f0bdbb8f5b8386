"""User-facing errors.

A :class:`MindsetError` carries one line that says what is wrong and what to do about it.
The CLI prints it without a traceback and exits with status 2; the workbench shows it as a
notification.
"""

from __future__ import annotations


def flat_text(exc: BaseException) -> str:
    """An exception's text on one line: libraries (faiss, transformers) span a dozen."""
    return " ".join(str(exc).split())


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: text`` of an unexpected exception, on one line and of bounded length, for a
    message that wraps it."""
    text = flat_text(exc)
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


class MindsetError(Exception):
    """An error caused by the user's input or environment, with a one-line explanation."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(MindsetError, ValueError):
    """Bad input: a wrong path, a malformed file, a value out of range."""


class ModelLoadError(MindsetError):
    """A model could not be found, converted or loaded."""
