"""``mindset distill`` in the foreground: a run, its report, resume, and clear errors."""

from __future__ import annotations

import json
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
    assert run(["distill", "--layers", "1", "--out", str(out), "--resume"]) == 0
    assert "gap closed" in capsys.readouterr().out


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
