"""What every request must pass before the API sees it (a pure ASGI middleware).

* Host: with no API key, anything that can make a browser send a request can use the server,
  so a web page must not reach it through a DNS name rebound to this machine. Only the
  address the connection arrived on (with its port), the loopback names when it arrived on
  loopback, and names given with ``--allow-host`` are answered.
* Body size: bodies over ``max_body_bytes`` get a 413. Moderately oversized ones are read and
  dropped first, so that the client can read the answer; far larger ones are refused
  unread, from their Content-Length.
* Body time: a body that has not fully arrived ``body_timeout_s`` after the headers (a
  Content-Length larger than what is sent, a client trickling bytes) gets a 408 and the
  connection is closed, instead of holding it forever.

The body is read here, bounded, and handed on whole to the application.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from engine.llm.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from engine.llm.server.errors import APIError

# The names (and addresses) that only ever reach this machine; the one definition, for the
# server's Host check and for the commands that warn about listening beyond loopback.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# An oversized body up to this many times the limit is read and dropped before the 413.
DRAIN_FACTOR = 2


@dataclass
class _Reading:
    size: int = 0
    over: bool = False


class _Gone(Exception):
    pass


class RequestGuard:
    def __init__(self, app: ASGIApp, *, check_host: bool, allowed_hosts: Iterable[str] = (),
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.app = app
        self.check_host = check_host
        self.allowed_names = frozenset(filter(None, (host_name(h) for h in allowed_hosts)))
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.check_host and not self.host_allowed(scope):
            host = header(scope, b"host")
            await reject(send, APIError(
                400, f"the Host header {host!r} is not this server's address; give the name "
                "to `mindset serve --allow-host NAME` to accept it", param="Host",
                code="invalid_host"))
            return
        length = header(scope, b"content-length")
        declared = int(length) if length and length.isascii() and length.isdigit() else None
        if declared is not None and declared > self.max_body_bytes and (
                declared > DRAIN_FACTOR * self.max_body_bytes
                or header(scope, b"expect") is not None):
            await reject(send, self.too_large())  # not worth reading (or not yet sent)
            return
        reading = _Reading()
        try:
            body = await asyncio.wait_for(self.read_body(receive, reading), self.body_timeout_s)
        except TimeoutError:
            await reject(send, self.too_large() if reading.over else APIError(
                408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                code="request_timeout"))
            return
        except _Gone:
            return
        if body is None:
            await reject(send, self.too_large())
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # later calls wait for the client to go away, as before
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def read_body(self, receive: Receive, reading: _Reading) -> bytes | None:
        """The whole body, or None when it is over the limit. An oversized body is still read
        (not kept) up to DRAIN_FACTOR times the limit: closing a socket with unread data
        resets it, and the client would see a reset instead of the 413."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone
            chunk = message.get("body", b"")
            reading.size += len(chunk)
            if reading.size > self.max_body_bytes:
                reading.over = True
                chunks.clear()
            else:
                chunks.append(chunk)
            if not message.get("more_body", False) \
                    or reading.size > DRAIN_FACTOR * self.max_body_bytes:
                return None if reading.over else b"".join(chunks)

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is over {self.max_body_bytes} bytes; send less, "
                        "or start the server with a larger --max-body-bytes",
                        code="request_too_large")

    def host_allowed(self, scope: Scope) -> bool:
        host = header(scope, b"host")
        if host is None:
            return False
        name, port = split_host(host)
        if name is None:
            return False
        if name in self.allowed_names:
            return True
        server = scope.get("server")
        if not server or server[1] is None:
            return False
        local = host_name(str(server[0]))
        if (port if port is not None else 80) != int(server[1]):
            return False
        return name == local or (is_loopback(local) and name in LOOPBACK_NAMES)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def host_name(text: str) -> str | None:
    """A host name or address as compared: lower case, no trailing dot, no IPv6 brackets."""
    name = text.strip().lower().removesuffix(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name or None


def split_host(host: str) -> tuple[str | None, int | None]:
    """``name[:port]`` or ``[v6][:port]`` from a Host header; (None, None) when malformed."""
    text = host.strip()
    port_text = ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None, None
        name, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                return None, None
            port_text = rest[1:]
    elif text.count(":") == 1:
        name, port_text = text.split(":")
    elif ":" in text:
        return None, None  # an unbracketed IPv6 address is not a valid Host
    else:
        name = text
    if port_text and not (port_text.isascii() and port_text.isdigit()
                          and 0 < int(port_text) < 65536):
        return None, None
    return host_name(name), int(port_text) if port_text else None


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` (an IP address, ``[::1]``, or a loopback name such as
    ``localhost``) only ever reaches this machine."""
    name = (address or "").strip().removeprefix("[").removesuffix("]")
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


async def reject(send: Send, error: APIError) -> None:
    """Answer with ``error`` and close the connection: an unread body must not be taken for
    the next request."""
    body = error.encoded()
    await send({"type": "http.response.start", "status": error.status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": body})
