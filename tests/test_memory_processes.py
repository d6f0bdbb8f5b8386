"""Durability and concurrency with real processes: kill -9 mid-batch, reader beside writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from engine.memory import MemoryStore

ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from engine.memory import MemoryStore
    path, batch, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = MemoryStore.open(path)
    table = store.create_table("t", 16, 8, index=sys.argv[4], exist_ok=True)
    for number in range(batches):
        rng = np.random.default_rng(number)
        keys = rng.normal(size=(batch, 16)).astype(np.float32)
        table.insert(keys, keys[:, :8] * 2, labels=f"batch {number}")
        print(f"committed {number}", flush=True)
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


def _expected_keys(number: int, batch: int) -> np.ndarray:
    return np.random.default_rng(number).normal(size=(batch, 16)).astype(np.float32)


def test_kill_during_batch_keeps_every_committed_batch_whole(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    batch = 20_000
    writer = _spawn(WRITER, str(path), str(batch), "1000", "flat-l2")
    committed = -1
    assert writer.stdout is not None
    while committed < 2:
        line = writer.stdout.readline()
        assert line, writer.stderr.read() if writer.stderr else "writer died"
        committed = int(line.split()[1])
    time.sleep(0.15)  # well inside the next batch's transaction
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL

    with MemoryStore.open(path) as store:
        table = store.table("t")
        rows = len(table)
        assert rows % batch == 0, "a half batch survived the crash"
        batches = rows // batch
        assert committed + 1 <= batches <= committed + 2
        ids, keys, values = table.export_arrays()
        for number in range(batches):
            expected = _expected_keys(number, batch)
            np.testing.assert_array_equal(keys[number * batch : (number + 1) * batch], expected)
        np.testing.assert_array_equal(values, keys[:, :8] * 2)
        assert table.count(label_contains=f"batch {batches - 1}") == batch
        probe = table.query(keys[::batch], 1)
        np.testing.assert_array_equal(probe.ids[:, 0], ids[::batch])


def test_saved_index_out_of_date_is_detected_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with MemoryStore.open(path) as store:
        table = store.create_table("t", 16, 8, index="hnsw")
        table.insert(_expected_keys(100, 50), np.zeros((50, 8), np.float32))
    assert (tmp_path / "m.db.index").is_dir()
    with MemoryStore.open(path) as store:
        assert store.table("t").stats()["index_rebuilt_on_open"] is False
    # Another process commits rows and dies before it could save its index.
    writer = _spawn(WRITER + "\nimport os; os.kill(os.getpid(), 9)\n", str(path), "30", "2", "hnsw")
    writer.wait()
    with MemoryStore.open(path) as store:
        table = store.table("t")
        assert table.stats()["index_rebuilt_on_open"] is True
        assert len(table) == 110 and table.stats()["index"]["ntotal"] == 110
        keys = _expected_keys(1, 30)
        hits = table.query(keys, 1)
        np.testing.assert_array_equal(hits.keys[:, 0], keys)


READER = textwrap.dedent(
    """
    import sys, time, numpy as np
    from engine.memory import MemoryStore
    store = MemoryStore.open(sys.argv[1])
    while "t" not in store.table_names():
        time.sleep(0.01)
    table = store.table("t")
    probe = np.random.default_rng(7).normal(size=(64, 16)).astype(np.float32)
    seen, edited, deadline = 0, set(), time.time() + 60
    while seen < int(sys.argv[2]) and time.time() < deadline:
        result = table.query(probe, 4)
        assert (result.ids >= 0).sum() == min(4, len(table)) * 64 or len(table) < 4
        seen = len(table)
        rows = table.page(0, 5, order_by="id", descending=True)
        fresh = [r.id for r in rows if r.id not in edited and r.label != "seen by reader"]
        if fresh:
            table.update(fresh, label="seen by reader")
            edited.update(fresh)
    print(seen, len(edited), flush=True)
    store.close()
    """
)


def test_reader_and_writer_processes_do_not_lock_or_lose_writes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    batch, batches = 200, 40
    reader = _spawn(READER, str(path), str(batch * batches))
    writer = _spawn(WRITER, str(path), str(batch), str(batches), "flat-l2")
    _, writer_err = writer.communicate(timeout=120)
    reader_out, reader_err = reader.communicate(timeout=120)
    assert writer.returncode == 0, writer_err
    assert reader.returncode == 0, reader_err
    assert "locked" not in writer_err + reader_err
    seen, edited = map(int, reader_out.split())
    assert seen == batch * batches and edited > 0
    with MemoryStore.open(path) as store:
        table = store.table("t")
        assert len(table) == batch * batches
        assert table.count(label_contains="seen by reader") == edited
        _, keys, _ = table.export_arrays()
        for number in range(batches):
            np.testing.assert_array_equal(
                keys[number * batch : (number + 1) * batch], _expected_keys(number, batch)
            )
