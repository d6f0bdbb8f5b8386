"""The local OpenAI-compatible server (``mindset serve``)."""

from engine.llm.server.app import APIError, create_app
from engine.llm.server.run import BackgroundServer, check_port_free, free_port, serve

__all__ = ["APIError", "BackgroundServer", "check_port_free", "create_app", "free_port", "serve"]
