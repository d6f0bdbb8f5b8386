"""kill -9 while a saved index is being written: the table still opens with every committed
row and exact answers, the half-written files are never trusted, and the next save removes
the temporary files the dead writer left. Real processes, SQLite files and faiss indexes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from engine.memory import MemoryStore
from engine.memory.index_files import SavedIndexWarning
from tests.memory_fixtures import brute_force_l2

ROOT = Path(__file__).resolve().parents[1]
DIM = 16

# Saves a first index of `first` rows completely, commits `more` rows, then saves again with
# os.<call> (replace or fsync) killing the process at its `step`-th use ("done": after the save).
CRASHER = textwrap.dedent(
    """
    import os, signal, sys, numpy as np
    from engine.memory import MemoryStore
    path, call, step, first, more = sys.argv[1], *sys.argv[2].split(":"), *map(int, sys.argv[3:])
    keys = np.random.default_rng(0).normal(size=(first + more, 16)).astype(np.float32)
    with MemoryStore.open(path) as store:
        store.create_table("t", 16, 4, index="hnsw").insert(keys[:first], keys[:first, :4])
    store = MemoryStore.open(path)
    store.table("t").insert(keys[first:], keys[first:, :4])
    print("committed", flush=True)
    real, calls = getattr(os, call), [0]
    def crash_at_step(*args):
        calls[0] += 1
        if str(calls[0]) == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    setattr(os, call, crash_at_step)
    store.close()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)

# Like CRASHER's second save, but faiss writes the index slowly, in small chunks, announcing
# the write once it is under way; the test kills the process from outside meanwhile.
SLOW_WRITER = textwrap.dedent(
    """
    import sys, time, faiss, numpy as np
    from engine.memory import MemoryStore
    path, first, more = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    keys = np.random.default_rng(0).normal(size=(first + more, 16)).astype(np.float32)
    with MemoryStore.open(path) as store:
        store.create_table("t", 16, 4, index="hnsw").insert(keys[:first], keys[:first, :4])
    store = MemoryStore.open(path)
    store.table("t").insert(keys[first:], keys[first:, :4])
    serialize = faiss.serialize_index  # it calls faiss.write_index: bind the real one first
    real_write = faiss.write_index
    def slow_write(index, target):
        faiss.write_index = real_write
        data = serialize(index).tobytes()
        faiss.write_index = slow_write
        with open(target, "wb") as file:
            for number, start in enumerate(range(0, len(data), 8192)):
                file.write(data[start : start + 8192])
                file.flush()
                if number == 8:
                    print("writing", target, len(data), flush=True)
                time.sleep(0.01)
    faiss.write_index = slow_write
    store.close()
    print("finished", flush=True)
    """
)


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _all_keys(rows: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, DIM)).astype(np.float32)


def _check_table(path: Path, rows: int, rebuilt: bool) -> None:
    """Every committed row is there and queries are exact; no damage is reported."""
    keys = _all_keys(rows)
    queries = np.concatenate([keys[::25], np.random.default_rng(5).normal(size=(10, DIM))])
    queries = queries.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SavedIndexWarning)
        with MemoryStore.open(path) as store:
            table = store.table("t")
            stats = table.stats()
            assert stats["rows"] == rows and stats["index"]["ntotal"] == rows
            assert stats["index_rebuilt_on_open"] is rebuilt
            ids, stored, values = table.export_arrays()
            np.testing.assert_array_equal(stored, keys)
            np.testing.assert_array_equal(values, keys[:, :4])
            table.tune(ef_search=4096)  # exhaustive: the answers must equal brute force
            result = table.query(queries, 8, record_access=False)
    positions, distances = brute_force_l2(keys, queries, 8)
    np.testing.assert_array_equal(result.ids, ids[positions])
    np.testing.assert_allclose(result.distances, distances, rtol=1e-4, atol=1e-4)


def _temp_files(path: Path) -> list[Path]:
    return sorted(path.with_name(path.name + ".index").glob("*.tmp"))


# replace:1 is the index file, replace:2 its slot file, replace:3 the fingerprint; fsync:2
# comes before any rename (the new index is only in a temporary file), fsync:6 after all.
STEPS = ["fsync:2", "replace:1", "replace:2", "replace:3", "fsync:6", "replace:done"]


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_step_of_a_save(tmp_path: Path, step: str) -> None:
    path = tmp_path / "m.db"
    crasher = _spawn(CRASHER, str(path), step, "400", "200")
    out, err = crasher.communicate(timeout=120)
    assert crasher.returncode == -signal.SIGKILL, err
    assert out.split() == ["committed"]
    left = _temp_files(path)
    assert bool(left) == step.startswith(("fsync:2", "replace:1", "replace:2", "replace:3")), left
    # Until the fingerprint is in place the saved files are not trusted: the index is rebuilt.
    complete = step in ("fsync:6", "replace:done")
    _check_table(path, 600, rebuilt=not complete)
    assert not _temp_files(path)  # that open's close saved again and swept the leftovers
    _check_table(path, 600, rebuilt=False)


def test_kill_from_outside_in_the_middle_of_writing_a_large_index(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    writer = _spawn(SLOW_WRITER, str(path), "3000", "1000")
    assert writer.stdout is not None
    line = writer.stdout.readline()
    assert line.startswith("writing"), writer.stderr.read() if writer.stderr else line
    _, target, size = line.split()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    partial = Path(target)
    assert partial.name.endswith(".tmp") and 0 < partial.stat().st_size < int(size)
    assert not path.with_name(path.name + ".index").joinpath("table-1.json").exists()
    _check_table(path, 4000, rebuilt=True)
    assert not _temp_files(path)
    _check_table(path, 4000, rebuilt=False)
