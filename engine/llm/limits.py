"""Defaults of the server's request limits, importable without FastAPI (the CLI's help
shows them, and ``mindset --help`` must stay fast)."""

from __future__ import annotations

# Room for a prompt that fills a long context window; larger bodies get a 413.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# A body not fully received this long after its headers gets a 408.
DEFAULT_BODY_TIMEOUT_S = 30.0
