"""The job event stream's format: typed, versioned events that old and new readers survive."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from engine.distill import events as ev
from engine.distill.job_events import (
    EVENT_VERSION,
    LEGACY_VERSION,
    CheckpointEvent,
    DoneEvent,
    ErrorEvent,
    EvalEvent,
    EventWriter,
    JobEvent,
    LocalPairsEvent,
    ResumedEvent,
    StateEvent,
    StepEvent,
    UnknownEvent,
    decode,
    encode,
    event_type,
    latest_steps,
    read_events,
)

# An events.jsonl exactly as the loop wrote it before events carried a version: a run that
# was killed mid-line at step 2, resumed from its step-1 checkpoint, completed, and a torn
# last line from a process killed while writing.
TODAYS_FORMAT = """\
{"type": "state", "time": 1764583200.5, "state": "starting", "step": 0}
{"type": "local_pairs", "time": 1764583201.0, "tokens": 256, "bytes": 65536}
{"type": "state", "time": 1764583201.1, "state": "running", "step": 0}
{"type": "step", "time": 1764583201.9, "step": 1, "total_steps": 3, "stage": "local", \
"tokens_per_s": 812.5, "eta_s": 1.6, "tokens_seen": 64, "cpu_seconds": 2.5, \
"batch_hash": 3405691582, "loss": 0.75, "local": 0.75, "grad_norm": 1.25, "lr": 0.03}
{"type": "checkpoint", "time": 1764583202.0, "step": 1}
{"type": "step", "time": 1764583202.7, "step": 2, "total_steps": 3, "stage": "e2e", \
"tokens_per_s": 790.0, "eta_s": 0.8, "tokens_seen": 192, "cpu_seconds": 3.25, \
"batch_hash": 12345, "loss": 2.5, "kl": 2.5, "grad_norm": 0.5, "lr": 0.003}
{"type": "step", "time": 1764583202.8, "step": 3, "total_st
{"type": "state", "time": 1764583210.0, "state": "starting", "step": 0}
{"type": "resumed", "time": 1764583210.5, "from_step": 1}
{"type": "state", "time": 1764583210.6, "state": "running", "step": 1}
{"type": "step", "time": 1764583211.2, "step": 2, "total_steps": 3, "stage": "e2e", \
"tokens_per_s": 800.0, "eta_s": 0.8, "tokens_seen": 192, "cpu_seconds": 3.5, \
"batch_hash": 12345, "loss": 2.25, "kl": 2.0, "ce": 0.25, "grad_norm": 0.5, "lr": 0.003}
{"type": "eval", "time": 1764583211.3, "step": 2, "heldout_ppl": "inf"}
{"type": "step", "time": 1764583211.9, "step": 3, "total_steps": 3, "stage": "e2e", \
"tokens_per_s": 805.0, "eta_s": 0.0, "tokens_seen": 256, "cpu_seconds": 4.0, \
"batch_hash": 777, "loss": 2.0, "kl": 2.0, "grad_norm": 0.4, "lr": 0.0003}
{"type": "checkpoint", "time": 1764583212.0, "step": 3}
{"type": "done", "time": 1764583213.0, "ppl_teacher": 10.5, "ppl_student": 11.0, \
"ppl_zeroed": 40.0, "ppl_ratio": 1.0476, "gap_closed": "nan", "kl_per_token": 0.05, \
"top1_agreement": 0.9, "heldout_tokens": 124, "state": "completed", "teacher": "tiny-llama", \
"memory": "featural", "layers": [1, 2], "steps_done": 3, "total_steps": 3, \
"tokens_seen": 256, "cpu_seconds": 4.5, "wall_seconds": 13.0, "world_size": 1, \
"data": "sampled from the teacher", "trainable_parameters": 4096}
{"type": "state", "time": 1764583213.1, "state": "completed", "step": 3}
{"type": "error", "time": 1764583300.0, "message": "RuntimeError: boom", "step": 3}
{"type": "state", "time": 1764583300.1, "state": "failed", "step": 3, "error": "Runtim\
eError: boom", "last_checkpoint": null}
{"type": "step", "time": 1764583300.2, "st"""


def write_run(run_dir: Path, text: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ev.EVENTS_NAME).write_text(text, encoding="utf-8")


def test_events_written_before_versions_read_back_typed(tmp_path: Path) -> None:
    write_run(tmp_path, TODAYS_FORMAT)
    events = read_events(tmp_path)
    assert [event_type(e) for e in events] == [
        "state", "local_pairs", "state", "step", "checkpoint", "step", "state", "resumed",
        "state", "step", "eval", "step", "checkpoint", "done", "state", "error", "state",
    ]  # both torn lines skipped
    assert all(e.version == LEGACY_VERSION for e in events)
    assert not any(isinstance(e, UnknownEvent) for e in events)
    first = events[3]
    assert first == StepEvent(
        time=1764583201.9, version=0, step=1, total_steps=3, stage="local", loss=0.75,
        grad_norm=1.25, lr=0.03, tokens_per_s=812.5, eta_s=1.6, tokens_seen=64,
        cpu_seconds=2.5, batch_hash=3405691582, local=0.75,
    )
    # A resume repeats steps: the later line wins.
    steps = latest_steps(events)
    assert sorted(steps) == [1, 2, 3]
    assert (steps[2].loss, steps[2].kl, steps[2].ce) == (2.25, 2.0, 0.25)
    evaluated = next(e for e in events if isinstance(e, EvalEvent))
    assert evaluated.heldout_ppl == float("inf")  # written as "inf"
    done = next(e for e in events if isinstance(e, DoneEvent))
    assert done.layers == [1, 2] and done.gap_closed != done.gap_closed  # NaN
    assert done.data == "sampled from the teacher" and done.trainable_parameters == 4096
    assert next(e for e in events if isinstance(e, ResumedEvent)).from_step == 1
    assert next(e for e in events if isinstance(e, LocalPairsEvent)).bytes == 65536
    assert [e.step for e in events if isinstance(e, CheckpointEvent)] == [1, 3]
    failed = events[-1]
    assert failed == StateEvent(time=1764583300.1, version=0, state="failed", step=3,
                                error="RuntimeError: boom", last_checkpoint=None)
    assert isinstance(events[-2], ErrorEvent) and events[-2].message == "RuntimeError: boom"


def test_written_events_carry_the_version_and_read_back_equal(tmp_path: Path) -> None:
    written: list[JobEvent] = [
        StateEvent(state="running", step=0),
        StepEvent(step=1, total_steps=2, stage="e2e", loss=1.5, grad_norm=0.5, lr=1e-3,
                  tokens_per_s=100.0, eta_s=1.0, tokens_seen=128, cpu_seconds=0.5,
                  batch_hash=42, kl=1.5),
        EvalEvent(step=1, heldout_ppl=float("inf")),
        StateEvent(state="failed", step=1, error="it broke", last_checkpoint=None),
    ]
    writer = EventWriter(tmp_path)
    for event in written:
        writer.write(event)
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / ev.EVENTS_NAME).read_text().splitlines()]
    assert all(line["version"] == EVENT_VERSION == 1 for line in lines)
    assert lines[1]["type"] == "step" and "ce" not in lines[1]  # unset optional fields
    assert lines[2]["heldout_ppl"] == "inf"  # valid JSON for non-finite floats
    assert read_events(tmp_path) == written


def test_unknown_types_and_extra_fields_do_not_stop_a_reader(tmp_path: Path) -> None:
    lines = [
        {"type": "checkpoint", "version": 7, "time": 5.0, "step": 4, "shard": "a"},
        {"type": "weather", "version": 7, "time": 6.0, "sky": "clear"},
        {"type": "eval", "version": 7, "time": 7.0, "step": "four"},  # unreadable field
        {"version": 7, "time": 8.0},  # no type at all
        ["not", "an", "object"],
    ]
    write_run(tmp_path, "".join(json.dumps(line) + "\n" for line in lines) + "garbage\n")
    events = read_events(tmp_path)
    assert events[0] == CheckpointEvent(time=5.0, version=7, step=4)  # extra field dropped
    assert events[1] == UnknownEvent(time=6.0, version=7, type="weather", data={"sky": "clear"})
    assert isinstance(events[2], UnknownEvent) and events[2].type == "eval"
    assert events[2].data == {"step": "four"}
    assert isinstance(events[3], UnknownEvent) and len(events) == 4
    # An unknown event is written back as it was read.
    assert json.loads(encode(events[1])) == lines[1]
    assert decode({"type": "state"}) == UnknownEvent(time=0.0, version=0, type="state")


async def test_following_a_job_tails_until_its_process_exits(tmp_path: Path) -> None:
    """JobRunner.events yields what is there, then what is appended, then what was written
    just before the process exited, and stops."""
    from engine.distill.jobs import JOB_NAME, JobRunner

    runner = JobRunner(tmp_path, niceness=0)
    run_dir = tmp_path / "job"
    write_run(run_dir, TODAYS_FORMAT.split("\n", 1)[0] + "\n")
    (run_dir / ev.CONFIG_NAME).write_text("{}", encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / JOB_NAME).write_text(json.dumps({"pid": process.pid}), encoding="utf-8")
        runner._children["job"] = process  # a process of ours: alive while it runs
        seen: list[JobEvent] = []

        async def follow() -> None:
            async for event in runner.events("job", poll=0.02):
                seen.append(event)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        assert [event_type(e) for e in seen] == ["state"]
        writer = EventWriter(run_dir)
        writer.write(CheckpointEvent(step=1))
        await asyncio.sleep(0.3)
        assert [event_type(e) for e in seen] == ["state", "checkpoint"] and not task.done()
        writer.write(ErrorEvent(message="last words", step=1))
        writer.close()
        process.kill()
        await asyncio.wait_for(task, timeout=10)
    finally:
        process.kill()
        process.wait()
    assert [event_type(e) for e in seen] == ["state", "checkpoint", "error"]
    # Not following: what is there now, then the end.
    later = [e async for e in runner.events("job", follow=False, from_start=False)]
    assert later == []
