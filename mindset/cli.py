"""The ``mindset`` command line.

With no subcommand it opens the workbench. Heavy imports (torch, transformers, textual) happen
inside the subcommands so that ``--help`` and the first frame stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from engine import __version__
from engine.errors import MindsetError
from mindset.commands import COMMAND_MODULES
from mindset.commands.common import host_name, non_utf8_argument, port_number

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors in one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"mindset: error: {message} (see `mindset --help`)\n")


def check_listen(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, so a bad address fails here in one line rather
    than after the browser server has started."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise MindsetError(f"cannot listen on {host}:{port} ({reason}); give --host "
                           "127.0.0.1 or an address of this machine") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise MindsetError(f"cannot listen on {host}:{port} ({exc.strerror}); pick "
                               "another --port or --host") from None


def cmd_workbench(args: argparse.Namespace) -> int:
    # Checked from the files alone (no torch): the first frame stays fast, and a spec that
    # cannot load fails here in one line instead of inside a workbench.
    from engine.model.model_files import check_model_spec

    check_model_spec(args.model)
    if args.web:
        check_listen(args.host, args.port)
        from mindset.web import serve_web

        serve_web(host=args.host, port=args.port, model_spec=args.model,
                  extra_hosts=args.allow_host)
        return 0
    student = None
    if args.student is not None:
        from engine.errors import InputError
        from engine.model.student import is_student_dir

        path = Path(args.student).expanduser()
        if not is_student_dir(path):
            raise InputError(f"{args.student} is not a student directory; give the folder a "
                             "distillation or `save` wrote (it holds mindset_student.json)")
        student = str(path.resolve())
    from mindset.app import run_app

    run_app(model_spec=args.model, student_spec=student)
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="mindset",
        description="Turn a pretrained language model into a discrete-memory transformer. "
        "With no command, opens the workbench.",
    )
    parser.add_argument("--version", action="version", version=f"mindset {__version__}")
    parser.add_argument("--model", default="default", help="model spec for the workbench")
    parser.add_argument("--student", default=None, metavar="DIR",
                        help="open the workbench on this student (default: the newest "
                        "finished job's)")
    parser.add_argument("--web", action="store_true", help="serve the workbench in a browser")
    parser.add_argument("--host", type=host_name, default="127.0.0.1", help="address for --web")
    parser.add_argument("--port", type=port_number, default=8566, help="port for --web")
    parser.add_argument("--allow-host", action="append", default=[], type=host_name,
                        metavar="NAME", help="another name browsers use to reach --web "
                        "(repeatable; e.g. this machine's address when --host is 0.0.0.0)")
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
    problem = non_utf8_argument(args)
    if problem is not None:
        parser.error(problem)
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
