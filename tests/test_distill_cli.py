"""``mindset distill`` in the foreground: a run, its report, resume, and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mindset.cli import run
from tests.test_distill_support import teacher_dir, text_file

BASE = ["distill", "--layers", "1", "--block-size", "32", "--batch-size", "2", "--threads", "1",
        "--hparam", "num_subkeys=16", "--hparam", "topk=4", "--hparam", "query_dim=16"]


def test_foreground_run_prints_the_report_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = [*BASE, "--teacher", str(teacher_dir()), "--data", str(text_file()), "--steps", "3",
            "--local-steps", "2", "--out", str(out)]
    assert run([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps_done"] == 5 and report["layers"] == [1]
    assert (out / "report.txt").exists() and (out / "student" / "mindset_student.json").exists()

    assert run(args) == 2  # the directory holds a run: refuse to overwrite it
    assert "add --resume" in capsys.readouterr().err
    assert run(["distill", "--out", str(out), "--resume"]) == 0  # its layers: config.json
    assert "gap closed" in capsys.readouterr().out


def test_a_data_free_run_reuses_its_sampled_text_unless_told_to_resample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINDSET_HOME", str(tmp_path / "home"))
    args = [*BASE, "--teacher", str(teacher_dir()), "--steps", "1", "--data-free-blocks", "3",
            "--heldout-blocks", "1", "--seed", "11"]

    def events(name: str) -> list[str]:
        lines = (tmp_path / name / "events.jsonl").read_text().splitlines()
        return [json.loads(line).get("phase", "") for line in lines if line]

    for name, extra in (("a", []), ("b", []), ("c", ["--resample"])):
        assert run([*args, "--out", str(tmp_path / name), "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["data"] == \
            "sampled from the teacher"
    sampling = "sampling training text from the teacher"
    assert sampling in events("a") and sampling not in events("b") and sampling in events("c")
    assert any(phase.startswith("reusing") for phase in events("b"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "/nonexistent/corpus.txt"], "no such file or folder"),
        (["--layers", "9"], "unknown layer 9: the teacher has 4 layers"),
        (["--memory", "featural", "--hparam", "topk=99"], "topk=99 exceeds num_subkeys"),
    ],
)
def test_bad_input_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = [*BASE, "--teacher", str(teacher_dir()), "--data", str(text_file()), "--steps", "2",
            "--out", str(tmp_path / "bad"), *extra]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("mindset: error: ")


# -- --out ---------------------------------------------------------------------------------

def distill_args(out: str) -> list[str]:
    return ["distill", "--teacher", str(teacher_dir()), "--layers", "1", "--steps", "1",
            "--block-size", "32", "--data", str(text_file()), "--out", out]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file", "is a file; give a directory"),
        ("under-file", "is a file, so no directory can be made"),
        ("proc", "cannot create anything in /proc"),
        ("proc-self", "cannot create anything in /proc/self"),
        ("read-only", "cannot create anything in"),
    ],
)
def test_out_that_cannot_be_a_run_directory_is_one_line_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, message: str
) -> None:
    """Checked before any model loads: exit 2, one line, nothing created (with or without
    --resume or --background)."""
    (tmp_path / "plain.txt").write_text("not a directory")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if where == "read-only" and os.access(locked, os.W_OK):
        pytest.skip("root writes through chmod 500; /proc and the file cases cover this")
    out = {"file": tmp_path / "plain.txt", "under-file": tmp_path / "plain.txt" / "run",
           "proc": Path("/proc/mindset-run"), "proc-self": Path("/proc/self/mindset/run"),
           "read-only": locked / "run"}[where]
    before = listing(tmp_path)
    for extra in ([], ["--resume"], ["--background"]):
        assert run([*distill_args(str(out)), *extra]) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("mindset: error: --out ") and message in line, line
    assert listing(tmp_path) == before
    assert (tmp_path / "plain.txt").read_text() == "not a directory"
    if where != "file":
        assert not out.exists()
