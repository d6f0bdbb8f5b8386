"""The tools the chat model may call: memory search, read-only SQL, Python, files, web search.

:class:`ToolBox` lists the configured tools for the prompt (:meth:`ToolBox.specs`,
:meth:`ToolBox.describe`) and runs a call (:meth:`ToolBox.call`). The arguments come from the
model, so nothing in them is trusted and a bad call never raises: it comes back as a
:class:`ToolResult` with ``ok=False`` and one line the model can act on.

Each tool keeps to its own fence: SQL opens the agent's database read-only behind an
authorizer and a time budget, Python runs in :mod:`engine.agent.sandbox`, files are read
only inside one folder, and web search reports plainly that it is off or unavailable.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import re
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.agent.sandbox import evaluate_async
from engine.errors import InputError, one_line

MAX_RESULT_CHARS = 4_000
MAX_FILE_BYTES = 200 * 1024
MAX_LISTED_ENTRIES = 200
SQL_MAX_ROWS = 50
SQL_TIME_LIMIT_S = 2.0
_SQL_CELL_CHARS = 200

_SQL_REFUSED = "refused: only SELECT queries may run on the agent's database"
_SQL_LEADING_WORDS = frozenset({"select", "with", "values", "explain", "pragma"})
# PRAGMAs that only describe the schema; every other PRAGMA (and all writes) is denied.
_SQL_READ_PRAGMAS = frozenset({
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
    "foreign_key_list",
})
_SQL_ALLOWED_ACTIONS = frozenset({
    sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
})
_SQL_COMMENTS = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$))*", re.DOTALL)


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model's prompt describes it."""

    name: str
    description: str
    parameters: dict[str, str]


@dataclass(frozen=True)
class ToolResult:
    """What one call gave; ``text`` is what the model sees, at most MAX_RESULT_CHARS long."""

    name: str
    ok: bool
    text: str


@dataclass(frozen=True)
class _Param:
    name: str
    kind: str  # "text" or "number"
    description: str
    required: bool = True


@dataclass(frozen=True)
class _Tool:
    spec: ToolSpec
    params: tuple[_Param, ...]
    run: Callable[[dict[str, object]], Awaitable[ToolResult]]


def _clip(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    if len(text) <= limit:
        return text
    note = f"\n... (truncated, {len(text)} characters in all)"
    return text[: limit - len(note)] + note


# --- SQL ---------------------------------------------------------------------------------


def _leading_word(query: str) -> str:
    comments = _SQL_COMMENTS.match(query)
    rest = query[comments.end():] if comments else query
    match = re.match(r"[A-Za-z]+", rest)
    return match.group(0).lower() if match else ""


def run_readonly_sql(path: Path, query: str, *, max_rows: int = SQL_MAX_ROWS,
                     time_limit_s: float = SQL_TIME_LIMIT_S) -> tuple[list[str], list[tuple]]:
    """Run one read-only query on the SQLite file at ``path``: its column names and at most
    ``max_rows`` rows (ask for one more than you show to learn whether there are more).

    Raises InputError with one line when the query is refused, fails or runs too long.
    """
    query = query.strip()
    if not query:
        raise InputError("there is no SQL query to run: give one SELECT statement")
    if _leading_word(query) not in _SQL_LEADING_WORDS:
        raise InputError(_SQL_REFUSED)
    if not path.is_file():
        raise InputError(f"no database at {path}: check the agent's database path")
    denied: list[str] = []

    def authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None,
                  _trigger: str | None) -> int:
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() == "load_extension":
            denied.append("load_extension")
            return sqlite3.SQLITE_DENY
        if action in _SQL_ALLOWED_ACTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _SQL_READ_PRAGMAS:
            return sqlite3.SQLITE_OK
        denied.append(str(action))
        return sqlite3.SQLITE_DENY

    deadline = time.monotonic() + time_limit_s
    timed_out: list[bool] = []

    def progress() -> int:
        if time.monotonic() > deadline:
            timed_out.append(True)
            return 1  # non-zero interrupts the statement
        return 0

    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                               isolation_level=None)
    except sqlite3.Error as exc:
        raise InputError(f"cannot open the database at {path}: {one_line(exc)}") from exc
    try:
        conn.execute("PRAGMA query_only=ON")
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)  # no gigabyte blobs
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.set_authorizer(authorize)
        conn.set_progress_handler(progress, 1_000)
        cursor = conn.execute(query)
        columns = [str(d[0]) for d in cursor.description or ()]
        rows = [tuple(row) for row in cursor.fetchmany(max_rows)] if columns else []
        return columns, rows
    except sqlite3.ProgrammingError as exc:
        if "one statement" in str(exc):
            raise InputError("refused: only one SQL statement may run at a time") from exc
        raise InputError(f"SQL error: {' '.join(str(exc).split())}") from exc
    except sqlite3.Error as exc:
        if timed_out:
            raise InputError(f"the query ran longer than {time_limit_s:g} s and was stopped: "
                             "narrow it with WHERE or LIMIT") from exc
        if denied:
            raise InputError(_SQL_REFUSED) from exc
        raise InputError(f"SQL error: {' '.join(str(exc).split())}") from exc
    finally:
        conn.close()


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = " ".join(str(value).split()) if isinstance(value, str) else repr(value)
    return text if len(text) <= _SQL_CELL_CHARS else text[: _SQL_CELL_CHARS - 3] + "..."


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """Rows as a plain text table under their column names."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in cells]
    return "\n".join(lines)


# --- files -------------------------------------------------------------------------------


def _read_inside(root: Path, relative: str, first_line: int) -> str:
    if not relative.strip() or "\x00" in relative:
        raise InputError("read_file needs a path inside the files folder")
    try:
        base = root.resolve(strict=True)
    except OSError as exc:
        raise InputError(f"the files folder {root} does not exist") from exc
    target = (base / relative).resolve()  # follows symlinks, so a link out lands outside
    if not target.is_relative_to(base):
        raise InputError("refused: read_file only reads inside the files folder")
    shown = target.relative_to(base).as_posix() or "."
    if not target.exists():
        raise InputError(f"there is no file {shown!r} in the files folder")
    if target.is_dir():
        with os.scandir(target) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        names = [e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in entries]
        more = len(names) - MAX_LISTED_ENTRIES
        listing = "\n".join(names[:MAX_LISTED_ENTRIES]) or "(empty folder)"
        return f"{shown}/ holds:\n{listing}" + (f"\n... and {more} more" if more > 0 else "")
    # O_NOFOLLOW and O_NONBLOCK: no link swapped in since resolve(), no FIFO to hang on.
    fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise InputError(f"refused: {shown!r} is not a regular file")
        data = fh.read(MAX_FILE_BYTES + 1)
    truncated = len(data) > MAX_FILE_BYTES
    data = data[:MAX_FILE_BYTES]
    if b"\x00" in data:
        raise InputError(f"refused: {shown!r} is a binary file, not text")
    try:  # an incremental decoder lets a cut land inside a multi-byte character
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not truncated)
    except UnicodeDecodeError as exc:
        raise InputError(f"refused: {shown!r} is not UTF-8 text") from exc
    return _page(shown, text, first_line, truncated)


def _page(shown: str, text: str, first_line: int, truncated: bool) -> str:
    """As many lines from ``first_line`` on as fit in one result, with where to go next."""
    lines = text.splitlines()
    if not lines:
        return f"{shown} is empty"
    if first_line > len(lines):
        raise InputError(f"{shown!r} has only {len(lines)} lines")
    budget = MAX_RESULT_CHARS - 200
    out: list[str] = []
    last = first_line - 1
    for number in range(first_line, len(lines) + 1):
        line = lines[number - 1]
        if out and sum(len(x) + 1 for x in out) + len(line) > budget:
            break
        out.append(line)
        last = number
    head = f"{shown} (lines {first_line}-{last} of {len(lines)}"
    head += ", first 200 KB only)" if truncated else ")"
    tail = f"\n... call read_file with line={last + 1} for more" if last < len(lines) else ""
    return head + "\n" + "\n".join(out) + tail


# --- the tool box ------------------------------------------------------------------------


class ToolBox:
    """The tools configured for one agent; :meth:`call` runs one, never raising for bad
    model input."""

    def __init__(self, *, memory_search: Callable[[str, int], str] | None = None,
                 sql_database: Path | None = None, files_root: Path | None = None,
                 web_search: bool = False, sandbox_timeout_s: float = 2.0,
                 sandbox_memory_mb: int = 256) -> None:
        self._memory_search = memory_search
        self._sql_database = sql_database
        self._files_root = files_root
        self._web_search = web_search
        self._sandbox_timeout_s = sandbox_timeout_s
        self._sandbox_memory_mb = sandbox_memory_mb
        self._tools = {tool.spec.name: tool for tool in self._build()}

    def _build(self) -> list[_Tool]:
        tools: list[_Tool] = []

        def add(name: str, description: str, params: tuple[_Param, ...],
                run: Callable[[dict[str, object]], Awaitable[ToolResult]]) -> None:
            described = {p.name: p.description if p.required else
                         f"{p.description} (optional)" for p in params}
            tools.append(_Tool(ToolSpec(name, description, described), params, run))

        if self._memory_search is not None:
            add("memory_search", "Search your long-term memory for notes relevant to a query.",
                (_Param("query", "text", "what to look for"),
                 _Param("k", "number", "how many results, 1-20, default 5", required=False)),
                self._run_memory_search)
        if self._sql_database is not None:
            add("sql", "Run one read-only SELECT on your own SQLite database (at most "
                f"{SQL_MAX_ROWS} rows; PRAGMA table_info(name) shows a table's columns).",
                (_Param("query", "text", "one SELECT statement"),), self._run_sql)
        add("python", "Arithmetic or a Python expression, or a short block whose last "
            "expression is the result; math, statistics, Fraction and Decimal are ready, "
            "imports are not allowed.",
            (_Param("code", "text", "the expression or code to evaluate"),), self._run_python)
        if self._files_root is not None:
            add("read_file", "Read a text file (or list a folder) inside the files folder.",
                (_Param("path", "text", "a path relative to the files folder"),
                 _Param("line", "number", "first line to show, default 1", required=False)),
                self._run_read_file)
        state = "" if self._web_search else " It is currently off."
        add("web_search", f"Search the web.{state}",
            (_Param("query", "text", "what to search for"),), self._run_web_search)
        return tools

    def specs(self) -> list[ToolSpec]:
        """The configured tools, in a stable order."""
        return [tool.spec for tool in self._tools.values()]

    def describe(self) -> str:
        """The tools as a compact block for a system prompt."""
        lines = ["Tools you can call:"]
        for tool in self._tools.values():
            signature = ", ".join(p.name if p.required else f"{p.name}?" for p in tool.params)
            lines.append(f"- {tool.spec.name}({signature}): {tool.spec.description}")
            lines += [f"    {name}: {text}" for name, text in tool.spec.parameters.items()]
        return "\n".join(lines)

    async def call(self, name: str, arguments: Mapping[str, object]) -> ToolResult:
        """Run tool ``name``; any problem comes back as ``ok=False`` with one line."""
        tool = self._tools.get(name) if isinstance(name, str) else None
        if tool is None:
            known = ", ".join(self._tools)
            return ToolResult(str(name), False, f"there is no tool named {str(name)[:80]!r}: "
                              f"the tools are {known}")
        try:
            args = _check_arguments(tool, arguments)
            result = await tool.run(args)
        except InputError as exc:
            return ToolResult(name, False, _clip(" ".join(exc.message.split())))
        except Exception as exc:  # a tool's own failure still must not break the chat
            return ToolResult(name, False, _clip(f"{name} failed: {one_line(exc)}"))
        return ToolResult(result.name, result.ok, _clip(result.text))

    async def _run_memory_search(self, args: dict[str, object]) -> ToolResult:
        assert self._memory_search is not None
        k = _number(args, "k", 5)
        if not 1 <= k <= 20:
            raise InputError("memory_search: k must be between 1 and 20")
        # A worker thread: a search may read the store from disk.
        text = await asyncio.to_thread(self._memory_search, str(args["query"]), k)
        return ToolResult("memory_search", True, text.strip() or "(no memories matched)")

    async def _run_sql(self, args: dict[str, object]) -> ToolResult:
        assert self._sql_database is not None
        columns, rows = await asyncio.to_thread(
            run_readonly_sql, self._sql_database, str(args["query"]),
            max_rows=SQL_MAX_ROWS + 1)
        if not columns:
            return ToolResult("sql", True, "(the statement returned no columns)")
        more = len(rows) > SQL_MAX_ROWS
        rows = rows[:SQL_MAX_ROWS]
        count = f"({len(rows)} row{'s' if len(rows) != 1 else ''}"
        count += "; more rows not shown, add LIMIT or WHERE)" if more else ")"
        return ToolResult("sql", True, format_table(columns, rows) + "\n" + count)

    async def _run_python(self, args: dict[str, object]) -> ToolResult:
        result = await evaluate_async(str(args["code"]), timeout_s=self._sandbox_timeout_s,
                                      memory_mb=self._sandbox_memory_mb)
        if not result.ok:
            return ToolResult("python", False, result.error or "the code failed")
        return ToolResult("python", True, result.value or
                          "(no output: end the code with an expression to see its value)")

    async def _run_read_file(self, args: dict[str, object]) -> ToolResult:
        assert self._files_root is not None
        line = _number(args, "line", 1)
        if line < 1:
            raise InputError("read_file: line must be 1 or more")
        text = await asyncio.to_thread(_read_inside, self._files_root, str(args["path"]), line)
        return ToolResult("read_file", True, text)

    async def _run_web_search(self, args: dict[str, object]) -> ToolResult:
        if not self._web_search:
            return ToolResult("web_search", False,
                              "web search is off: enable it in the agent's settings")
        # No search backend exists in this project and these machines have no network.
        return ToolResult("web_search", False, "web search is unavailable: no network "
                          "connection / no search backend configured")


def _check_arguments(tool: _Tool, arguments: Mapping[str, object]) -> dict[str, object]:
    """The arguments checked against the tool's parameters; InputError names what it takes."""
    expected = ", ".join(f"{p.name} ({p.kind}{'' if p.required else ', optional'})"
                         for p in tool.params)
    usage = f"{tool.spec.name} takes: {expected}"
    if not isinstance(arguments, Mapping):
        raise InputError(f"{tool.spec.name}: the arguments must be an object; {usage}")
    known = {p.name: p for p in tool.params}
    unknown = [str(key) for key in arguments if key not in known]
    if unknown:
        raise InputError(f"{tool.spec.name} got an unexpected argument {unknown[0]!r}; {usage}")
    checked: dict[str, object] = {}
    for param in tool.params:
        if param.name not in arguments or arguments[param.name] is None:
            if param.required:
                raise InputError(f"{tool.spec.name} is missing the argument "
                                 f"{param.name!r}; {usage}")
            continue
        value = arguments[param.name]
        converted = _convert(value, param.kind)
        if converted is None:
            raise InputError(f"{tool.spec.name}: {param.name!r} must be {param.kind}, not "
                             f"{type(value).__name__}; {usage}")
        checked[param.name] = converted
    return checked


def _number(args: Mapping[str, object], name: str, default: int) -> int:
    value = args.get(name, default)
    return value if isinstance(value, int) else default


def _convert(value: object, kind: str) -> object | None:
    """``value`` as ``kind``, or None when it is not one; booleans are neither."""
    if isinstance(value, bool):
        return None
    if kind == "text":
        return str(value) if isinstance(value, str | int | float) else None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,9}\s*", value):
        return int(value)
    return None
