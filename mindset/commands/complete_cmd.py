"""``mindset complete``: one completion or chat reply, streamed to the terminal.

The reply goes to stdout; the process's peak memory over loading and generation (resident,
and anonymous: the part not backed by a file) follows it on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from engine.llm.registry import specs_help
from mindset.commands.common import positive_int, whole_number


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "complete",
        help="complete a prompt (or answer it as a chat) with any model",
        description=f"Streams the reply. Model specs: {specs_help()}.",
    )
    parser.add_argument("prompt", help="the text to complete")
    parser.add_argument("--model", type=model_spec, default=None,
                        help="model spec (default: the config's [llm] choice, else default)")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message with the chat template")
    parser.add_argument("--max-tokens", type=positive_int, default=128)
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 for greedy, else 1e-05 to 2 (default: the model's own, from "
                        "its generation config, else 0.2 with top-p 0.9 for a local model)")
    parser.add_argument("--top-p", type=float, default=None, help="default: the model's")
    parser.add_argument("--top-k", type=whole_number, default=None,
                        help="default: the model's")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="0.01 to 10; 1 means none (default: the model's)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=whole_number, default=None)
    parser.set_defaults(handler=run)


def model_spec(text: str) -> str:
    """A ``--model`` value: an empty one would silently mean the default model."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a model spec such as tiny-llama")
    return text


def run(args: argparse.Namespace) -> int:
    from engine.llm.config import build_adapter
    from engine.llm.defaults import filled
    from engine.llm.types import SamplingParams
    from engine.process_memory import PeakMemory

    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
             "repetition_penalty": args.repetition_penalty}

    def sampling(defaults: dict[str, float | int]) -> SamplingParams:
        return SamplingParams(max_tokens=args.max_tokens, stop=args.stop, seed=args.seed,
                              **filled(defaults, **given)).validate()

    sampling({})  # what was given is checked before a model loads (seconds)

    async def stream(adapter: Any) -> None:
        # Left out: the model's own defaults (a remote API applies its own).
        params = sampling(getattr(adapter, "sampling_defaults", {}))
        try:
            chunks = (adapter.stream_chat([{"role": "user", "content": args.prompt}], params)
                      if args.chat else adapter.stream_complete(args.prompt, params))
            async for chunk in chunks:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        finally:
            await adapter.aclose()

    with PeakMemory() as memory:  # over the model's loading and the generation
        asyncio.run(stream(build_adapter(args.model)))
    sys.stderr.write(f"{memory.summary()}\n")
    return 0
