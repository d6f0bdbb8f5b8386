"""Server benchmark: generation through `mindset serve` against the same model in-process.

Same model, prompt and settings (greedy, fixed max tokens) both ways, measured in alternating
rounds so background load hits both alike; medians are compared. Through the server means a
separate `mindset serve` process driven by the real `openai` client over HTTP with streaming.
Then 4 streams at once through the server: all must finish with no error.

    .venv/bin/python bench/server.py                       # default model, minutes
    .venv/bin/python bench/server.py --model tiny-llama --quick   # smoke run, seconds

Writes bench/results/server.json with top-level tok_per_s_ratio (server / in-process, higher
is better, target >= 0.9), ttft_ratio (server / in-process, lower is better, target <= 1.2)
and concurrent_streams_ok.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.llm.local import LocalAdapter  # noqa: E402
from engine.llm.server import free_port  # noqa: E402
from engine.llm.types import SamplingParams  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
SERVER_STARTUP_S = 300


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model spec (default: default)")
    parser.add_argument("--quick", action="store_true", help="few tokens, one round")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per reply")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds")
    parser.add_argument("--server", choices=("process", "thread"), default="process",
                        help="run the server as a `mindset serve` process (default) or on a "
                        "thread of this process (a faster smoke test, sharing its GIL)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on both sides (default 1: steady on shared cores)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "server.json"))
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (16 if args.quick else 128)
    args.rounds = args.rounds or (1 if args.quick else 5)
    return args


async def timed(chunks: AsyncIterator[tuple[str, int | None]]) -> dict[str, float]:
    """TTFT (to the first text) and tokens/s (completion tokens over the whole call)."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async for text, usage_tokens in chunks:
        if text and first is None:
            first = time.perf_counter() - started
        if usage_tokens is not None:
            tokens = usage_tokens
    total = time.perf_counter() - started
    return {"ttft_s": first or total, "tok_per_s": tokens / total, "tokens": tokens,
            "total_s": total}


async def in_process(adapter: LocalAdapter, params: SamplingParams) -> dict[str, float]:
    async def chunks() -> AsyncIterator[tuple[str, int | None]]:
        async for chunk in adapter.stream_chat([{"role": "user", "content": PROMPT}], params):
            yield chunk.text, chunk.usage.completion_tokens if chunk.usage else None
    return await timed(chunks())


async def through_server(client: Any, model: str, params: SamplingParams) -> dict[str, float]:
    async def chunks() -> AsyncIterator[tuple[str, int | None]]:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}],
            max_tokens=params.max_tokens, temperature=params.temperature, stream=True,
            stream_options={"include_usage": True})
        async for event in stream:
            text = event.choices[0].delta.content or "" if event.choices else ""
            yield text, event.usage.completion_tokens if event.usage else None
    return await timed(chunks())


class ThreadServer:
    """The same API on a thread of this process, with the Popen methods bench() uses."""

    stderr = None

    def __init__(self, model: str, port: int) -> None:
        from engine.llm.server import BackgroundServer, create_app

        adapter = LocalAdapter.from_spec(model)
        adapter.model = "bench"
        self.server = BackgroundServer(create_app({"bench": adapter}), port=port).start()

    def poll(self) -> int | None:
        return None

    def terminate(self) -> None:
        self.server.stop()

    def wait(self, timeout: float) -> int:
        return 0


def start_server(model: str, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(
        [sys.executable, "-m", "mindset.cli", "serve", "--model", model, "--name", "bench",
         "--port", str(port), "--no-log"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_ready(client: Any, process: Any) -> None:
    deadline = time.monotonic() + SERVER_STARTUP_S
    while True:
        if process.poll() is not None:
            detail = process.stderr.read() if process.stderr else ""
            raise SystemExit(f"the server exited: {detail}")
        try:
            await client.models.list()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in time") from None
            await asyncio.sleep(0.5)


def median(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import openai

    params = SamplingParams(max_tokens=args.tokens, temperature=0)
    port = free_port()
    process: Any = (ThreadServer(args.model, port) if args.server == "thread"
                    else start_server(args.model, port))  # a process loads while we do
    try:
        adapter = LocalAdapter.from_spec(args.model)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                    max_retries=0, timeout=600)
        await wait_ready(client, process)
        warm = SamplingParams(max_tokens=4, temperature=0)
        await in_process(adapter, warm)
        await through_server(client, "bench", warm)
        local_runs, server_runs = [], []
        for round_index in range(args.rounds):
            # Alternate which goes first, so drifting load does not favour one side.
            if round_index % 2 == 0:
                local_runs.append(await in_process(adapter, params))
                server_runs.append(await through_server(client, "bench", params))
            else:
                server_runs.append(await through_server(client, "bench", params))
                local_runs.append(await in_process(adapter, params))
            print(f"round {round_index + 1}: in-process {local_runs[-1]['tok_per_s']:.1f} tok/s "
                  f"ttft {local_runs[-1]['ttft_s'] * 1000:.0f} ms | server "
                  f"{server_runs[-1]['tok_per_s']:.1f} tok/s "
                  f"ttft {server_runs[-1]['ttft_s'] * 1000:.0f} ms", flush=True)
        concurrent = await concurrent_streams(client, params)
        await client.close()
        await adapter.aclose()
    finally:
        process.terminate()
        process.wait(timeout=30)
    local = {key: median(local_runs, key) for key in ("ttft_s", "tok_per_s", "tokens")}
    server = {key: median(server_runs, key) for key in ("ttft_s", "tok_per_s", "tokens")}
    return {
        "tok_per_s_ratio": server["tok_per_s"] / local["tok_per_s"],
        "ttft_ratio": server["ttft_s"] / local["ttft_s"],
        "concurrent_streams_ok": concurrent["ok"],
        "model": args.model,
        "max_tokens": args.tokens,
        "rounds": args.rounds,
        "in_process": local,
        "server": server,
        "concurrent": concurrent,
        "targets": {"tok_per_s_ratio": ">= 0.9", "ttft_ratio": "<= 1.2"},
        "torch_threads": torch.get_num_threads(),
        "server_mode": args.server,
    }


async def concurrent_streams(client: Any, params: SamplingParams,
                             count: int = 4) -> dict[str, Any]:
    started = time.perf_counter()
    results = await asyncio.gather(*(through_server(client, "bench", params)
                                     for _ in range(count)), return_exceptions=True)
    wall = time.perf_counter() - started
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    good = [r for r in results if isinstance(r, dict)]
    complete = all(r["tokens"] > 0 for r in good)
    return {
        "streams": count,
        "ok": not errors and complete and len(good) == count,
        "errors": errors,
        "tokens": [r["tokens"] for r in good],
        "ttft_s": [round(r["ttft_s"], 4) for r in good],
        "aggregate_tok_per_s": sum(r["tokens"] for r in good) / wall,
        "wall_s": wall,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = asyncio.run(bench(args))
    finally:
        torch.set_num_threads(threads)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{args.model}: server/in-process tokens/s {result['tok_per_s_ratio']:.3f} "
          f"(target >= 0.9), TTFT {result['ttft_ratio']:.3f} (target <= 1.2), "
          f"4 concurrent streams ok: {result['concurrent_streams_ok']} -> {output}")
    return result


if __name__ == "__main__":
    main()
