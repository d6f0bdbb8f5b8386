"""Associative memory: reads, novelty-gated inserts, LRFU eviction, recombination, store I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import InputError
from engine.model.loading import load_model
from engine.model.memory_layers import AssociativeConfig
from engine.model.memory_layers.associative import STORE_FILE, AssociativeMemory
from engine.model.student import save_student
from engine.model.surgery import convert, memory_layers

SMALL = dict(heads=2, key_dim=4, value_dim=3, topk=2, capacity=64)


def memory(**overrides: object) -> AssociativeMemory:
    params: dict[str, object] = dict(SMALL)
    params.update(overrides)
    torch.manual_seed(0)
    module = AssociativeMemory(AssociativeConfig.from_hparams(8, params))
    with torch.no_grad():
        module.out_proj.weight.normal_()
    return module


def tie_queries_to_keys(module: AssociativeMemory) -> None:
    """Queries equal keys, so a token already stored finds itself at distance 0."""
    with torch.no_grad():
        module.query_proj.weight.copy_(module.key_proj.weight)
        module.query_proj.bias.copy_(module.key_proj.bias)


def test_training_inserts_novel_entries_and_evaluation_does_not() -> None:
    module = memory()
    tie_queries_to_keys(module)
    x = torch.randn(5, 8)
    module.eval()
    module(x)
    assert len(module) == 0
    module.train()
    module(x)
    assert len(module) == 5 * 2  # every token and head is novel in an empty memory
    module(x)
    assert len(module) == 10  # the same tokens again: found at distance 0, not novel
    module(torch.randn(3, 8) * 10)
    assert len(module) == 16


def test_insert_policy_always_and_never() -> None:
    always = memory(insert="always").eval()
    always(torch.randn(4, 8))
    assert len(always) == 8
    never = memory(insert="never").train()
    never(torch.randn(4, 8))
    assert len(never) == 0


def test_reads_return_the_nearest_stored_entries() -> None:
    module = memory(topk=1, insert="never", heads=1)
    tie_queries_to_keys(module)
    x = torch.randn(6, 8)
    with torch.no_grad():
        keys = module.key_proj(x)
        module.fill(keys, torch.randn(6, 3))
    distances, positions = module.cache.search(module.query_proj(x), 1)
    assert torch.equal(positions[:, 0], torch.arange(6))
    assert distances.max() < 1e-5


def test_gradients_reach_the_projections_through_the_straight_through_estimator() -> None:
    module = memory(insert="never", heads=1)
    x = torch.randn(4, 8)
    with torch.no_grad():
        module.fill(torch.randn(10, 4), torch.randn(10, 3))
    # Freeze the token's own entry out of the picture: only returned entries carry gradient
    # into value_proj via dValueInserted = dValueReturned.
    module(x).pow(2).sum().backward()
    for proj in (module.query_proj, module.key_proj, module.value_proj, module.out_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_gradcheck_float64_on_the_differentiable_path() -> None:
    module = memory(insert="never").double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_capacity_evicts_the_least_recently_frequently_used() -> None:
    module = memory(capacity=4, topk=1, heads=1, insert="never", decay=0.5)
    tie_queries_to_keys(module)
    with torch.no_grad():
        keys = torch.eye(4)
        module.fill(keys, torch.zeros(4, 3))
    # Read entry 2 often: it must survive when new entries push others out.
    for _ in range(3):
        module.cache.touch(torch.tensor([[2]]))
    module.cache.add(torch.full((2, 4), 5.0), torch.ones(2, 3))
    assert len(module) == 4
    remaining = {tuple(row.tolist()) for row in module.cache.keys}
    assert tuple(keys[2].tolist()) in remaining
    assert (5.0, 5.0, 5.0, 5.0) in remaining
    assert module.cache.evicted == 2


def test_recombination_merges_near_duplicates_returned_together() -> None:
    module = memory(heads=1, topk=2, merge_threshold=0.01, insert="never")
    with torch.no_grad():
        module.fill(torch.tensor([[1.0, 0, 0, 0], [1.0, 0.01, 0, 0], [0, 0, 9.0, 0]]),
                    torch.tensor([[1.0, 0, 0], [3.0, 0, 0], [0, 0, 1.0]]))
    merged = module.cache.recombine(torch.tensor([[0, 1]]), 0.01)
    assert merged == 1 and len(module) == 2
    torch.testing.assert_close(module.cache.values[0], torch.tensor([2.0, 0, 0]))


def test_associative_students_save_and_load_their_tables_through_the_store(
    tmp_path: Path,
) -> None:
    teacher = load_model("tiny-gpt2")
    student = convert(teacher, [1, 2], "associative", init="mlp", base="none", key_dim=8,
                      value_dim=16, topk=4, capacity=2048)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    student.train()
    student(input_ids=ids)  # training inserts entries beyond the initial ones
    student.eval()
    sizes = {layer: len(m) for layer, m in memory_layers(student).items()}
    save_student(student, tmp_path / "s", teacher.tokenizer)
    assert (tmp_path / "s" / "memory" / STORE_FILE).is_file()

    from engine.memory import MemoryStore

    with MemoryStore.open(tmp_path / "s" / "memory" / STORE_FILE) as store:
        assert sorted(store.table_names()) == ["layer1", "layer2"]
        assert len(store.table("layer1")) == sizes[1]

    loaded = load_model(str(tmp_path / "s"))
    assert {layer: len(m) for layer, m in memory_layers(loaded.model).items()} == sizes
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits,
                                   student(input_ids=ids).logits)
        out = loaded.model.generate(ids[:, :5], max_new_tokens=4, do_sample=False,
                                    pad_token_id=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("init", ["mlp", "data", "random"])
def test_associative_conversion_of_both_families(family: str, init: str) -> None:
    teacher = load_model(family)
    calibration = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    student = convert(teacher, [0, 3], "associative", init=init, calibration=calibration,
                      base="none", key_dim=8, value_dim=16, topk=4, capacity=1024)
    layers = memory_layers(student)
    assert sorted(layers) == [0, 3]
    assert all(isinstance(m, AssociativeMemory) for m in layers.values())
    if init != "random":
        assert all(len(m) > 0 for m in layers.values())
    with torch.no_grad():
        logits = student(input_ids=calibration).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        (dict(topk=10, capacity=5), "topk=10 exceeds capacity=5"),
        (dict(key_dim=0), "key_dim=0 must be a positive integer"),
        (dict(insert="sometimes"), "insert='sometimes' must be train, always or never"),
        (dict(decay=1.5), "decay=1.5 must be in"),
        (dict(novelty_threshold=-1), "novelty_threshold=-1 must be a number >= 0"),
        (dict(slots=3), "unknown associative hyper-parameter"),
    ],
)
def test_impossible_associative_settings_are_refused(hparams: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        AssociativeConfig.from_hparams(8, hparams)
