"""``mindset complete``: one completion or chat reply, streamed to the terminal."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from mindset.commands.common import positive_int


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "complete",
        help="complete a prompt (or answer it as a chat) with any model",
        description="Streams the reply. The model is a local spec (default, tiny-llama, a "
        "directory) or openai:<model> for an OpenAI-compatible API (see the [llm] config).",
    )
    parser.add_argument("prompt", help="the text to complete")
    parser.add_argument("--model", default=None,
                        help="model spec (default: the config's [llm] choice, else default)")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message with the chat template")
    parser.add_argument("--max-tokens", type=positive_int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.llm.config import build_adapter
    from engine.llm.types import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty, stop=args.stop,
                            seed=args.seed).validate()
    adapter = build_adapter(args.model)

    async def stream() -> None:
        try:
            chunks = (adapter.stream_chat([{"role": "user", "content": args.prompt}], params)
                      if args.chat else adapter.stream_complete(args.prompt, params))
            async for chunk in chunks:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        finally:
            await adapter.aclose()

    asyncio.run(stream())
    return 0
