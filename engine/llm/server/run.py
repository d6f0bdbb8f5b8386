"""Running the API with uvicorn: in the foreground (``mindset serve``) or on a thread."""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import threading
import time
from typing import Any

from engine.errors import MindsetError

STARTUP_TIMEOUT_S = 30.0
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def check_port_free(host: str, port: int) -> None:
    """Fail with one clear line, before loading anything, when ``host`` is not an address
    this machine can listen on or the port is taken."""
    family = listen_family(host)
    with socket.socket(family) as probe:
        # As uvicorn does: a port left in TIME_WAIT by the last run can be listened on again.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            advice = {errno.EADDRINUSE: "--port", errno.EADDRNOTAVAIL: "--host"}.get(
                exc.errno or 0, "--host or --port")
            raise MindsetError(
                f"cannot listen on {host}:{port} ({reason}); pick another {advice}"
            ) from None


def listen_family(host: str) -> socket.AddressFamily:
    """The address family for ``host``; a one-line error when it is no valid address."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    # A name whose last label is a number is meant as an IPv4 address (256.1.1.1, 10.1).
    if not host or not all(_LABEL.fullmatch(label) for label in labels) \
            or labels[-1].isdigit():
        raise MindsetError(f"{host!r} is not a valid address to listen on; pick another "
                           "--host (an IP address such as 127.0.0.1, or a host name)")
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise MindsetError(f"cannot resolve {host!r} ({exc.strerror or exc}); pick another "
                           "--host") from None
    return socket.AddressFamily(infos[0][0])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def serve(app: Any, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class BackgroundServer:
    """The API on a daemon thread, for tests, benchmarks and the workbench."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int | None = None,
                 log_level: str = "warning") -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level=log_level,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="mindset-server",
                                       daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise MindsetError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
