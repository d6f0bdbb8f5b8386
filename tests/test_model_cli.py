"""`mindset model ...`: each action writes a new model that loads, prints what changed and the
parameter counts, and refuses bad requests in one line with status 2 before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindset.cli import run
from tests.conftest import REPO_ROOT


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    file = tmp_path / "text.txt"
    file.write_text("Attention heads that matter stay; the others can go. " * 60,
                    encoding="utf-8")
    return file


def model_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert run([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_chain_of_actions_writes_models_that_load(tmp_path: Path, text_file: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from engine.model.architecture.attention import attention_shape
    from engine.model.architecture.gates import gates_of
    from engine.model.loading import load_model

    pruned = tmp_path / "pruned"
    assert run(["model", "prune-heads", "tiny-llama", "--heads", "1:0,2:3",
                "--out", str(pruned)]) == 0
    printed = capsys.readouterr().out
    assert "pruned 2 heads (named)" in printed and "layer 1: heads 4 -> 3" in printed
    assert "total" in printed and f"saved to {pruned}" in printed

    gated = model_json(capsys, "model", "add-gates", str(pruned), "--layers", "0-1",
                       "--out", str(tmp_path / "gated"))
    assert gated["after"]["total"] == gated["before"]["total"] + 4 + 3  # one gate per head
    grown = model_json(capsys, "model", "grow-heads", gated["out"], "--layer", "0",
                       "--count", "2", "--out", str(tmp_path / "grown"))
    assert grown["after"]["total"] > grown["before"]["total"]
    loaded = load_model(grown["out"])
    assert attention_shape(loaded.model, 0).heads == 6
    assert attention_shape(loaded.model, 1).heads == 3
    assert gates_of(loaded.model, 1) is not None and gates_of(loaded.model, 3) is None

    # The chain kept the function: growing and gating are exact, pruning equals masking.
    original = load_model(str(pruned)).model
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, original(ids).logits, atol=1e-5)

    inspected = model_json(capsys, "model", "inspect", grown["out"], "--calibration",
                           str(text_file))
    assert [row["heads"] for row in inspected["layers"]] == [6, 3, 3, 4]
    assert len(inspected["layers"][0]["importance"]) == 6
    assert inspected["counts"]["total"] == grown["after"]["total"]

    # A result evaluates like any model.
    assert run(["eval", "--model", grown["out"], "--data", str(text_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] > 1


def test_pruning_by_importance_and_healing(tmp_path: Path, text_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    pruned = model_json(capsys, "model", "prune-heads", "tiny-gpt2", "--fraction", "0.25",
                        "--calibration", str(text_file), "--out", str(tmp_path / "p"))
    assert pruned["changes"][0].startswith("pruned 4 heads (importance)")
    healed = model_json(capsys, "model", "heal", pruned["out"], "--teacher", "tiny-gpt2",
                        "--data", str(text_file), "--steps", "3", "--block-size", "32",
                        "--batch-size", "2", "--out", str(tmp_path / "h"))
    assert healed["report"]["steps"] == 3
    assert Path(healed["out"], "model.safetensors").is_file()


@pytest.mark.parametrize(("argv", "message"), [
    (["prune-heads", "tiny-llama", "--heads", "1:9"], "head 9 is out of range"),
    (["prune-heads", "tiny-llama", "--heads", "1:0,1:1,1:2,1:3"], "every head"),
    (["prune-heads", "tiny-llama", "--heads", "1-0"], "layer:head"),
    (["prune-heads", "tiny-llama"], "heads (layer:head pairs) or a fraction"),
    (["grow-heads", "tiny-llama", "--layer", "1", "--count", "1"], "KV-group mismatch"),
    (["grow-heads", "tiny-llama", "--layer", "1", "--count", "64"], "past the limit"),
    (["grow-heads", "tiny-llama", "--layer", "7", "--count", "2"], "layer 7"),
    (["drop-layer", "tiny-llama", "--layer", "9"], "out of range"),
])
def test_bad_requests_are_one_line_with_status_2(tmp_path: Path, argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    assert run(["model", *argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not out.exists()  # refused before anything was written


def test_an_occupied_output_directory_is_refused(tmp_path: Path) -> None:
    occupied = tmp_path / "notes"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "mindset.cli", "model", "add-gates",
                           "tiny-gpt2", "--out", str(occupied)], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2 and "not empty" in done.stderr
    assert "Traceback" not in done.stderr
    assert (occupied / "keep.txt").read_text(encoding="utf-8") == "mine"
