"""The chat agent's tools: the Python sandbox, read-only SQL, files, web search, the tool box."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from engine.agent import sandbox
from engine.agent.sandbox import MAX_VALUE_CHARS, check_source, evaluate, evaluate_async
from engine.agent.tools import SQL_MAX_ROWS, ToolBox, run_readonly_sql
from engine.errors import InputError

MEMORY_MESSAGE = "ran out of memory (256 MB limit)"


# --- sandbox -----------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "expected"), [
    ("2**10", "1024"),
    ("sum(range(10))", "45"),
    ("math.factorial(5) + math.floor(math.pi)", "123"),
    ("round(math.sqrt(2), 6)", "1.414214"),
    ("statistics.mean([1, 2, 3, 4])", "2.5"),
    ("Fraction(1, 3) + Fraction(1, 6)", "Fraction(1, 2)"),
    ("Decimal('0.1') + Decimal('0.2')", "Decimal('0.3')"),
    ("sorted({3, 1, 2}, reverse=True)", "[3, 2, 1]"),
    ("10**5000", "<an integer with about 5001 digits>"),
])
def test_sandbox_evaluates_arithmetic(code: str, expected: str) -> None:
    assert evaluate(code) == sandbox.SandboxResult(True, expected, None)


def test_sandbox_runs_a_block_and_returns_prints_and_the_last_value() -> None:
    code = (
        "def fib(n):\n"
        "    a, b = 0, 1\n"
        "    for _ in range(n):\n"
        "        a, b = b, a + b\n"
        "    return a\n"
        "squares = [i * i for i in range(5)]\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError as exc:\n"
        "    print('caught', exc)\n"
        "print(f'squares={squares}')\n"
        "fib(30)\n"
    )
    result = evaluate(code)
    assert result.ok, result.error
    assert result.value == "caught division by zero\nsquares=[0, 1, 4, 9, 16]\n832040"


def test_sandbox_reports_an_ordinary_error_on_one_line() -> None:
    assert evaluate("1 / 0") == sandbox.SandboxResult(False, "", "ZeroDivisionError: "
                                                                 "division by zero")
    result = evaluate("x = 1\nprint(x +)")
    assert not result.ok and result.error is not None
    assert result.error.startswith("SyntaxError:") and "\n" not in result.error
    # Parsed here, but only the compiler in the child finds this one.
    assert evaluate("return 1").error == "SyntaxError: 'return' outside function (line 1)"


ESCAPES = [
    ("import os", "refused: imports are not allowed in the sandbox"),
    ("from os import system", "refused: imports are not allowed in the sandbox"),
    ("__import__('os')", "refused: names starting with '_'"),
    ("().__class__.__bases__[0].__subclasses__()", "refused: attributes starting with '_'"),
    ("open('/etc/passwd')", "refused: open is not available"),
    ("getattr(1, '__class__')", "refused: getattr is not available"),
    ("eval('1')", "refused: eval is not available"),
    ("type(1)", "refused: type is not available"),
    ("print.__globals__", "refused: attributes starting with '_'"),
    ("g = (i for i in [1])\ng.gi_frame.f_globals", "refused: the attribute ."),
    ("'{0.__class__}'.format(1)", "refused: str.format is not allowed"),
    ("def f(x):\n    global y\n    y = x", "refused: global and nonlocal"),
    ("class A:\n    pass", "refused: class definitions"),
    ("dict(__builtins__=1)", "refused: names starting with '_'"),
]


@pytest.mark.parametrize(("code", "message"), ESCAPES)
def test_sandbox_refuses_escapes_before_running(code: str, message: str) -> None:
    # The refusal comes from the static check in this process: no child is started.
    refusal = check_source(code)
    assert refusal is not None and refusal.startswith(message)
    assert evaluate(code) == sandbox.SandboxResult(False, "", refusal)


def _run_child(tmp_path: Path, source: str, rules: dict[str, object]) -> dict[str, object]:
    """The child script run by hand, to test its own layers without the parent's check."""
    job = {"source": source, "rules": rules, "builtins": list(sandbox._BUILTINS),
           "statistics": list(sandbox._STATISTICS), "memory_mb": 256, "cpu_s": 5,
           "max_value_chars": MAX_VALUE_CHARS}
    (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
    done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", sandbox._child_script()],
                          cwd=tmp_path, env={}, capture_output=True, timeout=30, check=True)
    return json.loads(done.stdout.removeprefix(b"ready\n"))


def test_the_child_rechecks_the_code(tmp_path: Path) -> None:
    reply = _run_child(tmp_path, "import os", sandbox._RULES)
    assert reply == {"ok": False, "value": "",
                     "error": "refused: imports are not allowed in the sandbox"}


@pytest.mark.parametrize(("code", "error"), [
    ("import os", "ImportError: __import__ not found"),
    ("open('stolen.txt', 'w')", "NameError: name 'open' is not defined"),
    ("globals()", "NameError: name 'globals' is not defined"),
])
def test_the_childs_builtins_hold_without_the_static_check(tmp_path: Path, code: str,
                                                           error: str) -> None:
    no_rules = {"nodes": {}, "names": [], "attr_prefixes": [], "attrs": []}
    assert _run_child(tmp_path, code, no_rules) == {"ok": False, "value": "", "error": error}
    assert not (tmp_path / "stolen.txt").exists()


def test_an_endless_loop_times_out_and_the_parent_carries_on() -> None:
    result = evaluate("while True:\n    pass", timeout_s=0.5)
    assert result == sandbox.SandboxResult(False, "", "timed out after 0.5 s")
    assert evaluate("6 * 7").value == "42"


def test_a_huge_integer_is_stopped() -> None:
    result = evaluate("10**10**8", timeout_s=0.5)
    assert not result.ok
    assert result.error == "timed out after 0.5 s"


@pytest.mark.parametrize("code", [
    "[0] * 10**9",
    "'x' * 10**10",
    "chunks = []\nwhile True:\n    chunks.append('x' * 10**6)",
])
def test_a_memory_bomb_hits_the_memory_limit(code: str) -> None:
    assert evaluate(code, timeout_s=5) == sandbox.SandboxResult(False, "", MEMORY_MESSAGE)


@pytest.mark.parametrize("code", [
    "print('x' * 100_000)",
    "list(range(10**6))",
    "for i in range(20_000):\n    print(i)",
])
def test_output_is_bounded(code: str) -> None:
    result = evaluate(code)
    assert result.ok, result.error
    assert MAX_VALUE_CHARS < len(result.value) <= MAX_VALUE_CHARS + 100
    assert "truncated" in result.value


def test_overlong_code_and_bad_limits_are_refused() -> None:
    assert check_source("1 + " * 5_000 + "1") == "refused: the code is longer than 10000 characters"
    assert check_source("  ") == "refused: there is no code to run"
    with pytest.raises(InputError):
        evaluate("1", timeout_s=0)


async def test_evaluate_async_does_not_block_the_event_loop() -> None:
    task = asyncio.create_task(evaluate_async("while True:\n    pass", timeout_s=0.5))
    await asyncio.sleep(0.05)
    # Had the evaluation held the loop, it would be over by the time this line runs.
    assert not task.done()
    assert (await task).error == "timed out after 0.5 s"
    results = await asyncio.gather(evaluate_async("2 + 2"), evaluate_async("1 / 0"))
    assert [r.value for r in results] == ["4", ""]
    assert results[1].error == "ZeroDivisionError: division by zero"


# --- SQL ---------------------------------------------------------------------------------


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "db" / "agent.sqlite"
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, title TEXT, score REAL)")
        conn.executemany("INSERT INTO notes (title, score) VALUES (?, ?)",
                         [("apples", 1.5), ("pears", None), ("plums", 3.0)])
        conn.execute("CREATE TABLE numbers (n INTEGER)")
        conn.executemany("INSERT INTO numbers VALUES (?)", [(i,) for i in range(120)])
    conn.close()
    return path


def _count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        count = conn.execute("SELECT count(*) FROM notes").fetchone()[0]
    conn.close()
    return int(count)


def test_select_returns_columns_and_rows(database: Path) -> None:
    columns, rows = run_readonly_sql(database, "SELECT id, title, score FROM notes ORDER BY id")
    assert columns == ["id", "title", "score"]
    assert rows == [(1, "apples", 1.5), (2, "pears", None), (3, "plums", 3.0)]
    assert len(run_readonly_sql(database, "SELECT * FROM numbers", max_rows=7)[1]) == 7


async def test_the_sql_tool_formats_a_table(database: Path) -> None:
    result = await ToolBox(sql_database=database).call(
        "sql", {"query": "SELECT id, title, score FROM notes ORDER BY id"})
    assert result.ok
    assert result.text.splitlines() == [
        "id | title  | score",
        "---+--------+------",
        "1  | apples | 1.5",
        "2  | pears  | NULL",
        "3  | plums  | 3.0",
        "(3 rows)",
    ]
    many = await ToolBox(sql_database=database).call("sql", {"query": "SELECT n FROM numbers"})
    assert many.ok and len(many.text.splitlines()) == 2 + SQL_MAX_ROWS + 1
    assert "more rows not shown" in many.text
    schema = await ToolBox(sql_database=database).call(
        "sql", {"query": "PRAGMA table_info(notes)"})
    assert schema.ok and "title" in schema.text


@pytest.mark.parametrize("query", [
    "INSERT INTO notes (title) VALUES ('evil')",
    "UPDATE notes SET title = 'evil'",
    "DELETE FROM notes",
    "DROP TABLE notes",
    "CREATE TABLE evil (x)",
    "REPLACE INTO notes (id, title) VALUES (1, 'evil')",
    "WITH x AS (SELECT 1) DELETE FROM notes",
    "ATTACH DATABASE 'evil.sqlite' AS evil",
    "PRAGMA user_version = 7",
    "PRAGMA query_only = OFF",
    "PRAGMA journal_mode = DELETE",
    "VACUUM INTO 'copy.sqlite'",
    "BEGIN IMMEDIATE",
    "/* a comment */ DELETE FROM notes",
    "SELECT load_extension('evil')",
])
def test_writes_are_refused_and_the_file_is_unchanged(database: Path, query: str) -> None:
    before = database.read_bytes()
    files = sorted(database.parent.iterdir())
    with pytest.raises(InputError) as caught:
        run_readonly_sql(database, query)
    assert str(caught.value) == "refused: only SELECT queries may run on the agent's database"
    assert database.read_bytes() == before
    assert sorted(database.parent.iterdir()) == files
    assert _count(database) == 3


def test_several_statements_are_refused(database: Path) -> None:
    with pytest.raises(InputError, match=r"^refused: only one SQL statement may run at a time$"):
        run_readonly_sql(database, "SELECT 1; DELETE FROM notes")
    assert _count(database) == 3
    assert run_readonly_sql(database, "SELECT 1;  -- done")[1] == [(1,)]


async def test_a_syntax_error_is_one_line(database: Path) -> None:
    with pytest.raises(InputError, match=r"^SQL error: near \"FRM\": syntax error$"):
        run_readonly_sql(database, "SELECT * FRM notes")
    result = await ToolBox(sql_database=database).call("sql", {"query": "SELECT nope FROM notes"})
    assert not result.ok
    assert result.text == "SQL error: no such column: nope"


def test_a_slow_query_is_stopped_by_the_time_budget(database: Path) -> None:
    slow = ("WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c "
            "WHERE n < 1000000000) SELECT count(*) FROM c")
    with pytest.raises(InputError, match=r"^the query ran longer than 0\.3 s and was stopped"):
        run_readonly_sql(database, slow, time_limit_s=0.3)


def test_a_missing_database_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^no database at "):
        run_readonly_sql(tmp_path / "absent.sqlite", "SELECT 1")
    assert not (tmp_path / "absent.sqlite").exists()


# --- files -------------------------------------------------------------------------------


@pytest.fixture
def files_root(tmp_path: Path) -> Path:
    root = tmp_path / "files"
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("first line\nsecond line\n", encoding="utf-8")
    (root / "sub" / "inner.txt").write_text("inside ünïcode\n", encoding="utf-8")
    (root / "blob.bin").write_bytes(bytes(range(256)))
    (root / "latin.txt").write_bytes("café".encode("latin-1"))
    (root / "long.txt").write_text("".join(f"line {i}\n" for i in range(1, 50_001)))
    (tmp_path / "outside.txt").write_text("secret", encoding="utf-8")
    (root / "out-link.txt").symlink_to(tmp_path / "outside.txt")
    (root / "in-link.txt").symlink_to(root / "notes.txt")
    return root


async def _read(root: Path, path: str, **extra: object) -> tuple[bool, str]:
    result = await ToolBox(files_root=root).call("read_file", {"path": path, **extra})
    return result.ok, result.text


async def test_read_file_reads_inside_the_root(files_root: Path) -> None:
    assert await _read(files_root, "notes.txt") == (
        True, "notes.txt (lines 1-2 of 2)\nfirst line\nsecond line")
    ok, text = await _read(files_root, "sub/../sub/inner.txt")
    assert ok and text.endswith("inside ünïcode")
    assert (await _read(files_root, "in-link.txt"))[0]
    ok, listing = await _read(files_root, ".")
    assert ok and listing.splitlines()[1:] == [
        "blob.bin", "in-link.txt", "latin.txt", "long.txt", "notes.txt", "out-link.txt",
        "sub/"]


async def test_read_file_pages_and_truncates_a_big_file(files_root: Path) -> None:
    ok, text = await _read(files_root, "long.txt")
    assert ok and text.startswith("long.txt (lines 1-") and "first 200 KB only" in text
    assert "call read_file with line=" in text
    ok, later = await _read(files_root, "long.txt", line=1000)
    assert ok and later.splitlines()[1] == "line 1000"


@pytest.mark.parametrize("path", ["../outside.txt", "sub/../../outside.txt", "out-link.txt"])
async def test_read_file_refuses_paths_that_leave_the_root(files_root: Path, path: str) -> None:
    assert await _read(files_root, path) == (
        False, "refused: read_file only reads inside the files folder")


async def test_read_file_refuses_an_absolute_path_outside(files_root: Path) -> None:
    outside = str(files_root.parent / "outside.txt")
    assert await _read(files_root, outside) == (
        False, "refused: read_file only reads inside the files folder")
    assert not (await _read(files_root, "/etc/passwd"))[0]


async def test_read_file_refuses_binary_and_non_utf8_files(files_root: Path) -> None:
    assert await _read(files_root, "blob.bin") == (
        False, "refused: 'blob.bin' is a binary file, not text")
    assert await _read(files_root, "latin.txt") == (
        False, "refused: 'latin.txt' is not UTF-8 text")
    assert await _read(files_root, "missing.txt") == (
        False, "there is no file 'missing.txt' in the files folder")


async def test_read_file_refuses_a_fifo_without_hanging(files_root: Path) -> None:
    os.mkfifo(files_root / "pipe")
    assert await _read(files_root, "pipe") == (False, "refused: 'pipe' is not a regular file")


# --- web search and the tool box ---------------------------------------------------------


async def test_web_search_is_off_by_default_and_unavailable_when_on() -> None:
    off = await ToolBox().call("web_search", {"query": "weather"})
    assert off.ok is False
    assert off.text == "web search is off: enable it in the agent's settings"
    on = await ToolBox(web_search=True).call("web_search", {"query": "weather"})
    assert on.ok is False
    assert on.text.startswith("web search is unavailable: no network connection")


def _search_notes(query: str, k: int) -> str:
    notes = ["the cat is called Tom", "the dog is called Rex", "Tom likes fish"]
    return "\n".join(n for n in notes if any(w in n for w in query.split()))[: 40 * k]


async def test_specs_list_only_configured_tools(tmp_path: Path, database: Path) -> None:
    assert [s.name for s in ToolBox().specs()] == ["python", "web_search"]
    full = ToolBox(memory_search=_search_notes, sql_database=database, files_root=tmp_path)
    assert [s.name for s in full.specs()] == [
        "memory_search", "sql", "python", "read_file", "web_search"]
    text = full.describe()
    assert "- sql(query):" in text and "- memory_search(query, k?):" in text
    result = await full.call("memory_search", {"query": "Tom", "k": 2})
    assert result.ok and result.text == "the cat is called Tom\nTom likes fish"
    assert (await full.call("python", {"code": "x = 1"})).text.startswith("(no output")


@pytest.mark.parametrize(("name", "arguments", "start"), [
    ("browse", {"url": "x"},
     "there is no tool named 'browse': the tools are memory_search, python, web_search"),
    ("python", {}, "python is missing the argument 'code'; python takes: code (text)"),
    ("python", {"code": True}, "python: 'code' must be text, not bool"),
    ("python", ["2 + 2"], "python: the arguments must be an object; python takes: code"),
    ("python", {"code": "1", "extra": 2}, "python got an unexpected argument 'extra'"),
    ("memory_search", {"query": "x", "k": "many"}, "memory_search: 'k' must be number"),
    ("memory_search", {"query": "x", "k": 500}, "memory_search: k must be between 1 and 20"),
])
async def test_bad_calls_come_back_as_one_line(name: str, arguments: Mapping[str, object],
                                               start: str) -> None:
    result = await ToolBox(memory_search=_search_notes).call(name, arguments)
    assert result.ok is False
    assert result.text.startswith(start)
    assert "\n" not in result.text


async def test_a_failing_memory_search_does_not_raise() -> None:
    def broken(query: str, k: int) -> str:
        raise RuntimeError("index missing")

    result = await ToolBox(memory_search=broken).call("memory_search", {"query": "x"})
    assert result == type(result)("memory_search", False,
                                  "memory_search failed: RuntimeError: index missing")


async def test_the_python_tool_runs_the_sandbox() -> None:
    box = ToolBox(sandbox_timeout_s=0.5)
    assert (await box.call("python", {"code": "2**10"})).text == "1024"
    refused = await box.call("python", {"code": "import os"})
    assert refused.ok is False
    assert refused.text == "refused: imports are not allowed in the sandbox"
    slow = await box.call("python", {"code": "while True:\n    pass"})
    assert (slow.ok, slow.text) == (False, "timed out after 0.5 s")
