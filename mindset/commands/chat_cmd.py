"""``mindset chat``: the agent (or the plain model) in the terminal.

Lines typed are messages; lines starting with ``/`` are commands (``/help`` lists them).
The reply streams to stdout. Retrieved memories, tool calls, cascade deferrals and notices
go to stderr, so a piped stdout holds only the conversation. The conversation is the
agent's dialog tree: ``--conversation ID`` continues one, across restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, TextIO

from engine.llm.registry import specs_help
from mindset.commands.common import positive_int, whole_number


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "chat",
        help="chat with the agent (long-term memory, reflection, feelings, tools) or a model",
        description="A terminal chat. /help lists the slash commands. Model specs: "
        f"{specs_help()}.",
    )
    parser.add_argument("--model", default=None,
                        help="the model that answers (default: the config's [llm] choice, "
                        "else default)")
    parser.add_argument("--large", default=None, metavar="SPEC",
                        help="a larger model the --model one defers to when unsure (a "
                        "cascade, judged by token entropy)")
    parser.add_argument("--defer-above", type=float, default=2.0, metavar="NATS",
                        help="the cascade defers when the small model's mean token entropy "
                        "is above this (default 2.0)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--agent", dest="plain", action="store_false",
                      help="the agent: memory, reflection, feelings, tools (the default)")
    mode.add_argument("--plain", dest="plain", action="store_true",
                      help="the model and the conversation only")
    parser.add_argument("--conversation", default=None, metavar="ID",
                        help="continue a stored conversation (/branch conversations lists them)")
    parser.add_argument("--max-tokens", type=positive_int, default=200)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=whole_number, default=None)
    parser.add_argument("--embedder", choices=("minilm", "hidden"), default="minilm",
                        help="memory embeddings: all-MiniLM-L6-v2 (default), or the local "
                        "model's own hidden states (kept in their own table)")
    parser.add_argument("--weights", type=retrieval_weights, default=None, metavar="R,I,V",
                        help="retrieval weights of recency, importance and relevance "
                        "(default 0.5,2,3; 0.5,0,3 for a model whose ratings are noise, "
                        "such as the default one)")
    parser.add_argument("--no-tools", action="store_true",
                        help="leave the tools out of the prompt (small models, short contexts)")
    parser.add_argument("--inner", action="store_true",
                        help="think privately before each reply (shown on stderr)")
    parser.set_defaults(handler=run, plain=False)


def retrieval_weights(text: str) -> tuple[float, float, float]:
    import math

    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) \
            or not any(values):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not three numbers >= 0 (recency,importance,relevance), not all 0")
    return values[0], values[1], values[2]


def run(args: argparse.Namespace) -> int:
    from engine.agent.agent import AgentSettings
    from engine.llm.types import SamplingParams

    SamplingParams(temperature=args.temperature).validate()  # before a model loads
    settings = AgentSettings(max_tokens=args.max_tokens, temperature=args.temperature,
                             seed=args.seed, inner_dialogue=args.inner,
                             tools=not args.no_tools)
    if args.weights is not None:
        from engine.agent.long_term import RetrievalWeights

        settings.weights = RetrievalWeights(*args.weights)
    return asyncio.run(_chat(args, settings))


async def _chat(args: argparse.Namespace, settings: Any) -> int:
    from engine.agent.commands import run_command
    from engine.agent.session import build_session
    from engine.errors import MindsetError

    session = await asyncio.to_thread(build_session, args.model, large=args.large,
                                      plain=args.plain, settings=settings,
                                      entropy_threshold=args.defer_above,
                                      embedder_kind=args.embedder)
    try:
        conversation = args.conversation
        known = {c.id for c in session.dialog.conversations()}
        if conversation is not None and conversation not in known:
            raise MindsetError(f"no conversation {conversation!r}; run /branch conversations "
                               "in a chat to list them")
        conversation = conversation or session.dialog.new_conversation("terminal chat")
        note(f"conversation {conversation}: " + " → ".join(session.cascade.models)
             + (" (plain)" if args.plain else "") + "; /help for commands, /quit to leave")

        async def switch(spec: str, large: str | None) -> str:
            from engine.llm import InteractionLog, build_adapter

            log = InteractionLog()
            small = await asyncio.to_thread(build_adapter, spec, log=log)
            big = await asyncio.to_thread(build_adapter, large, log=log) if large else None
            old = session.cascade.adapters
            session.replace_models(small, big)
            for adapter in old:
                await adapter.aclose()
            return "models: " + " → ".join(session.cascade.models)

        while True:
            line = await asyncio.to_thread(_read_line)
            if line is None:
                break
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    outcome = await run_command(session, conversation, line,
                                                switch_models=switch)
                    if outcome.quit:
                        break
                    conversation = outcome.conversation_id
                    if outcome.text:
                        print(outcome.text, flush=True)
                    if outcome.turn is not None:
                        await render(outcome.turn, sys.stdout, sys.stderr)
                    continue
                await render(session.agent.respond(conversation, line), sys.stdout, sys.stderr)
            except MindsetError as exc:  # one line, and the chat goes on
                note(f"error: {exc}")
    finally:
        await session.aclose()
    return 0


def _read_line() -> str | None:
    if sys.stdin.isatty():
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def note(text: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    out.write(f"· {text}\n")
    out.flush()


async def render(events: Any, out: TextIO, side: TextIO) -> None:
    """Print a turn: the reply on ``out``, everything around it on ``side``."""
    from engine.agent import events as kinds

    speaking = False
    async for event in events:
        if isinstance(event, kinds.Token):
            if not speaking:
                out.write("assistant> ")
                speaking = True
            out.write(event.text)
            out.flush()
        elif isinstance(event, kinds.Replied):
            if not speaking:
                out.write("assistant> ")
            out.write("\n")
            out.flush()
            speaking = False
            if event.affect is not None:
                note(f"feeling: {event.affect.describe()}", side)
        elif isinstance(event, kinds.Retrieved) and event.memories:
            for scored in event.memories:
                note(f"remembered #{scored.memory.id} (recency {scored.recency:.2f}, "
                     f"importance {scored.importance:.2f}, relevance {scored.relevance:.2f}): "
                     f"{scored.memory.text[:80]}", side)
        elif isinstance(event, kinds.Thought):
            note(f"thinks: {event.node.content}", side)
        elif isinstance(event, kinds.ToolUsed):
            note(f"tool {event.name}({event.argument[:60]}) -> {event.result.text[:200]}", side)
        elif isinstance(event, kinds.StepDone) and event.deferred:
            note(f"{event.step}: deferred to {event.model} (small model's {event.measure} "
                 f"{event.uncertainty:.2f})", side)
        elif isinstance(event, kinds.Notice):
            note(f"note: {event.text}", side)
        elif isinstance(event, kinds.Summarised):
            note(f"summarised {event.turns} old turns", side)
        elif isinstance(event, kinds.Reflected):
            for question in event.questions:
                note(f"reflected on: {question}", side)
            for memory in event.memories:
                note(f"reflection #{memory.id} (evidence {list(memory.evidence)}): "
                     f"{memory.text[:100]}", side)
