"""Arithmetic and short Python snippets, evaluated in a locked-down child process.

The chat model's ``python`` tool runs code it wrote itself, so nothing here trusts the code.
There are three layers, each meant to hold on its own:

1. A static check of the syntax tree, in this process, before anything runs: no imports, no
   class definitions, no ``with``/``async``/``yield``/``global``, no name or attribute that
   starts with ``_`` (the way into ``__class__.__bases__`` and ``__builtins__``), none of the
   builtins that reach the interpreter (``eval``, ``open``, ``getattr``, ``type`` ...), and no
   attribute of frames, code objects or generators (``gi_frame.f_globals`` has no underscore).
2. A fresh interpreter (``python -I -S -B``) with an empty environment, in an empty temporary
   directory, that re-checks the tree and runs it with a whitelisted ``__builtins__``: the
   import machinery is simply not there. Before the code runs it limits its own address
   space, CPU time, open files (none can be opened), file size and processes.
3. A wall-clock deadline here that kills the child's whole process group, and a bound on
   how much of its output is read.

A huge computation such as ``10**10**8`` is a single C call that no Python-level check can
interrupt; the deadline (and the CPU limit, should this process die) is what stops it.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import inspect
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InputError

MAX_SOURCE_CHARS = 10_000
MAX_VALUE_CHARS = 8_000
# The child's reply is JSON of at most MAX_VALUE_CHARS characters; ASCII escapes can make
# it up to six times longer. Anything beyond this is not read.
_MAX_REPLY_BYTES = 64 * 1024
# The interpreter's own start-up is not the code's time; a loaded machine can be slow.
_STARTUP_ALLOWANCE_S = 15.0
_READY = b"ready\n"

_NODE_REFUSALS: dict[str, str] = {
    "Import": "imports are not allowed in the sandbox",
    "ImportFrom": "imports are not allowed in the sandbox",
    "ClassDef": "class definitions are not allowed in the sandbox",
    "Global": "global and nonlocal are not allowed in the sandbox",
    "Nonlocal": "global and nonlocal are not allowed in the sandbox",
    "AsyncFunctionDef": "async code is not allowed in the sandbox",
    "AsyncFor": "async code is not allowed in the sandbox",
    "AsyncWith": "async code is not allowed in the sandbox",
    "Await": "async code is not allowed in the sandbox",
    "Yield": "generators (yield) are not allowed in the sandbox",
    "YieldFrom": "generators (yield) are not allowed in the sandbox",
    "With": "with statements are not allowed in the sandbox",
    "TryStar": "except* is not allowed in the sandbox",
}
_FORBIDDEN_NAMES = frozenset({
    "open", "exec", "eval", "compile", "globals", "locals", "vars", "getattr", "setattr",
    "delattr", "hasattr", "dir", "id", "input", "breakpoint", "help", "exit", "quit",
    "memoryview", "type", "object", "super", "classmethod", "staticmethod", "property",
    "sys", "os", "builtins",
})
# Frames, code objects, generators, coroutines and tracebacks lead back to real globals
# without a single underscore; str.format reads attributes from inside a string.
_FORBIDDEN_ATTR_PREFIXES = ("f_", "gi_", "cr_", "ag_", "co_", "tb_")
_FORBIDDEN_ATTRS = frozenset({"mro", "format", "format_map", "func_globals", "func_code"})

_RULES: dict[str, Any] = {
    "nodes": _NODE_REFUSALS,
    "names": sorted(_FORBIDDEN_NAMES),
    "attr_prefixes": list(_FORBIDDEN_ATTR_PREFIXES),
    "attrs": sorted(_FORBIDDEN_ATTRS),
}


@dataclass(frozen=True)
class SandboxResult:
    """``value`` is what the code printed followed by the repr of its last expression;
    ``error`` is one line when ``ok`` is false."""

    ok: bool
    value: str
    error: str | None


def _find_refusal(tree: ast.AST, rules: dict[str, Any]) -> str | None:
    """Why the tree may not run, or None. Self-contained: the child runs this same source."""
    names = set(rules["names"])
    attrs = set(rules["attrs"])
    prefixes = tuple(rules["attr_prefixes"])

    def bad_name(name: str | None) -> str | None:
        if name is None or name == "_":  # a lone underscore is the usual throwaway name
            return None
        if name.startswith("_"):
            return f"names starting with '_' are not allowed ({name})"
        if name in names:
            return f"{name} is not available in the sandbox"
        return None

    def bad_attr(attr: str) -> str | None:
        if attr.startswith("_"):
            return f"attributes starting with '_' are not allowed (.{attr})"
        if attr in attrs or attr.startswith(prefixes):
            if attr in ("format", "format_map"):
                return "str.format is not allowed in the sandbox; use an f-string"
            return f"the attribute .{attr} is not allowed in the sandbox"
        return None

    for node in ast.walk(tree):
        reason = rules["nodes"].get(type(node).__name__)
        if reason is None and isinstance(node, ast.Attribute):
            reason = bad_attr(node.attr)
        elif reason is None and isinstance(node, ast.MatchClass):
            reason = next((r for a in node.kwd_attrs if (r := bad_attr(a))), None)
        elif reason is None:
            found: list[str | None] = []
            if isinstance(node, ast.Name):
                found.append(node.id)
            elif isinstance(node, ast.FunctionDef | ast.ExceptHandler | ast.MatchAs
                            | ast.MatchStar):
                found.append(node.name)
            elif isinstance(node, ast.arg | ast.keyword):
                found.append(node.arg)
            elif isinstance(node, ast.MatchMapping):
                found.append(node.rest)
            reason = next((r for n in found if (r := bad_name(n))), None)
        if reason is not None:
            return reason
    return None


_CHILD_MAIN = r'''
import builtins
import decimal
import fractions
import json
import math
import resource
import statistics
import sys
from types import SimpleNamespace

_out = sys.stdout.buffer


def _emit(ok, value, error):
    _out.write(json.dumps({"ok": ok, "value": value, "error": error}).encode("ascii"))
    _out.flush()


def _clip(text, limit):
    if len(text) <= limit:
        return text
    return text[:limit] + f"... (truncated, {len(text)} characters in all)"


def _limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):  # not every kind exists or may be lowered everywhere
        pass


def _repr(value):
    try:
        return repr(value)
    except ValueError:
        if isinstance(value, int):  # past the interpreter's digit limit for str(int)
            digits = int(value.bit_length() * 0.30103) + 1
            return f"<an integer with about {digits} digits>"
        raise


def _main():
    with open("job.json", encoding="utf-8") as fh:
        job = json.load(fh)
    limit = job["max_value_chars"]
    tree = ast.parse(job["source"], "<sandbox>", "exec")
    reason = _find_refusal(tree, job["rules"])
    if reason is not None:
        _emit(False, "", "refused: " + reason)
        return
    printed = []
    size = [0]

    def print_(*args, sep=" ", end="\n", flush=False):
        text = (" " if sep is None else str(sep)).join(str(a) for a in args)
        text += "\n" if end is None else str(end)
        if size[0] < limit:
            printed.append(text[: limit - size[0] + 1])
        size[0] += len(text)

    print_.__name__ = print_.__qualname__ = "print"  # for its TypeError messages
    safe = {name: getattr(builtins, name) for name in job["builtins"]}
    safe["print"] = print_
    safe["math"] = SimpleNamespace(
        **{n: getattr(math, n) for n in dir(math) if not n.startswith("_")})
    safe["statistics"] = SimpleNamespace(
        **{n: getattr(statistics, n) for n in job["statistics"]})
    safe["Fraction"] = fractions.Fraction
    safe["Decimal"] = decimal.Decimal
    scope = {"__builtins__": safe, "__name__": "sandbox"}
    memory_message = f"ran out of memory ({job['memory_mb']} MB limit)"

    _limit(resource.RLIMIT_AS, job["memory_mb"] * 1024 * 1024)
    _limit(resource.RLIMIT_CPU, job["cpu_s"])
    _limit(resource.RLIMIT_FSIZE, 0)
    _limit(resource.RLIMIT_NOFILE, 3)  # stdin, stdout, stderr: nothing else can be opened
    if hasattr(resource, "RLIMIT_NPROC"):
        _limit(resource.RLIMIT_NPROC, 0)
    _out.write(b"ready\n")
    _out.flush()

    try:
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        body = compile(tree, "<sandbox>", "exec")  # under the limits, like the run itself
        tail = compile(last, "<sandbox>", "eval") if last is not None else None
    except SyntaxError as exc:  # 'return' outside a function and the like
        where = f" (line {exc.lineno})" if exc.lineno else ""
        _emit(False, "", f"SyntaxError: {exc.msg}{where}")
        return
    try:
        exec(body, scope)
        value = eval(tail, scope) if tail is not None else None
        text = "".join(printed)
        total = size[0]  # what was printed, kept or not
        if value is not None:
            shown = _repr(value)
            text += shown
            total += len(shown)
        if total > limit:
            text = text[:limit] + f"... (truncated, {total} characters in all)"
        _emit(True, text, None)
    except MemoryError:
        scope.clear()
        printed.clear()
        _emit(False, "", memory_message)
    except BaseException as exc:
        try:
            message = " ".join(str(exc).split())
        except BaseException:
            message = ""
        name = type(exc).__name__
        _emit(False, "", _clip(f"{name}: {message}" if message else name, 300))


_main()
'''

_BUILTINS = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr",
    "complex", "dict", "divmod", "enumerate", "filter", "float", "format", "frozenset",
    "hash", "hex", "int", "isinstance", "issubclass", "iter", "len", "list", "map", "max",
    "min", "next", "oct", "ord", "pow", "range", "repr", "reversed", "round", "set",
    "slice", "sorted", "str", "sum", "tuple", "zip",
    "ArithmeticError", "AssertionError", "Exception", "IndexError", "KeyError",
    "LookupError", "NameError", "OverflowError", "RecursionError", "RuntimeError",
    "StopIteration", "TypeError", "ValueError", "ZeroDivisionError",
)
_STATISTICS = (
    "fmean", "geometric_mean", "harmonic_mean", "mean", "median", "median_high",
    "median_low", "mode", "multimode", "pstdev", "pvariance", "quantiles", "stdev",
    "variance",
)


@functools.cache
def _child_script() -> str:
    return ("from __future__ import annotations\nimport ast\nfrom typing import Any\n\n"
            + inspect.getsource(_find_refusal) + _CHILD_MAIN)


def check_source(source: str) -> str | None:
    """The one-line reason ``source`` would be refused or cannot be parsed, or None."""
    if not source.strip():
        return "refused: there is no code to run"
    if len(source) > MAX_SOURCE_CHARS:
        return f"refused: the code is longer than {MAX_SOURCE_CHARS} characters"
    try:
        tree = ast.parse(source, "<sandbox>", "exec")
    except SyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""
        return f"SyntaxError: {exc.msg}{where}"
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, deep nesting
        return f"SyntaxError: {' '.join(str(exc).split()) or type(exc).__name__}"
    reason = _find_refusal(tree, _RULES)
    return None if reason is None else f"refused: {reason}"


def _seconds(value: float) -> str:
    return f"{value:g} s"


def evaluate(source: str, *, timeout_s: float = 2.0, memory_mb: int = 256) -> SandboxResult:
    """Run ``source`` (an expression or a short block) in the sandbox and report its value.

    Never raises for anything in ``source``; raises InputError for limits out of range.
    """
    if not 0 < timeout_s <= 60:
        raise InputError(f"sandbox timeout must be between 0 and 60 s, not {timeout_s}")
    if not 32 <= memory_mb <= 16_384:
        raise InputError(f"sandbox memory must be between 32 and 16384 MB, not {memory_mb}")
    refusal = check_source(source)
    if refusal is not None:
        return SandboxResult(False, "", refusal)
    job = {
        "source": source,
        "rules": _RULES,
        "builtins": list(_BUILTINS),
        "statistics": list(_STATISTICS),
        "memory_mb": memory_mb,
        "cpu_s": math.ceil(timeout_s) + 1,
        "max_value_chars": MAX_VALUE_CHARS,
    }
    with tempfile.TemporaryDirectory(prefix="mindset-sandbox-") as workdir:
        Path(workdir, "job.json").write_text(json.dumps(job), encoding="utf-8")
        return _run_child(workdir, timeout_s, memory_mb)


async def evaluate_async(source: str, *, timeout_s: float = 2.0,
                         memory_mb: int = 256) -> SandboxResult:
    """:func:`evaluate` in a worker thread, so the event loop keeps running meanwhile."""
    return await asyncio.to_thread(evaluate, source, timeout_s=timeout_s, memory_mb=memory_mb)


def _run_child(workdir: str, timeout_s: float, memory_mb: int) -> SandboxResult:
    command = [sys.executable, "-I", "-S", "-B", "-c", _child_script()]
    proc = subprocess.Popen(command, cwd=workdir, env={}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own group, to kill it whole
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    reply = bytearray()
    deadline = time.monotonic() + _STARTUP_ALLOWANCE_S
    started = killed = False
    try:
        while True:
            if not started and reply.startswith(_READY):
                started = True
                deadline = time.monotonic() + timeout_s
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(reply) > _MAX_REPLY_BYTES:
                killed = True
                break
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            reply += chunk
    finally:
        if not killed:
            try:  # the reply is complete; give the child a moment to exit by itself
                proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                killed = True
        if killed:
            _kill_group(proc)
        proc.wait()
        proc.stdout.close()
    return _interpret(bytes(reply), proc.returncode, killed=killed, started=started,
                      timeout_s=timeout_s, memory_mb=memory_mb)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def _interpret(reply: bytes, returncode: int, *, killed: bool, started: bool,
               timeout_s: float, memory_mb: int) -> SandboxResult:
    """The child's JSON reply, or what its exit says about why there is none."""
    if killed:
        if len(reply) > _MAX_REPLY_BYTES:
            return SandboxResult(False, "", "the output was too large")
        if not started:
            return SandboxResult(False, "", "the sandbox did not start in time")
        return SandboxResult(False, "", f"timed out after {_seconds(timeout_s)}")
    body = reply.removeprefix(_READY)
    try:
        data = json.loads(body.decode("ascii"))
        return SandboxResult(bool(data["ok"]), str(data["value"]),
                             None if data["error"] is None else str(data["error"]))
    except (ValueError, KeyError, TypeError):
        pass
    if returncode == -signal.SIGXCPU:
        return SandboxResult(False, "", f"timed out after {_seconds(timeout_s)}")
    if returncode == -signal.SIGKILL:  # the kernel's out-of-memory killer
        return SandboxResult(False, "", f"ran out of memory ({memory_mb} MB limit)")
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return SandboxResult(False, "", f"the sandbox process crashed ({name})")
    if started and returncode != 0:  # a MemoryError while the reply itself was built
        return SandboxResult(False, "", f"ran out of memory ({memory_mb} MB limit)")
    return SandboxResult(False, "", f"the sandbox process failed (exit status {returncode})")
