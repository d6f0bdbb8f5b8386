"""``mindset logs``: list, search, show and export the interaction log."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mindset.commands.common import positive_int


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "logs",
        help="list, search and export logged LLM interactions",
        description="Every LLM call is logged. With no action, lists the most recent ones.",
    )
    parser.add_argument("--db", default=None, help="log file (default: the data directory's)")
    add_list_options(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION",
                                    parser_class=type(parser))
    listing = actions.add_parser("list", help="recent interactions, or those matching --search")
    add_list_options(listing)
    show = actions.add_parser("show", help="one interaction in full")
    show.add_argument("id", help="interaction id (or a unique prefix)")
    export = actions.add_parser("export", help="a conversation as Markdown or JSON")
    export.add_argument("conversation", help="conversation id (or a unique prefix)")
    export.add_argument("--format", choices=("md", "json"), default="md")
    export.add_argument("--output", "-o", default=None, help="write to this file")
    parser.set_defaults(handler=run)


def add_list_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search", "-s", default=None, help="words the call must contain")
    parser.add_argument("--limit", "-n", type=positive_int, default=20,
                        help="how many (default 20)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def run(args: argparse.Namespace) -> int:
    from engine.errors import InputError
    from engine.llm.log import InteractionLog, default_log_path

    # Reading must not create anything: a mistyped --db would otherwise leave an empty
    # database (and its directories) behind and list nothing, as if the log were empty.
    path = Path(args.db).expanduser() if args.db else default_log_path()
    if path.is_dir():
        raise InputError(f"{path} is a directory; --db takes the log file")
    if not path.exists():
        if args.db:
            raise InputError(f"no interaction log at {path}; check the --db path (leave it "
                             "out for the data directory's log)")
        if args.action in (None, "list"):
            if not args.json:  # --json: no lines at all, as for an empty log
                print(f"no interactions yet (no log at {path})")
            return 0
        raise InputError(f"no interactions yet (no log at {path})")
    log = InteractionLog(path)
    if args.action == "show":
        print(json.dumps(log.get(args.id).as_dict(), indent=2, ensure_ascii=False))
        return 0
    if args.action == "export":
        return export(log, args)
    items = log.search(args.search, args.limit) if args.search else log.recent(args.limit)
    if args.json:
        for item in items:
            print(json.dumps(item.as_dict(), ensure_ascii=False))
        return 0
    if not items:
        print("no interactions" + (f" matching {args.search!r}" if args.search else ""))
        return 0
    for item in items:
        text = (item.error and f"error: {item.error}") or item.response
        snippet = " ".join(text.split())[:60]
        latency = f"{item.latency_s:.2f}s" if item.latency_s is not None else "-"
        print(f"{item.id[:8]}  conv {item.conversation_id[:8]}  "
              f"{item.created_at[:19].replace('T', ' ')}  {item.adapter}:{item.model}  "
              f"{item.kind}  {item.prompt_tokens}+{item.completion_tokens} tok  {latency}  "
              f"{item.finish_reason or '-'}  {snippet}")
    return 0


def export(log: Any, args: argparse.Namespace) -> int:
    from engine.errors import InputError
    from engine.llm.log import conversation_as_json, conversation_as_markdown

    items = log.conversation(args.conversation)
    text = conversation_as_json(items) if args.format == "json" else conversation_as_markdown(items)
    if args.output:
        path = Path(args.output).expanduser()
        if path.is_dir():
            raise InputError(f"{path} is a directory; give a file name")
        try:
            path.write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror}") from None
        print(f"wrote {len(items)} interactions to {path}")
    else:
        print(text)
    return 0
