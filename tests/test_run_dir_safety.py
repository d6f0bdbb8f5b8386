"""Nothing in a run directory can run code, hang a reader or crash a front end.

A real tiny run makes the directory; each test plants something hostile in a copy of it (a
pickle whose loading touches a marker file, garbage, a truncated or mismatched checkpoint, a
checkpoint from a newer format, a FIFO, a deeply nested or huge JSON document) and checks that
it is refused with one line or tolerated as documented, and that the marker never appears.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.distill import events as ev
from engine.distill.checkpoints import (
    CHECKPOINT_NAME,
    LEGACY_NAME,
    CheckpointError,
    load_checkpoint,
)
from engine.distill.job_events import EventTail, StepEvent, read_events
from engine.distill.jobs import JOB_NAME, JobRunner
from engine.distill.loop import run_distillation
from engine.errors import MindsetError
from mindset.cli import run
from tests.conftest import REPO_ROOT
from tests.test_distill_support import tiny_config

# The original associative form trains (the recipe starts exact and is not trained).
CONFIG = dict(memory="associative", hparams={"base": "none", "capacity": 512}, steps=2,
              checkpoint_every=1, eval_every=100)
LEGACY_LINE = ("checkpoint.pt is from an older Mindset and is a pickle, which Mindset no "
               "longer opens (it could run code)")


class Payload:
    """Unpickling this touches ``marker``: what a crafted checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def payload_bytes(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def plant_torch_pickle(path: Path, marker: Path) -> None:
    """A checkpoint.pt in torch's own format whose loading (weights_only=False) runs code."""
    torch.save({"step": 1, "evil": Payload(marker)}, path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("safety") / "base"
    run_distillation(tiny_config(**CONFIG), run_dir)
    return run_dir


@pytest.fixture()
def run_dir(base_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


def test_the_payload_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """The threat is real: an ordinary pickle load of these files runs the payload."""
    first, second = tmp_path / "a", tmp_path / "b"
    pickle.loads(payload_bytes(first))
    plant_torch_pickle(tmp_path / "checkpoint.pt", second)
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)  # what Mindset used to do
    assert first.exists() and second.exists()


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def old_run(run_dir: Path, marker: Path) -> None:
    """``run_dir`` as an older Mindset left it: a pickled checkpoint.pt, no new checkpoint."""
    (run_dir / CHECKPOINT_NAME).unlink()
    for tensors in run_dir.glob("checkpoint-*.safetensors"):
        tensors.unlink()
    plant_torch_pickle(run_dir / LEGACY_NAME, marker)


def test_cli_resume_refuses_a_pickled_checkpoint_without_opening_it(
    run_dir: Path, marker: Path
) -> None:
    old_run(run_dir, marker)
    before = (run_dir / ev.STATE_NAME).read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "mindset.cli", "distill", "--resume", "--out", str(run_dir)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("mindset: error: ") and LEGACY_LINE in line
    assert "start the run again" in line
    assert not marker.exists()
    assert (run_dir / ev.STATE_NAME).read_bytes() == before  # refused before anything ran


def test_a_job_resumed_on_a_pickled_checkpoint_fails_with_the_same_line(
    base_run: Path, tmp_path: Path, marker: Path
) -> None:
    runs = tmp_path / "runs"
    job_dir = runs / "old-job"
    shutil.copytree(base_run, job_dir)
    old_run(job_dir, marker)
    (job_dir / JOB_NAME).write_text(json.dumps({"created": time.time(), "processes": 1,
                                                "pid": None}))
    ev.write_state(job_dir, "cancelled", step=1, total_steps=2)
    runner = JobRunner(runs)
    assert runner.has_checkpoint("old-job") and runner.job("old-job").resumable
    runner.resume("old-job")
    job = runner.wait("old-job", timeout=240)
    assert job.state == "failed" and not job.alive
    assert job.error is not None and LEGACY_LINE in job.error and "\n" not in job.error
    assert runner._children["old-job"].wait(timeout=30) == 2  # the worker's clear-error exit
    errors = [e.message for e in read_events(job_dir) if type(e).__name__ == "ErrorEvent"]
    assert errors and errors[-1] == job.error  # what the Training pane shows
    assert not marker.exists()


def test_a_legacy_checkpoint_beside_a_new_one_is_still_refused(run_dir: Path,
                                                               marker: Path) -> None:
    plant_torch_pickle(run_dir / LEGACY_NAME, marker)
    with pytest.raises(CheckpointError, match="older Mindset"):
        load_checkpoint(run_dir)
    assert not marker.exists()


# -- damaged checkpoints ----------------------------------------------------------------------

def _manifest(run_dir: Path) -> dict:  # type: ignore[type-arg]
    data: dict = json.loads((run_dir / CHECKPOINT_NAME).read_text())  # type: ignore[type-arg]
    return data


def _tensors(run_dir: Path) -> Path:
    return run_dir / _manifest(run_dir)["tensors"]


def _write_manifest(run_dir: Path, **changes: object) -> None:
    (run_dir / CHECKPOINT_NAME).write_text(json.dumps({**_manifest(run_dir), **changes}))


def garbage_tensors(run_dir: Path, marker: Path) -> None:
    path = _tensors(run_dir)
    size = path.stat().st_size
    path.write_bytes((payload_bytes(marker) * size)[:size])  # same size, other bytes


def truncated_tensors(run_dir: Path, marker: Path) -> None:
    path = _tensors(run_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def consistent_garbage(run_dir: Path, marker: Path) -> None:
    """Garbage whose manifest was rewritten to match it: the safetensors parser refuses it."""
    import hashlib

    data = b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}" + payload_bytes(marker)
    digest = hashlib.sha256(data).hexdigest()
    name = f"checkpoint-{digest[:16]}.safetensors"
    (run_dir / name).write_bytes(data)
    _write_manifest(run_dir, tensors=name, tensors_bytes=len(data), tensors_sha256=digest)


def wrong_digest(run_dir: Path, marker: Path) -> None:
    manifest = _manifest(run_dir)
    digest = "0" * 64
    name = f"checkpoint-{digest[:16]}.safetensors"
    _tensors(run_dir).rename(run_dir / name)
    _write_manifest(run_dir, tensors=name, tensors_sha256=digest,
                    tensors_bytes=manifest["tensors_bytes"])


def future_version(run_dir: Path, marker: Path) -> None:
    _write_manifest(run_dir, version=99)


def escaping_name(run_dir: Path, marker: Path) -> None:
    _write_manifest(run_dir, tensors="../../../../etc/passwd")


def pickled_manifest(run_dir: Path, marker: Path) -> None:
    (run_dir / CHECKPOINT_NAME).write_bytes(payload_bytes(marker))


def nested_manifest(run_dir: Path, marker: Path) -> None:
    (run_dir / CHECKPOINT_NAME).write_text("[" * 200_000)


def fifo_manifest(run_dir: Path, marker: Path) -> None:
    (run_dir / CHECKPOINT_NAME).unlink()
    os.mkfifo(run_dir / CHECKPOINT_NAME)  # a reader that opened it normally would hang


def missing_tensors(run_dir: Path, marker: Path) -> None:
    _tensors(run_dir).unlink()


def bad_optimizer_state(run_dir: Path, marker: Path) -> None:
    _write_manifest(run_dir, optimizers={"not": "a list"}, rng=[1, 2])


DAMAGE = {
    "garbage-tensors": (garbage_tensors, "does not match the digest"),
    "truncated-tensors": (truncated_tensors, "bytes, not"),
    "consistent-garbage": (consistent_garbage, "not a readable safetensors file"),
    "wrong-digest": (wrong_digest, "does not match the digest"),
    "future-version": (future_version, "newer Mindset"),
    "escaping-name": (escaping_name, "does not name its tensor file"),
    "pickled-manifest": (pickled_manifest, "not UTF-8|not valid JSON"),
    "nested-manifest": (nested_manifest, "nested too deeply"),
    "fifo-manifest": (fifo_manifest, "not a regular file"),
    "missing-tensors": (missing_tensors, "is missing"),
    "bad-optimizer-state": (bad_optimizer_state, "incomplete"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_refused_in_one_line(run_dir: Path, marker: Path,
                                                     case: str) -> None:
    damage, expected = DAMAGE[case]
    damage(run_dir, marker)
    with pytest.raises(CheckpointError, match=expected) as raised:
        load_checkpoint(run_dir)
    assert "\n" not in str(raised.value)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["garbage-tensors", "future-version", "pickled-manifest"])
def test_cli_resume_on_a_damaged_checkpoint_is_one_line(
    run_dir: Path, marker: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    damage, expected = DAMAGE[case]
    damage(run_dir, marker)
    assert run(["distill", "--layers", "1", "--out", str(run_dir), "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("mindset: error: ") and re.search(expected, line), line
    assert not marker.exists()


# -- the run directory's other files ---------------------------------------------------------

HOSTILE = {
    "pickle": lambda marker: payload_bytes(marker),
    "binary": lambda marker: bytes(range(256)) * 8,
    "nested": lambda marker: b"[" * 200_000,
    "long-number": lambda marker: b'{"step": ' + b"9" * 50_000 + b"}",
    "wrong-types": lambda marker: json.dumps({"state": ["x"], "step": "many", "pid": "1",
                                              "updated": {}, "error": 5,
                                              "command": 3, "at_step": "soon"}).encode(),
    "huge": lambda marker: b" " * (17 * 1024 * 1024) + b"{}",
}


def plant(path: Path, kind: str, marker: Path) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(HOSTILE[kind](marker))


KINDS = [*HOSTILE, "fifo"]


def _job(run_dir: Path) -> tuple[JobRunner, str]:
    (run_dir / JOB_NAME).write_text(json.dumps({"created": 1.0, "processes": 1, "pid": None}))
    return JobRunner(run_dir.parent), run_dir.name


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_state_and_job_files_are_tolerated(run_dir: Path, marker: Path,
                                                   kind: str) -> None:
    runner, job_id = _job(run_dir)
    plant(run_dir / ev.STATE_NAME, kind, marker)
    state = ev.read_state(run_dir)
    assert isinstance(state, dict)
    job = runner.job(job_id)  # documented: an unreadable state reads as none
    assert job.state in ("starting", "crashed") and isinstance(job.step, int)
    assert job.error is None or isinstance(job.error, str)
    plant(run_dir / JOB_NAME, kind, marker)
    job = runner.job(job_id)
    assert job.pid is None and not job.alive and [j.id for j in runner.jobs()] == [job_id]
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_control_file_keeps_the_last_good_command(run_dir: Path, marker: Path,
                                                          kind: str) -> None:
    ev.write_control(run_dir, "pause", at_step=3)
    reader = ev.ControlReader(run_dir)
    assert reader.read() == ev.Control("pause", 3)
    plant(run_dir / ev.CONTROL_NAME, kind, marker)
    assert reader.read() == ev.Control("pause", 3)  # the pause holds
    assert ev.ControlReader(run_dir).read().command in ev.CONTROL_COMMANDS
    assert not marker.exists()


@pytest.mark.parametrize("data", [
    {}, {"at_step": 3}, {"command": "run", "at_step": "soon"}, {"command": "run", "at_step": True},
    {"command": 3, "at_step": 1}, {"command": "resume"}, {"command": ["run"]},
])
def test_one_bad_control_field_keeps_the_pause(tmp_path: Path, data: dict[str, Any]) -> None:
    ev.write_control(tmp_path, "pause", at_step=3)
    reader = ev.ControlReader(tmp_path)
    assert reader.read() == ev.Control("pause", 3)
    time.sleep(0.01)  # a new mtime even on coarse clocks (the size changes too, mostly)
    (tmp_path / ev.CONTROL_NAME).write_text(json.dumps(data) + "\n" * 7)
    assert reader.read() == ev.Control("pause", 3)
    time.sleep(0.01)
    ev.write_control(tmp_path, "run")
    assert reader.read() == ev.Control("run", None)


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_config_is_one_line_for_resume_and_jobs(
    run_dir: Path, marker: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    runner, job_id = _job(run_dir)
    plant(run_dir / ev.CONFIG_NAME, kind, marker)
    assert run(["distill", "--layers", "1", "--out", str(run_dir), "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("mindset: error: ") and "config.json" in line
    job = runner.job(job_id)  # the list still shows it, with what it cannot tell as "?"
    assert job.teacher == "?" and job.total_steps == 2  # total from state.json
    from engine.distill.worker import main as worker_main

    assert worker_main([str(run_dir)]) == 2
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_report_is_one_line(run_dir: Path, marker: Path, kind: str) -> None:
    runner, job_id = _job(run_dir)
    assert runner.report(job_id)["steps_done"] == 2  # type: ignore[index]
    plant(run_dir / ev.REPORT_NAME, kind, marker)
    if kind == "wrong-types":
        assert isinstance(runner.report(job_id), dict)  # a JSON object: read as it is
        return
    with pytest.raises(MindsetError) as raised:
        runner.report(job_id)
    assert "report.json" in str(raised.value) and "\n" not in str(raised.value)
    assert not marker.exists()


def test_hostile_event_lines_are_skipped(run_dir: Path, marker: Path) -> None:
    good = read_events(run_dir)
    steps = [e for e in good if isinstance(e, StepEvent)]
    assert len(steps) == 2
    with (run_dir / ev.EVENTS_NAME).open("ab") as file:
        file.write(payload_bytes(marker) + b"\n")
        file.write(b"[" * 200_000 + b"\n")
        file.write(b'{"type": "step", "time": 1' + b"0" * 400 + b', "step": 3}\n')
        file.write(b'{"type": "eval", "time": ' + b"9" * 50_000 + b"}\n")
        file.write(b'{"type": "step", "note": "' + b"x" * (9 * 1024 * 1024) + b'"}\n')
        file.write(bytes(range(256)) + b"\n")
        file.write((json.dumps({"type": "checkpoint", "version": 1, "time": 2.0,
                                "step": 7}) + "\n").encode())
    events = read_events(run_dir)
    assert events[: len(good)] == good
    assert [type(e).__name__ for e in events[len(good):]][-1] == "CheckpointEvent"
    assert len(events) <= len(good) + 4
    # A follower polling as the file grows skips the over-long line without holding it.
    tail = EventTail(run_dir)
    seen = []
    for _ in range(10):
        seen += tail.poll()
    assert seen == events
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["fifo", "pickle"])
def test_hostile_event_files_read_as_no_events_and_refuse_a_writer(
    run_dir: Path, marker: Path, kind: str
) -> None:
    plant(run_dir / ev.EVENTS_NAME, kind, marker)
    assert read_events(run_dir) == []
    if kind == "fifo":
        from engine.distill.job_events import EventWriter

        with pytest.raises(MindsetError, match="not a regular file"):
            EventWriter(run_dir)
    assert not marker.exists()


def test_hostile_memory_table_and_student_files_are_refused(run_dir: Path,
                                                            marker: Path) -> None:
    from engine.model.loading import load_student

    student = run_dir / "student"
    tables = list((student / "memory").iterdir())
    assert tables, "an associative run keeps its memory tables in the student"
    for table in tables:
        table.write_bytes(payload_bytes(marker))
    with pytest.raises(MindsetError) as raised:
        load_student(student)
    assert "\n" not in str(raised.value)
    shutil.rmtree(student / "memory")
    (student / "model.safetensors").unlink()
    plant_torch_pickle(student / "pytorch_model.bin", marker)
    with pytest.raises(MindsetError, match=r"pickle|safetensors"):
        load_student(student)
    assert not marker.exists()


def test_no_code_path_unpickles() -> None:
    """No module of the project calls torch.load or pickle.load (or weights_only=False)."""
    offenders = []
    for root in ("engine", "mindset"):
        for path in (REPO_ROOT / root).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for needle in ("torch.load(", "pickle.load", "weights_only=False",
                           "allow_pickle=True"):
                if needle in text:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}: {needle}")
    assert offenders == []
