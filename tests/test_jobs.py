"""Background jobs in real processes: kill -9 and resume, pause, cancel, events, restarts."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from engine.distill.checkpoints import load_checkpoint
from engine.distill.job_events import (
    CheckpointEvent,
    JobEvent,
    ResumedEvent,
    StateEvent,
    StepEvent,
    latest_steps,
    read_events,
)
from engine.distill.jobs import JobRunner
from engine.distill.loop import run_distillation
from tests.test_distill_support import tiny_config

BOOT_TIMEOUT = 90.0  # a fresh process imports torch and transformers first


def wait_for(predicate, timeout: float = BOOT_TIMEOUT, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_then_resume_continues_from_the_checkpoint_with_the_same_data(
    tmp_path: Path,
) -> None:
    config = tiny_config(steps=10, checkpoint_every=3)
    reference = latest_steps(_events_of_inline_run(tmp_path / "reference", config))

    runner = JobRunner(tmp_path / "runs")
    job = runner.start(config, name="killed")
    runner.pause(job.id, at_step=5)  # hold it mid-run, past the step-3 checkpoint
    wait_for(lambda: runner.job(job.id).state == "paused", what="the job to pause")
    run_dir = job.run_dir
    assert load_checkpoint(run_dir)["step"] == 3  # type: ignore[index]
    first_attempt = latest_steps(read_events(run_dir))
    assert max(first_attempt) == 5

    os.kill(job.pid, signal.SIGKILL)  # type: ignore[arg-type]
    wait_for(lambda: not runner.job(job.id).alive, 30, "the process to die")
    crashed = runner.job(job.id)
    assert crashed.state == "crashed" and crashed.resumable

    # A new runner (as after a workbench restart) finds the job and resumes it.
    again = JobRunner(tmp_path / "runs")
    assert [j.id for j in again.jobs()] == ["killed"]
    again.resume(job.id)
    final = again.wait(job.id, timeout=BOOT_TIMEOUT)
    assert final.state == "completed", (final, (run_dir / "worker.log").read_text()[-2000:])

    events = read_events(run_dir)
    assert [e.from_step for e in events if isinstance(e, ResumedEvent)] == [3]
    resumed = latest_steps(events)
    assert sorted(resumed) == list(range(1, 11))
    for step in (4, 5):  # recomputed after the kill: exactly what the first attempt did
        assert resumed[step].batch_hash == first_attempt[step].batch_hash
        assert resumed[step].loss == pytest.approx(first_attempt[step].loss, rel=1e-5)
    for step, event in reference.items():  # and the whole run matches an uninterrupted one
        assert resumed[step].batch_hash == event.batch_hash, step
        assert resumed[step].loss == pytest.approx(event.loss, rel=1e-4), step
    assert again.report(job.id)["steps_done"] == 10  # type: ignore[index]


def _events_of_inline_run(run_dir: Path, config) -> list[JobEvent]:  # type: ignore[no-untyped-def]
    run_distillation(config, run_dir)
    return read_events(run_dir)


async def test_pause_resume_cancel_and_streamed_events(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "runs")
    job = runner.start(tiny_config(steps=100_000, checkpoint_every=50, eval_every=10**6))
    seen: list[JobEvent] = []
    paused_at: int | None = None
    cancel_sent = False
    async for event in runner.events(job.id, poll=0.05):
        seen.append(event)
        if isinstance(event, StepEvent) and event.step == 3 and paused_at is None:
            runner.pause(job.id)
        if isinstance(event, StateEvent) and event.state == "paused" and paused_at is None:
            paused_at = event.step
            info = runner.job(job.id)
            assert info.state == "paused" and info.alive
            await runner.wait_async(job.id, timeout=1.0)  # stays paused: no steps meanwhile
            assert runner.job(job.id).step == paused_at
            assert max(latest_steps(read_events(job.run_dir))) == paused_at
            runner.resume(job.id)
        past_pause = isinstance(event, StepEvent) and paused_at is not None \
            and event.step >= paused_at + 3
        if past_pause and not cancel_sent:
            runner.cancel(job.id)
            cancel_sent = True
    # The iterator ended because the process exited after cancelling.
    final = runner.job(job.id)
    assert final.state == "cancelled" and not final.alive and final.resumable
    assert paused_at is not None and paused_at >= 3
    states = [e.state for e in seen if isinstance(e, StateEvent)]
    assert states[:2] == ["starting", "running"] and "paused" in states
    assert states[-1] == "cancelled"
    checkpoint = load_checkpoint(job.run_dir)
    assert checkpoint is not None and checkpoint["step"] == final.step > paused_at
    assert [e for e in seen if isinstance(e, CheckpointEvent)][-1].step == final.step
    with pytest.raises(Exception, match="not running"):
        runner.cancel(job.id)
    # Jobs reappear from their run directories in a fresh runner.
    listed = JobRunner(tmp_path / "runs").jobs()
    assert [(j.id, j.state) for j in listed] == [(job.id, "cancelled")]


def test_two_processes_with_gloo_end_with_identical_weights(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "runs")
    config = tiny_config(steps=4, checkpoint_every=2, eval_every=10**6)
    job = runner.start(config, name="ddp", processes=2)
    final = runner.wait(job.id, timeout=3 * BOOT_TIMEOUT)
    log = (job.run_dir / "worker.log").read_text()
    assert final.state == "completed", log[-3000:]
    digests = [(job.run_dir / "ranks" / f"rank-{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    report = runner.report(job.id)
    assert report is not None and report["world_size"] == 2
    assert report["tokens_seen"] == 4 * 2 * 4 * 32  # both ranks' batches count
    # The ranks trained (the weights moved away from the initial student's).
    import torch

    from engine.distill.build import build_student
    from engine.distill.checkpoints import trainable_state, weights_digest
    from engine.model.anatomy import layer_prefixes
    from engine.model.loading import load_model

    teacher = load_model(config.teacher)
    torch.manual_seed(config.seed)
    initial = build_student(teacher.model, [1, 2], "featural", {**config.hparams, "sparse": False})
    before = weights_digest(trainable_state(initial, layer_prefixes(initial, [1, 2])))
    assert digests[0].strip() != before


def _niceness(pid: int, thread: int | None = None) -> int:
    """A process's (or one of its threads') niceness, as the kernel reports it."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat"
    with open(path, encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[16])  # field 19 of proc(5); the split starts at field 3


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_jobs_train_at_a_lower_cpu_priority_than_the_workbench(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "runs")
    assert runner.niceness == 10
    parent = os.getpriority(os.PRIO_PROCESS, 0)
    job = runner.start(tiny_config(steps=100_000, checkpoint_every=10**6, eval_every=10**6))
    assert job.pid is not None
    try:
        assert _niceness(job.pid) == min(19, parent + 10)  # at once, before it trains
        autogroup = Path(f"/proc/{job.pid}/autogroup")
        if autogroup.exists():  # its own session's CPU share is lowered too
            assert autogroup.read_text().split()[-1] == str(min(19, parent + 10))
        wait_for(lambda: len(latest_steps(read_events(job.run_dir))) >= 2,
                 what="two training steps")
        # Every thread it started meanwhile (torch's included) inherited the priority.
        threads = [int(t) for t in os.listdir(f"/proc/{job.pid}/task")]
        assert len(threads) > 1
        assert all(_niceness(job.pid, t) > parent for t in threads)
    finally:
        runner.cancel(job.id)
        runner.wait(job.id, timeout=60.0)
    assert os.getpriority(os.PRIO_PROCESS, 0) == parent  # the parent keeps its priority


def test_job_niceness_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.distill.jobs import NICENESS_ENV
    from engine.errors import InputError

    assert JobRunner(tmp_path, niceness=0).niceness == 0
    monkeypatch.setenv(NICENESS_ENV, "4")
    assert JobRunner(tmp_path).niceness == 4
    monkeypatch.setenv(NICENESS_ENV, "lots")
    with pytest.raises(InputError, match=NICENESS_ENV):
        JobRunner(tmp_path)


def test_log_tail_lines_is_bounded_and_refuses_a_fifo(tmp_path: Path) -> None:
    from engine.distill.jobs import LOG_TAIL_BYTES, last_log_line, log_tail_lines

    log = tmp_path / "worker.log"
    log.write_text("x" * (3 * LOG_TAIL_BYTES) + "\nfirst\nsecond\nboom\n")
    assert log_tail_lines(log, 2) == ["second", "boom"]
    assert last_log_line(log) == "boom"
    assert log_tail_lines(tmp_path / "missing.log", 5) == []
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    assert log_tail_lines(fifo, 5) == [] and last_log_line(fifo) is None  # no hang


def test_middle_layer_reads_the_config_only() -> None:
    from engine.model.anatomy import num_layers
    from engine.model.loading import model_config
    from engine.services.jobs import middle_layer_of

    assert middle_layer_of("tiny-llama") == num_layers(model_config("tiny-llama")) // 2
