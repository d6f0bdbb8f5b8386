"""``mindset --web``: the same workbench in a browser, through textual-serve.

textual-serve runs the app as a subprocess per browser session, so the command it starts is
the ordinary CLI with the same model spec.
"""

from __future__ import annotations

import shlex
import sys


def workbench_command(model_spec: str) -> str:
    """The shell command that opens the workbench for one browser session."""
    return f"{shlex.quote(sys.executable)} -m mindset.cli --model {shlex.quote(model_spec)}"


def serve_web(host: str = "127.0.0.1", port: int = 8566, model_spec: str = "default") -> None:
    """Serve the workbench on http://host:port until interrupted."""
    from textual_serve.server import Server

    server = Server(workbench_command(model_spec), host=host, port=port, title="Mindset")
    server.serve()
