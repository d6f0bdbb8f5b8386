"""Keep API keys out of everything we store or print.

Adapters and the server register the keys they hold; :func:`redact` masks those values, and
anything shaped like a well-known key format, in text before it is written anywhere.
"""

from __future__ import annotations

import re
import threading

REDACTED = "[redacted]"
# OpenAI-style keys ("sk-...", "sk-proj-...") a user may paste into a message.
_KEY_PATTERN = re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}")
_MIN_SECRET_LENGTH = 4

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember ``value`` so that :func:`redact` masks it from now on."""
    if value and len(value) >= _MIN_SECRET_LENGTH:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _KEY_PATTERN.sub(REDACTED, text)


def mask(value: str | None) -> str:
    """How a key may be shown to a person: whether it is set, never its value."""
    return "set" if value else "not set"
