"""Keep API keys out of everything we store or print.

Adapters and the server register the keys they hold; :func:`redact` masks those exact values,
and strings shaped like real keys (``sk-...``, ``hf_...``, ``Bearer <token>``), before text is
written anywhere. Plain words are never masked: a registered key must be at least
:data:`MIN_KEY_LENGTH` characters (a shorter one is refused, not silently left unmasked), and
a key shape must look random (a long run that mixes letters and digits).
"""

from __future__ import annotations

import re
import threading

from engine.errors import InputError

REDACTED = "[redacted]"
MIN_KEY_LENGTH = 16
KEY_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one"

_KEY_CHARS = r"A-Za-z0-9_\-"
# OpenAI-style ("sk-...", "sk-proj-...", "sk-ant-...") and Hugging Face ("hf_...") keys.
_PREFIXED = re.compile(rf"(?<![{_KEY_CHARS}])(?:sk-|hf_)[{_KEY_CHARS}]{{20,}}")
# "Authorization: Bearer <token>" and bare "Bearer <token>": the token is masked, the word kept.
_BEARER = re.compile(rf"(?i)\b(bearer\s+)([A-Za-z0-9._~+/=\-]{{{MIN_KEY_LENGTH},}})")
_SEGMENT = re.compile(r"[A-Za-z0-9]{12,}")

_lock = threading.Lock()
_secrets: set[str] = set()


def check_key(value: str, source: str, hint: str = KEY_HINT) -> str:
    """Return ``value``, or raise a one-line :class:`InputError` when it is too short to be a
    real key (and so could never be told apart from ordinary words in what we store)."""
    if len(value) < MIN_KEY_LENGTH:
        raise InputError(f"{source} is {len(value)} characters; an API key needs at least "
                         f"{MIN_KEY_LENGTH} ({hint})")
    return value


def register_secret(value: str | None, source: str = "the API key") -> None:
    """Remember ``value`` so that :func:`redact` masks it from now on; refuse short keys."""
    if not value:
        return
    check_key(value, source)
    with _lock:
        _secrets.add(value)


def _looks_random(token: str) -> bool:
    """Whether a key-shaped string holds a long run mixing letters and digits, as generated
    keys do and hyphenated words ("sk-learn-is-great") do not."""
    return any(any(c.isdigit() for c in run) and any(c.isalpha() for c in run)
               for run in _SEGMENT.findall(token))


def _mask_prefixed(match: re.Match[str]) -> str:
    return REDACTED if _looks_random(match.group(0)) else match.group(0)


def _mask_bearer(match: re.Match[str]) -> str:
    token = match.group(2)
    return match.group(1) + REDACTED if _looks_random(token) else match.group(0)


def redact(text: str) -> str:
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _PREFIXED.sub(_mask_prefixed, text)
    return _BEARER.sub(_mask_bearer, text)


def mask(value: str | None) -> str:
    """How a key may be shown to a person: whether it is set, never its value."""
    return "set" if value else "not set"
