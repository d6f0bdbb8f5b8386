"""``mindset --web``: the same workbench in a browser, through textual-serve.

textual-serve runs the app as a subprocess per browser session, so the command it starts is
the ordinary CLI with the same model spec. Whoever holds the WebSocket drives the workbench
(and can read everything it shows), so the server guards it as Jupyter does:

* a random access token, printed in the URL at start-up; the first visit trades it for an
  HttpOnly, SameSite=Strict cookie and drops it from the address bar;
* the Host header must name the address served (or a loopback alias of it), which stops DNS
  rebinding, and a WebSocket's Origin must be that same address, which stops any other web
  page the user has open from connecting;
* binding to anything but loopback prints a loud warning.
"""

from __future__ import annotations

import hmac
import secrets
import shlex
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from engine.llm.server.guard import LOOPBACK_NAMES, is_loopback

TOKEN_COOKIE = "mindset_token"
PUBLIC_PREFIXES = ("/static/",)  # the textual-serve JavaScript and CSS: package files


def workbench_command(model_spec: str) -> str:
    """The shell command that opens the workbench for one browser session."""
    return f"{shlex.quote(sys.executable)} -m mindset.cli --model {shlex.quote(model_spec)}"


def allowed_hosts(host: str, port: int, extra: Iterable[str] = ()) -> set[str]:
    """The Host header values a request may carry: the bound address, its loopback aliases
    when it is loopback, and any names the user configured."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = {shown, *extra}
    if is_loopback(host):
        names.update(f"[{name}]" if ":" in name else name for name in LOOPBACK_NAMES)
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())


class Guard:
    """The checks every request passes before textual-serve sees it."""

    def __init__(self, token: str, hosts: set[str]) -> None:
        self.token = token
        self.hosts = {h.lower() for h in hosts}

    def host_ok(self, host_header: str | None) -> bool:
        return bool(host_header) and host_header.lower() in self.hosts  # type: ignore[union-attr]

    def origin_ok(self, origin: str | None) -> bool:
        """A browser always sends Origin with a WebSocket; tools may send none."""
        if origin is None:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() in self.hosts

    def token_ok(self, candidate: str | None) -> bool:
        # Bytes: compare_digest refuses non-ASCII str, and a stray byte must get a 403.
        return candidate is not None and hmac.compare_digest(
            candidate.encode("utf-8", "surrogateescape"), self.token.encode())


def guarded_server(command: str, *, host: str, port: int, token: str,
                   extra_hosts: Iterable[str] = ()) -> Any:
    """A textual-serve server whose every route but the static files needs the token and a
    Host (and, for the WebSocket, an Origin) that names the address served."""
    from aiohttp import web
    from textual_serve.server import Server

    guard = Guard(token, allowed_hosts(host, port, extra_hosts))
    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not guard.host_ok(request.headers.get("Host")):
            return web.Response(status=403, text="unexpected Host header: open the URL that "
                                "mindset --web printed\n")
        if request.path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        offered = request.query.get("token")
        if guard.token_ok(offered) and request.method == "GET" and request.path == "/":
            # Trade the token for a cookie and take it out of the address bar and history.
            response = web.HTTPFound("/")
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
            raise response
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not (guard.token_ok(request.cookies.get(TOKEN_COOKIE)) or guard.token_ok(offered)
                or guard.token_ok(bearer or None)):
            return web.Response(status=403, text="missing or wrong access token: open the URL "
                                "with ?token= that mindset --web printed\n")
        if request.path == "/ws" and not guard.origin_ok(request.headers.get("Origin")):
            return web.Response(status=403, text="WebSocket from another origin refused\n")
        return await handler(request)

    class GuardedServer(Server):  # type: ignore[misc]
        async def handle_index(self, request: web.Request) -> Any:
            # The page's WebSocket and static URLs name the host the browser used (checked by
            # the guard), so the cookie set for that host goes with the WebSocket.
            scheme = "https" if self.public_url.startswith("https") else "http"
            bound, self.public_url = self.public_url, f"{scheme}://{request.host}"
            try:  # no await before the URLs are built: nothing else sees the swap
                return await super().handle_index(request)
            finally:
                self.public_url = bound

        async def _make_app(self) -> web.Application:
            app = await super()._make_app()
            app.middlewares.append(check)
            return app

        async def on_startup(self, app: web.Application) -> None:
            self.console.print(f"Mindset workbench on {self.public_url}/?token={token}",
                               highlight=False, soft_wrap=True)
            self.console.print("Press Ctrl+C to quit")

    return GuardedServer(command, host=host, port=port, title="Mindset")


def serve_web(host: str = "127.0.0.1", port: int = 8566, model_spec: str = "default",
              *, token: str | None = None, extra_hosts: Iterable[str] = ()) -> None:
    """Serve the workbench on http://host:port until interrupted; ``extra_hosts`` are the
    names (or addresses) browsers may use to reach it besides ``host``."""
    if not is_loopback(host):
        bar = "!" * 78
        print(f"{bar}\nWARNING: the workbench is bound to {host}, not to loopback: anyone "
              "who can reach\nthis address and learns the token can drive it and read your "
              "memory and chats.\nUse --host 127.0.0.1 unless you mean it; browsers must use "
              f"{host} or a name given with --allow-host.\n{bar}", file=sys.stderr, flush=True)
    server = guarded_server(workbench_command(model_spec), host=host, port=port,
                            token=token or secrets.token_urlsafe(32), extra_hosts=extra_hosts)
    server.serve()
