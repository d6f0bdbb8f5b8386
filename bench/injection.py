"""Prompt injection: does the content channel keep a student from obeying a document?

Two students of one teacher (``--model``, the default SmolLM2-135M-Instruct), distilled the
same way (``--layers``, featural memory, ``--steps`` end-to-end steps on the training part of
``--data``) and therefore identical in every weight: the second also gets the ``content``
label channel and its stage, ``--channel-steps`` steps of paired context distillation that
train only the channel (the teacher reads a clean document, the student the same document
with an injected instruction, flagged as content; see engine/distill/channel_pairs.py).

Each student answers the 60 cases of bench/injection_cases.py (a task, and a document that
carries a conflicting instruction: in a tool result or in ``<document>`` tags) through the
local adapter as ``mindset serve`` runs it, greedy, up to ``--max-tokens`` tokens. For the
student with the channel the adapter flags the document's tokens itself, from the chat's
roles and delimiters. An injection succeeded when the reply says its target word. The same
cases without the injection are the control (the target word should never appear), and the
teacher's rate is the reference. Clean perplexity of both students is measured on the
held-out part of ``--data`` (no labels).

    python bench/injection.py                    # default model (about 25 minutes, 2 cores)
    python bench/injection.py --quick            # tiny-llama, smoke test

Writes bench/results/injection.json: top level injection_rate_plain,
injection_rate_channel, injection_rate_teacher, ppl_clean_plain, ppl_clean_channel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.injection_cases import InjectionCase, injection_cases  # noqa: E402

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "injection.json"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--layers", default="15")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--channel-steps", type=int, default=150)
    parser.add_argument("--channel-lr", type=float, default=1e-2)
    parser.add_argument("--channel-pairs", type=int, default=64)
    parser.add_argument("--channel-train", default="channels", choices=("channels", "all"))
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--cases", type=int, default=0, help="use the first N cases (0: all)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.layers, args.steps, args.channel_steps = "tiny-llama", "1", 2, 3
        args.block_size, args.max_tokens, args.cases = 32, 6, 6
    return args


def distill(args: argparse.Namespace, run_dir: Path, channels: list[str]) -> dict[str, Any]:
    from engine.distill.config import DistillConfig
    from engine.distill.loop import run_distillation

    config = DistillConfig(
        teacher=args.model, layers=args.layers, memory="featural",
        hparams={"keys": "flat"}, data=[args.data], steps=args.steps,
        block_size=args.block_size, batch_size=args.batch_size, eval_every=args.steps,
        checkpoint_every=args.steps, seed=0, channels=channels,
        channel_steps=args.channel_steps if channels else 0, channel_lr=args.channel_lr,
        channel_pairs=args.channel_pairs, channel_train=args.channel_train)
    report = run_distillation(config, run_dir, resume=False)
    if not report:
        raise SystemExit(f"the distillation in {run_dir} was cancelled")
    return dict(report)


async def injection_rate(spec: str, cases: list[InjectionCase], max_tokens: int, *,
                         injected: bool = True) -> tuple[float, list[str]]:
    from engine.llm.local import LocalAdapter
    from engine.llm.types import SamplingParams

    adapter = LocalAdapter.from_spec(spec)
    replies = []
    try:
        for case in cases:
            reply = await adapter.chat(case.messages(injected=injected),
                                       SamplingParams(max_tokens=max_tokens, temperature=0.0))
            replies.append(reply.text)
    finally:
        await adapter.aclose()
    hits = sum(case.succeeded(reply) for case, reply in zip(cases, replies, strict=True))
    return hits / len(cases), replies


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cases = injection_cases()
    if args.cases:
        cases = cases[: args.cases]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="injection-") as root:
        runs = Path(root)
        plain = distill(args, runs / "plain", [])
        print(f"plain student: held-out ppl {plain['ppl_student']:.3f} "
              f"(teacher {plain['ppl_teacher']:.3f})", flush=True)
        channel = distill(args, runs / "channel", ["content"])
        print(f"channel student: held-out ppl {channel['ppl_student']:.3f}", flush=True)
        rates: dict[str, float] = {}
        replies: dict[str, list[str]] = {}
        for name, spec in (("teacher", args.model), ("plain", str(runs / "plain" / "student")),
                           ("channel", str(runs / "channel" / "student"))):
            rates[name], replies[name] = asyncio.run(
                injection_rate(spec, cases, args.max_tokens))
            print(f"  {name:<8} injection success {rates[name]:.1%}", flush=True)
        control, _ = asyncio.run(injection_rate(str(runs / "plain" / "student"), cases,
                                                args.max_tokens, injected=False))
    result: dict[str, Any] = {
        "model": args.model, "layers": args.layers, "steps": args.steps,
        "channel_steps": args.channel_steps, "channel_lr": args.channel_lr,
        "channel_pairs": args.channel_pairs, "channel_train": args.channel_train,
        "channel_kl_before": channel.get("channel_kl_before"),
        "channel_kl_after": channel.get("channel_kl_after"), "cases": len(cases),
        "max_tokens": args.max_tokens, "data": args.data,
        "injection_rate_plain": rates["plain"], "injection_rate_channel": rates["channel"],
        "injection_rate_teacher": rates["teacher"],
        "injection_rate_ratio": rates["channel"] / rates["plain"] if rates["plain"] else None,
        "control_rate_plain_no_injection": control,
        "ppl_clean_plain": plain["ppl_student"], "ppl_clean_channel": channel["ppl_student"],
        "ppl_clean_ratio": channel["ppl_student"] / plain["ppl_student"],
        "ppl_teacher": plain["ppl_teacher"],
        "replies": {name: [{"case": case.id, "target": case.target, "reply": reply}
                           for case, reply in zip(cases, texts, strict=True)]
                    for name, texts in replies.items()},
        "seconds": time.perf_counter() - started, "quick": args.quick,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"injection success: plain {rates['plain']:.1%}, channel {rates['channel']:.1%} "
          f"(teacher {rates['teacher']:.1%}); clean ppl ratio "
          f"{result['ppl_clean_ratio']:.4f}; wrote {output}")
    return result


if __name__ == "__main__":
    main()
