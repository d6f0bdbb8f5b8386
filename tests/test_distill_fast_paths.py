"""The two shortcuts of the loop: captured pairs for the layer-local stage, and the student
started at its first replaced layer in the end-to-end stage. Both must change speed only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.distill import events as ev
from engine.distill.checkpoints import load_checkpoint
from engine.distill.config import DistillConfig
from engine.distill.job_events import LocalPairsEvent, latest_steps, read_events
from engine.distill.local_pairs import capture_local_pairs
from engine.distill.loop import run_distillation
from engine.errors import InputError
from engine.model.anatomy import layer_mlps
from engine.model.loading import load_model
from engine.model.partial_forward import (
    capture_layer_input,
    logits_from_layer,
    supports_partial_forward,
)
from engine.model.surgery import convert
from tests.test_distill_support import tiny_config


def test_starting_at_a_layer_gives_the_full_forward_logits() -> None:
    teacher = load_model("tiny-llama")
    student = convert(teacher, [2], "featural", init="random", keys="flat", slots=32, topk=8)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), capture_layer_input(teacher.model, 2) as seen:
        teacher_logits = teacher.model(input_ids=ids).logits
        student_logits = student(input_ids=ids).logits
        from_layer = logits_from_layer(student, seen["hidden"], 2)
        teacher_from_layer = logits_from_layer(teacher.model, seen["hidden"], 2)
    assert seen["hidden"].shape == (2, 24, teacher.model.config.hidden_size)
    assert torch.allclose(from_layer, student_logits, atol=1e-5)
    assert torch.allclose(teacher_from_layer, teacher_logits, atol=1e-5)
    # The memory layer really changed the output, so the comparison above is not vacuous.
    assert not torch.allclose(student_logits, teacher_logits, atol=1e-3)
    assert supports_partial_forward(student)
    assert not supports_partial_forward(load_model("tiny-gpt2").model)


def test_captured_pairs_are_the_mlp_inputs_and_outputs() -> None:
    teacher = load_model("tiny-llama")
    blocks = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(4))
    mlps = layer_mlps(teacher.model, [1, 3])
    pairs = capture_local_pairs(teacher.model, mlps, blocks, tokens=40)
    assert pairs.tokens == 48  # whole blocks: ceil(40 / 16) = 3 blocks
    x = pairs.inputs[3][:16].float()
    with torch.no_grad():
        expected = mlps[3](x)
    assert torch.allclose(pairs.outputs[3][:16].float(), expected, atol=0.05, rtol=0.02)
    first, _ = pairs.batch(7, 32, seed=1)
    again, _ = pairs.batch(7, 32, seed=1)
    other, _ = pairs.batch(8, 32, seed=1)
    assert torch.equal(first[1], again[1]) and not torch.equal(first[1], other[1])
    assert first[1].shape == (1, 32, teacher.model.config.hidden_size)


def test_local_stage_on_captured_pairs_fits_and_resumes_identically(tmp_path: Path) -> None:
    settings = dict(local_steps=12, steps=2, local_tokens=256, local_batch_tokens=64,
                    schedule="constant", lr=3e-2, checkpoint_every=4)
    reference_dir = tmp_path / "reference"
    run_distillation(tiny_config(**settings), reference_dir)
    reference = latest_steps(read_events(reference_dir))
    local = [reference[s].local or 0.0 for s in range(1, 13)]
    assert sum(local[-3:]) < 0.85 * sum(local[:3]), local
    assert reference[1].stage == "local" and reference[13].stage == "e2e"
    assert reference[12].tokens_seen == 12 * 64
    assert [e.tokens for e in read_events(reference_dir)
            if isinstance(e, LocalPairsEvent)] == [256]

    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    ev.write_control(run_dir, "cancel", at_step=6)
    assert run_distillation(tiny_config(**settings), run_dir) == {}
    assert load_checkpoint(run_dir)["step"] == 6  # type: ignore[index]
    ev.write_control(run_dir, "run")
    run_distillation(tiny_config(**settings), run_dir)
    resumed = latest_steps(read_events(run_dir))
    for step, event in reference.items():
        assert resumed[step].batch_hash == event.batch_hash, step
        assert resumed[step].loss == pytest.approx(event.loss, rel=1e-5), step


def test_local_tokens_must_not_be_negative() -> None:
    with pytest.raises(InputError, match="local_tokens"):
        DistillConfig(local_tokens=-1).validate()
    with pytest.raises(InputError, match="local_batch_tokens"):
        DistillConfig(local_batch_tokens=0).validate()


def test_pruned_control_is_the_teacher_mlp_cut_to_its_most_important_neurons() -> None:
    from engine.distill.build import PrunedMLP, build_student

    teacher = load_model("tiny-llama")
    neurons = teacher.model.config.intermediate_size
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = teacher.model(input_ids=ids).logits
        whole = build_student(teacher.model, [1], "dense", {"width": neurons, "init": "mlp"},
                              calibration=ids)
        cut = build_student(teacher.model, [1], "dense", {"width": 8, "init": "mlp"},
                            calibration=ids)
        assert isinstance(layer_mlps(cut, [1])[1], PrunedMLP)
        assert torch.allclose(whole(input_ids=ids).logits, expected, atol=1e-4)
        assert not torch.allclose(cut(input_ids=ids).logits, expected, atol=1e-3)
    trainable = [n for n, p in cut.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1.mlp." in n for n in trainable)
    with pytest.raises(InputError, match="exceeds"):
        build_student(teacher.model, [1], "dense", {"width": neurons + 1, "init": "mlp"})
    with pytest.raises(InputError, match="init"):
        build_student(teacher.model, [1], "dense", {"width": 4, "init": "copy"})
