"""``mindset serve``: a local model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from engine.llm.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from engine.llm.secrets import MIN_KEY_LENGTH
from mindset.commands.common import host_name, port_number, positive_float, positive_int
from mindset.commands.complete_cmd import model_spec

API_KEY_ENV = "MINDSET_API_KEY"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve a local model through an OpenAI-compatible API",
        description="Serve a model at /v1/models, /v1/chat/completions and /v1/completions "
        "(streaming included). Every call is written to the interaction log.",
    )
    parser.add_argument("--model", type=model_spec, default="default",
                        help="default, tiny-llama, tiny-gpt2, or a model/student directory")
    parser.add_argument("--name", type=model_spec, default=None,
                        help="model id clients use (default: the spec, or the directory name)")
    parser.add_argument("--host", type=host_name, default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help=f"require this bearer token, at least {MIN_KEY_LENGTH} characters, "
                        f"on every route but /health, /docs included (or set {API_KEY_ENV}, "
                        "which keeps it out of the process list)")
    parser.add_argument("--allow-host", type=host_name, action="append", default=[],
                        metavar="NAME",
                        help="with no key, also answer requests whose Host is NAME (repeatable); "
                        "by default only this server's address is, against DNS rebinding")
    parser.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get a 413 (default "
                        f"{DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--body-timeout", type=positive_float, default=DEFAULT_BODY_TIMEOUT_S,
                        metavar="SECONDS", help="a body not received in this time gets a 408 "
                        f"(default {DEFAULT_BODY_TIMEOUT_S:g})")
    parser.add_argument("--no-log", action="store_true", help="do not log interactions")
    parser.add_argument("--learn", action="store_true",
                        help="reading mode for every request: the student's associative "
                        "memory reads each prompt (a request may also send learn=true/false)")
    parser.set_defaults(handler=run)


def served_name(spec: str) -> str:
    path = Path(spec).expanduser()
    return path.name if path.is_dir() else spec


def run(args: argparse.Namespace) -> int:
    from engine.llm.local import LocalAdapter
    from engine.llm.log import InteractionLog
    from engine.llm.secrets import check_key
    from engine.llm.server import check_port_free, create_app, serve
    from engine.llm.server.guard import is_loopback

    check_port_free(args.host, args.port)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is not None:  # refused before the model loads, not after
        check_key(api_key, "--api-key" if args.api_key else API_KEY_ENV)
    name = args.name or served_name(args.model)
    print(f"loading {args.model} ...", flush=True)
    adapter = LocalAdapter.from_spec(args.model)
    if args.learn:
        adapter.check_learn()  # a model that cannot read fails here, before serving
        adapter.learns = True
    # Opened once the model has loaded: a spec that fails leaves no new log file behind.
    log = None if args.no_log else InteractionLog()
    adapter.log = log
    adapter.model = name
    app = create_app({name: adapter}, api_key=api_key,
                     allowed_hosts=[args.host, *args.allow_host],
                     max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout)
    where = f"http://{args.host}:{args.port}/v1"
    print(f"serving {name!r} at {where} (API key {'required' if api_key else 'not required'}"
          f"{'' if log is None else f'; log: {log.path}'})", flush=True)
    if not is_loopback(args.host) and not api_key:
        print("warning: listening beyond this machine with no --api-key", flush=True)
    serve(app, host=args.host, port=args.port)
    return 0
