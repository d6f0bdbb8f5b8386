"""The ``mindset`` command line.

With no subcommand it opens the workbench. Heavy imports (torch, transformers, textual) happen
inside the subcommands so that ``--help`` and the first frame stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from engine import __version__
from engine.errors import MindsetError
from mindset.commands import COMMAND_MODULES
from mindset.commands.common import positive_int

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors in one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"mindset: error: {message} (see `mindset --help`)\n")


def cmd_workbench(args: argparse.Namespace) -> int:
    if args.web:
        from mindset.web import serve_web

        serve_web(host=args.host, port=args.port, model_spec=args.model)
        return 0
    from mindset.app import run_app

    run_app(model_spec=args.model)
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="mindset",
        description="Turn a pretrained language model into a discrete-memory transformer. "
        "With no command, opens the workbench.",
    )
    parser.add_argument("--version", action="version", version=f"mindset {__version__}")
    parser.add_argument("--model", default="default", help="model spec for the workbench")
    parser.add_argument("--web", action="store_true", help="serve the workbench in a browser")
    parser.add_argument("--host", default="127.0.0.1", help="address for --web")
    parser.add_argument("--port", type=positive_int, default=8566, help="port for --web")
    parser.set_defaults(handler=cmd_workbench)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND",
                                     parser_class=ArgumentParser)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


def quiet_libraries() -> None:
    """No hub look-ups (nothing here can reach one) and no library progress bars."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except MindsetError as exc:
        print(f"mindset: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mindset: interrupted", file=sys.stderr)
        return 130


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
