"""`mindset serve`: one-line refusals before anything loads, and its options reach the app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine.llm.server import free_port
from mindset.cli import run
from tests.bad_input_assets import wait_until_serving
from tests.conftest import REPO_ROOT


def exit_status(argv: list[str]) -> int:
    try:
        return run(argv)
    except SystemExit as stop:  # argparse's own errors
        return int(stop.code or 0)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mindset: error: ") and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("host", ["256.1.1.1", "bad host", "", "1.2.3"])
def test_an_invalid_host_is_one_line(host: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(["serve", "--model", "tiny-llama", "--host", host]) == 2
    assert "is not an IP address or host name" in one_line_error(capsys)


def test_an_address_not_on_this_machine_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # 192.0.2.0/24 is reserved for documentation: no machine has it.
    assert exit_status(["serve", "--model", "tiny-llama", "--host", "192.0.2.1",
                        "--port", str(free_port())]) == 2
    assert "pick another --host" in one_line_error(capsys)


@pytest.mark.parametrize("option", ["--model", "--name"])
def test_an_empty_model_or_name_is_one_line(option: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(["serve", option, ""]) == 2
    assert f"argument {option}: is empty" in one_line_error(capsys)


def test_a_short_key_is_refused_from_the_flag_and_the_environment(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    port = str(free_port())
    assert exit_status(["serve", "--model", "tiny-llama", "--port", port,
                        "--api-key", "qz7wx"]) == 2
    err = one_line_error(capsys)
    assert "--api-key is 5 characters" in err and "at least 16" in err
    assert "qz7wx" not in err  # never echoed
    monkeypatch.setenv("MINDSET_API_KEY", "tooshort123")
    assert exit_status(["serve", "--model", "tiny-llama", "--port", port]) == 2
    assert "MINDSET_API_KEY is 11 characters" in one_line_error(capsys)


@pytest.mark.parametrize(("option", "value"), [
    ("--max-body-bytes", "0"), ("--body-timeout", "nan"), ("--body-timeout", "-1"),
    ("--allow-host", "bad host"),
])
def test_bad_limits_are_one_line(option: str, value: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(["serve", "--model", "tiny-llama", f"{option}={value}"]) == 2
    assert f"argument {option}" in one_line_error(capsys)


def test_allow_host_and_the_limits_reach_the_server(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MINDSET_HOME": str(tmp_path)}
    env.pop("MINDSET_API_KEY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "mindset.cli", "serve", "--model", "tiny-llama", "--port",
         str(port), "--allow-host", "mindset.test", "--max-body-bytes", "2000", "--no-log"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(process, url, 90)
        assert httpx.get(f"{url}/v1/models").status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Host": "mindset.test"}).status_code == 200
        foreign = httpx.get(f"{url}/v1/models", headers={"Host": "evil.example"})
        assert foreign.status_code == 400 and foreign.json()["error"]["code"] == "invalid_host"
        big = httpx.post(f"{url}/v1/completions",
                         json={"model": "tiny-llama", "prompt": "x" * 3000})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)


def test_a_port_in_time_wait_is_free_to_serve_on() -> None:
    """A restart right after the last server closed its connections must not be refused."""
    import socket

    from engine.llm.server import check_port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.recv(1)
        client.close()
    check_port_free("127.0.0.1", port)  # raises "pick another --port" without SO_REUSEADDR
