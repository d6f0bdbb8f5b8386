"""Server load benchmark: N concurrent streaming clients against `mindset serve`.

Starts a `mindset serve` process on 127.0.0.1 (nothing else is ever contacted), then for each
concurrency level (1, 4, 16 by default) runs that many clients, each streaming chat
completions one after another through the real `openai` client, for a bounded time. Meanwhile
a probe on its own thread asks `/health` every 50 ms: a server whose event loop is blocked
(tokenising a huge prompt, generating on the loop) shows up as slow health answers.

    .venv/bin/python bench/server_load.py                          # default model, minutes
    .venv/bin/python bench/server_load.py --model tiny-llama --seconds 5   # smoke run

Reports per level: completed requests, errors, p50/p95 time to first token, and /health
p50/p95/max. Writes bench/results/server_load.json with top-level ``errors`` (all levels),
``completed`` (all levels) and ``health_p95_ms_under_load`` (at the highest level; target
under 100 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.llm.server import free_port  # noqa: E402

PROMPT = "Tell me about the sea, the wind and the ships that cross them."
HEALTH_EVERY_S = 0.05
SERVER_STARTUP_S = 300
HOST = "127.0.0.1"  # the benchmark only ever talks to this machine


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model spec (default: default)")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="how long each level runs (requests in flight then finish)")
    parser.add_argument("--tokens", type=int, default=32, help="max tokens per reply")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "server_load.json"))
    args = parser.parse_args(argv)
    try:
        args.levels = [int(n) for n in args.clients.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--clients must be integers separated by commas, not {args.clients!r}")
    if not args.levels or min(args.levels) < 1 or max(args.levels) > 256:
        parser.error("--clients levels must be between 1 and 256")
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be between 0 and 3600")
    return args


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


class HealthProbe:
    """Times GET /health from its own thread, so the clients' event loop cannot slow it."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.samples_ms: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(f"{self.base}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.samples_ms.append((time.perf_counter() - started) * 1000)
                else:
                    self.failures += 1
                self._stop.wait(HEALTH_EVERY_S)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


async def one_client(client: Any, deadline: float, tokens: int,
                     ttfts: list[float], errors: list[str]) -> int:
    completed = 0
    while time.monotonic() < deadline:
        started = time.perf_counter()
        first: float | None = None
        try:
            stream = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": PROMPT}],
                max_tokens=tokens, temperature=0, stream=True)
            async for event in stream:
                if first is None and event.choices and event.choices[0].delta.content:
                    first = time.perf_counter() - started
            completed += 1
            ttfts.append((first if first is not None else time.perf_counter() - started) * 1000)
        except Exception as error:  # counted, not fatal: the benchmark measures them
            errors.append(f"{type(error).__name__}: {error}")
    return completed


async def run_level(base: str, clients: int, seconds: float, tokens: int) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                                timeout=600)
    ttfts: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    with HealthProbe(base) as probe:
        deadline = time.monotonic() + seconds
        done = await asyncio.gather(*(one_client(client, deadline, tokens, ttfts, errors)
                                      for _ in range(clients)))
    wall = time.perf_counter() - started
    await client.close()
    health = probe.samples_ms
    return {
        "clients": clients,
        "completed": sum(done),
        "errors": len(errors) + probe.failures,
        "error_samples": errors[:5],
        "wall_s": round(wall, 2),
        "requests_per_s": round(sum(done) / wall, 3),
        "ttft_ms_p50": percentile(ttfts, 50),
        "ttft_ms_p95": percentile(ttfts, 95),
        "health_samples": len(health),
        "health_ms_p50": percentile(health, 50),
        "health_ms_p95": percentile(health, 95),
        "health_ms_max": max(health) if health else None,
        "health_failures": probe.failures,
    }


def start_server(model: str, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "mindset.cli", "serve", "--model", model, "--name", "bench",
         "--host", HOST, "--port", str(port), "--no-log"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(base: str, process: subprocess.Popen[str]) -> None:
    import httpx

    deadline = time.monotonic() + SERVER_STARTUP_S
    while True:
        if process.poll() is not None:
            detail = process.stderr.read() if process.stderr else ""
            raise SystemExit(f"the server exited: {detail.strip()[-2000:]}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start in time")
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    port = free_port(HOST)
    base = f"http://{HOST}:{port}"
    process = start_server(args.model, port)
    levels = []
    try:
        wait_ready(base, process)
        for clients in args.levels:
            level = asyncio.run(run_level(base, clients, args.seconds, args.tokens))
            levels.append(level)
            print(f"{clients:>3} clients: {level['completed']} completed, {level['errors']} "
                  f"errors, TTFT p50 {level['ttft_ms_p50'] or 0:.0f} ms p95 "
                  f"{level['ttft_ms_p95'] or 0:.0f} ms, /health p95 "
                  f"{level['health_ms_p95'] or 0:.1f} ms max {level['health_ms_max'] or 0:.1f} ms",
                  flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    top = levels[-1] if levels else {}
    result = {
        "errors": sum(level["errors"] for level in levels),
        "completed": sum(level["completed"] for level in levels),
        "health_p95_ms_under_load": top.get("health_ms_p95"),
        "health_under_100ms": (top.get("health_ms_p95") or 1e9) < 100,
        "model": args.model,
        "seconds_per_level": args.seconds,
        "max_tokens": args.tokens,
        "levels": levels,
        "targets": {"errors": 0, "health_p95_ms_under_load": "< 100"},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{args.model}: {result['completed']} completed, {result['errors']} errors, "
          f"/health p95 with {top.get('clients')} clients "
          f"{result['health_p95_ms_under_load'] or 0:.1f} ms (target < 100) -> {output}")
    return result


if __name__ == "__main__":
    main()
