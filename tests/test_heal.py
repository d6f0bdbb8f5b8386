"""Prune, then heal: distillation from the original model into a reshaped one."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.distill.heal import (
    HealConfig,
    HealProgress,
    gate_parameters,
    heal,
    heal_blocks,
    held_out_perplexity,
)
from engine.distill.objective import NonFiniteLossError, ce_loss, kd_loss
from engine.errors import InputError
from engine.model.architecture.gates import insert_gates
from engine.model.tiny import TINY_VOCAB, byte_level_tokenizer, tiny_model

BLOCK = 16


def random_blocks(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VOCAB, (count, BLOCK), generator=generator)


def pruned(teacher: Any) -> Any:
    """The teacher with half of layer 1's MLP neurons and one head of layer 2 zeroed."""
    student = copy.deepcopy(teacher)
    blocks = student.transformer.h
    with torch.no_grad():
        blocks[1].mlp.c_fc.weight[:, :64] = 0.0
        blocks[1].mlp.c_fc.bias[:64] = 0.0
        blocks[2].attn.c_proj.weight[:16] = 0.0  # Conv1D [in, out]: head 0's input rows
    return student


def heldout_kl(student: Any, teacher: Any,
               blocks: torch.Tensor) -> float:
    with torch.no_grad():
        return float(kd_loss(student(input_ids=blocks).logits, teacher(input_ids=blocks).logits))


def config(**overrides: object) -> HealConfig:
    values: dict[str, object] = dict(steps=12, batch_size=4, block_size=BLOCK,
                                     warmup=2, seed=0)
    values.update(overrides)
    return HealConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def teacher() -> Any:
    # Wider initial weights than the default: peaked next-token distributions, so pruning
    # costs a clear KL to heal.
    return tiny_model("gpt2", initializer_range=0.1)


@pytest.fixture(scope="module")
def train_blocks() -> torch.Tensor:
    return random_blocks(24, seed=1)


def test_healing_lowers_the_kl_to_the_teacher_on_held_out_blocks(
        teacher: Any, train_blocks: torch.Tensor) -> None:
    student = pruned(teacher)
    heldout = random_blocks(8, seed=2)
    before = heldout_kl(student, teacher, heldout)
    seen: list[HealProgress] = []
    report = heal(student, teacher, train_blocks, config(steps=25), progress=seen.append)
    after = heldout_kl(student, teacher, heldout)
    assert after < 0.6 * before, (before, after)
    assert [p.step for p in seen] == list(range(1, 26)) and seen[0].total == 25
    assert seen[0].lr < seen[2].lr  # warmup, then the decay
    assert seen[-1].lr < seen[2].lr
    assert report.steps == 25 and not report.stopped_early
    assert report.first_loss is not None and report.last_loss is not None
    assert report.last_loss < report.first_loss
    assert report.trainable_parameters == sum(p.numel() for p in student.parameters())
    assert report.as_dict()["train"] == "all"
    assert not student.training and not teacher.training


def test_train_attention_leaves_mlps_and_embeddings_bit_identical(
        teacher: Any, train_blocks: torch.Tensor) -> None:
    student = pruned(teacher)
    frozen_before = student.transformer.ln_f.weight
    frozen_before.requires_grad_(False)  # a flag the caller set: it must survive healing
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    report = heal(student, teacher, train_blocks, config(steps=4, train="attention"))
    changed = {name for name, p in student.named_parameters()
               if not torch.equal(p, before[name])}
    assert changed, "the attention weights did not train"
    assert all(".attn." in name for name in changed)
    assert any(name.endswith("attn.c_attn.weight") for name in changed)
    attention_size = sum(p.numel() for name, p in student.named_parameters() if ".attn." in name)
    assert report.trainable_parameters == attention_size
    assert not frozen_before.requires_grad
    assert all(p.requires_grad for name, p in student.named_parameters()
               if name != "transformer.ln_f.weight")


def test_all_but_embeddings_keeps_the_embeddings(
        teacher: Any, train_blocks: torch.Tensor) -> None:
    student = pruned(teacher)
    wte = student.transformer.wte.weight.detach().clone()
    wpe = student.transformer.wpe.weight.detach().clone()
    mlp = student.transformer.h[1].mlp.c_fc.weight.detach().clone()
    heal(student, teacher, train_blocks, config(steps=3, train="all-but-embeddings"))
    assert torch.equal(student.transformer.wte.weight, wte)
    assert torch.equal(student.transformer.wpe.weight, wpe)
    assert not torch.equal(student.transformer.h[1].mlp.c_fc.weight, mlp)


def test_the_same_seed_gives_identical_weights(
        teacher: Any, train_blocks: torch.Tensor) -> None:
    start = pruned(teacher)
    runs = []
    for seed in (5, 5, 6):
        student = copy.deepcopy(start)
        heal(student, teacher, train_blocks, config(steps=4, seed=seed, batch_size=2))
        runs.append(student.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_gate_sparsity_lowers_the_gates(teacher: Any,
                                        train_blocks: torch.Tensor) -> None:
    gated = insert_gates(teacher)
    means = {}
    for sparsity in (0.0, 2.0):
        student = copy.deepcopy(gated)
        seen: list[HealProgress] = []
        report = heal(student, teacher, train_blocks,
                      config(steps=10, lr=0.05, train="gates", gate_sparsity=sparsity),
                      progress=seen.append)
        gates = torch.cat([torch.sigmoid(g.detach()) for g in gate_parameters(student)])
        assert report.gate_mean == pytest.approx(float(gates.mean()))
        assert report.trainable_parameters == gates.numel()
        assert (seen[0].gate_penalty > 0) == (sparsity > 0)
        means[sparsity] = float(gates.mean())
    assert means[2.0] < means[0.0] - 0.05, means


def test_bad_configs_raise_input_errors(teacher: Any,
                                        train_blocks: torch.Tensor) -> None:
    for bad in (dict(steps=0), dict(lr=0.0), dict(lr=-1e-3), dict(train="mlp"),
                dict(lr=math.nan), dict(steps=1.5), dict(warmup=20), dict(batch_size=0),
                dict(temperature=0.0), dict(gate_sparsity=-1.0), dict(block_size=1)):
        with pytest.raises(InputError):
            config(**bad).validate()
    student = copy.deepcopy(teacher)
    before = [p.detach().clone() for p in student.parameters()]
    for bad in (dict(train="gates"), dict(train="feedback"), dict(gate_sparsity=0.1),
                dict(block_size=BLOCK * 2)):
        with pytest.raises(InputError) as raised:
            heal(student, teacher, train_blocks, config(**bad))
        assert "\n" not in str(raised.value)
    gated = insert_gates(teacher)
    gated.feedback_probe = torch.nn.Linear(2, 2)  # a trainable set without the gates
    with pytest.raises(InputError, match="frozen"):
        config(train="feedback", gate_sparsity=0.1).validate(gated)
    with pytest.raises(InputError, match="vocabulary"):
        heal(student, teacher, torch.full((2, BLOCK), TINY_VOCAB), config())
    with pytest.raises(InputError, match="copy"):
        heal(teacher, teacher, train_blocks, config())
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_should_stop_cancels_early(teacher: Any,
                                   train_blocks: torch.Tensor) -> None:
    seen: list[HealProgress] = []
    report = heal(pruned(teacher), teacher, train_blocks, config(steps=50),
                  progress=seen.append, should_stop=lambda: len(seen) >= 3)
    assert report.stopped_early and report.steps == 3 and len(seen) == 3
    assert report.total_steps == 50


def test_a_non_finite_loss_stops_with_a_clear_error(teacher: Any,
                                                    train_blocks: torch.Tensor) -> None:
    broken = copy.deepcopy(teacher)
    with torch.no_grad():
        broken.transformer.ln_f.weight.fill_(math.nan)
    student = pruned(teacher)
    student.transformer.wpe.weight.requires_grad_(False)
    with pytest.raises(NonFiniteLossError, match="step 1"):
        heal(student, broken, train_blocks, config(train="attention"))
    assert not student.transformer.wpe.weight.requires_grad
    assert student.transformer.wte.weight.requires_grad and not student.training


def test_heal_blocks_reads_text_files(tmp_path: Path) -> None:
    tokenizer = byte_level_tokenizer()
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 4, encoding="utf-8")
    blocks = heal_blocks(tokenizer, [str(text)], 16)
    assert blocks.shape == (11, 16) and blocks.dtype == torch.long
    assert tokenizer.decode(blocks[0].tolist()) == "the quick brown "
    assert heal_blocks(tokenizer, [str(tmp_path)], 16, limit_blocks=3).shape == (3, 16)
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    with pytest.raises(InputError, match="fewer than one block"):
        heal_blocks(tokenizer, [str(short)], 16)
    with pytest.raises(InputError):
        heal_blocks(tokenizer, [str(text)], 16, limit_blocks=0)


def test_held_out_perplexity_is_the_exp_of_the_mean_cross_entropy(
        teacher: Any) -> None:
    blocks = random_blocks(5, seed=3)
    with torch.no_grad():
        expected = math.exp(float(ce_loss(teacher(input_ids=blocks).logits, blocks)))
    teacher.train()
    assert held_out_perplexity(teacher, blocks, batch_size=2) == pytest.approx(expected,
                                                                               rel=1e-5)
    assert teacher.training  # the caller's mode is kept
    teacher.eval()
    worse = held_out_perplexity(pruned(teacher), blocks)
    assert worse != pytest.approx(expected)
