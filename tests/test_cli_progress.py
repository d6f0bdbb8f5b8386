"""Long commands draw a progress bar with an ETA on a terminal, and none when piped or with
--json (a real subprocess; the terminal is a pseudo-terminal on its stderr)."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
from pathlib import Path

from tests.conftest import REPO_ROOT


def run_eval(data: Path, *extra: str, terminal: bool) -> tuple[str, str]:
    command = [sys.executable, "-m", "mindset.cli", "eval", "--model", "tiny-llama",
               "--data", str(data), "--window", "32", *extra]
    if not terminal:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              cwd=REPO_ROOT)
        return done.stdout, done.stderr
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=follower, text=True,
                              timeout=120, cwd=REPO_ROOT)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other side is closed: all read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    return done.stdout, b"".join(chunks).decode("utf-8", "replace")


def test_eval_shows_a_bar_on_a_terminal_only(tmp_path: Path) -> None:
    data = tmp_path / "text.txt"
    data.write_text("a few words of text to score, again and again. " * 40, encoding="utf-8")
    _, terminal = run_eval(data, terminal=True)
    assert "eval:" in terminal and "tok" in terminal and "<" in terminal  # tqdm's ETA
    out, piped = run_eval(data, terminal=False)
    assert "perplexity" in out and "eval:" not in piped
    _, quiet = run_eval(data, "--json", terminal=True)
    assert "eval:" not in quiet
