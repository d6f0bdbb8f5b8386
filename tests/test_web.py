"""``mindset --web`` on 127.0.0.1: the page and the WebSocket that drives the workbench need
the printed token, a Host naming the address served and, for the WebSocket, the same Origin."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest

from mindset.web import Guard, allowed_hosts, is_loopback

REPO = Path(__file__).resolve().parent.parent


@dataclass
class WebServer:
    port: int
    token: str
    process: subprocess.Popen[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(*extra: str, host: str = "127.0.0.1") -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mindset.cli", "--web", "--host", host, "--port", str(port),
         "--model", "tiny-llama", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return process, port


@pytest.fixture(scope="module")
def web() -> Iterator[WebServer]:
    process, port = start()
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        token = None
        while token is None:
            line = process.stdout.readline()
            if not line and (process.poll() is not None or time.monotonic() > deadline):
                raise AssertionError("mindset --web printed no URL: " + process.stderr.read()
                                     if process.stderr else "")
            match = re.search(rf"http://127\.0\.0\.1:{port}/\?token=([\w-]+)", line)
            token = match.group(1) if match else None
        yield WebServer(port, token, process)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_start_up_prints_a_url_with_a_long_random_token(web: WebServer) -> None:
    assert len(web.token) >= 32


def test_the_page_without_the_token_is_refused(web: WebServer) -> None:
    page = httpx.get(f"{web.base}/", timeout=5)
    assert page.status_code == 403
    assert "token" in page.text
    wrong = httpx.get(f"{web.base}/?token={'x' * len(web.token)}", timeout=5)
    assert wrong.status_code == 403


def test_the_token_becomes_a_strict_cookie_and_the_page_loads(web: WebServer) -> None:
    with httpx.Client(timeout=5) as client:
        first = client.get(f"{web.base}/?token={web.token}")
        assert first.status_code == 302 and first.headers["location"] == "/"
        cookie = first.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        page = client.get(f"{web.base}/")
        assert page.status_code == 200
        assert "Mindset" in page.text


def test_a_foreign_host_header_is_refused_even_with_the_token(web: WebServer) -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 still names evil.example."""
    page = httpx.get(f"{web.base}/?token={web.token}", timeout=5,
                     headers={"Host": f"evil.example:{web.port}"})
    assert page.status_code == 403
    assert "Host" in page.text


def test_static_files_need_no_token(web: WebServer) -> None:
    page = httpx.get(f"{web.base}/static/css/xterm.css", timeout=5)
    assert page.status_code in (200, 404)  # served without the token check, whatever exists


async def handshake(web: WebServer, *, origin: str | None, cookie: bool) -> int:
    headers = {"Origin": origin} if origin else {}
    cookies = {"mindset_token": web.token} if cookie else {}
    async with aiohttp.ClientSession(cookies=cookies) as session:
        try:
            ws = await session.ws_connect(f"ws://127.0.0.1:{web.port}/ws?width=80&height=24",
                                          headers=headers, timeout=aiohttp.ClientWSTimeout(5))
        except aiohttp.WSServerHandshakeError as error:
            return error.status
        await ws.close()
        return 101


def test_a_websocket_from_another_page_is_refused(web: WebServer) -> None:
    status = asyncio.run(handshake(web, origin="http://evil.example", cookie=True))
    assert status == 403


def test_a_websocket_without_the_token_is_refused(web: WebServer) -> None:
    status = asyncio.run(handshake(web, origin=web.base, cookie=False))
    assert status == 403


def test_a_websocket_from_the_page_itself_connects(web: WebServer) -> None:
    status = asyncio.run(handshake(web, origin=web.base, cookie=True))
    assert status == 101


def test_binding_beyond_loopback_warns_loudly() -> None:
    process, _ = start(host="0.0.0.0")
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 30
        seen = ""
        while "WARNING" not in seen and time.monotonic() < deadline:
            seen += process.stderr.readline()
        assert "not to loopback" in seen
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_host_and_origin_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")
    guard = Guard("t" * 40, allowed_hosts("127.0.0.1", 9000))
    assert guard.host_ok("localhost:9000") and guard.host_ok("127.0.0.1:9000")
    assert not guard.host_ok("127.0.0.1:9001") and not guard.host_ok(None)
    assert guard.origin_ok("http://localhost:9000") and guard.origin_ok(None)
    assert not guard.origin_ok("http://localhost:9000.evil.example")
    assert not guard.origin_ok("null")
    public = Guard("t" * 40, allowed_hosts("192.0.2.7", 9000, ["box.lan"]))
    assert public.host_ok("box.lan:9000") and not public.host_ok("localhost:9000")
    assert not guard.token_ok("t" * 39) and guard.token_ok("t" * 40)


def test_a_token_with_non_ascii_characters_is_refused_not_a_crash(web: WebServer) -> None:
    page = httpx.get(f"{web.base}/?token=%C3%A9", timeout=5)
    assert page.status_code == 403
    accented = "Bearer \u00e9t\u00e9".encode()
    header = httpx.get(f"{web.base}/", timeout=5, headers={"Authorization": accented})
    assert header.status_code == 403


def test_the_page_points_its_websocket_at_the_host_the_browser_used(web: WebServer) -> None:
    """A browser on localhost holds a cookie for localhost: its WebSocket must go there too."""
    page = httpx.get(f"{web.base}/", timeout=5, headers={
        "Host": f"localhost:{web.port}", "Cookie": f"mindset_token={web.token}"})
    assert page.status_code == 200
    assert f"ws://localhost:{web.port}/ws" in page.text
    direct = httpx.get(f"{web.base}/", timeout=5,
                       headers={"Cookie": f"mindset_token={web.token}"})
    assert f"ws://127.0.0.1:{web.port}/ws" in direct.text


def test_allow_host_adds_a_name_browsers_may_use() -> None:
    process, port = start("--allow-host", "workbench.example")
    try:
        assert process.stdout is not None
        token = None
        deadline = time.monotonic() + 60
        while token is None and time.monotonic() < deadline:
            match = re.search(r"\?token=([\w-]+)", process.stdout.readline())
            token = match.group(1) if match else None
        assert token is not None
        base = f"http://127.0.0.1:{port}"
        named = httpx.get(f"{base}/?token={token}", timeout=5,
                          headers={"Host": f"workbench.example:{port}"})
        assert named.status_code == 302
        other = httpx.get(f"{base}/?token={token}", timeout=5,
                          headers={"Host": f"other.example:{port}"})
        assert other.status_code == 403
    finally:
        process.terminate()
        process.wait(timeout=10)
