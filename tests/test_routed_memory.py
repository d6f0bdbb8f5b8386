"""Routed keys: exact with every group read, the router's top-k, the read paths, growth,
memory-mapped loading and bad settings (tiny models)."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InputError
from engine.model.loading import load_model
from engine.model.memory_layers.config import FeaturalConfig
from engine.model.surgery import add_memory_slots, convert, memory_layers


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def teacher(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model(request.param).model


def _ids(model: torch.nn.Module, batch: int = 2, length: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


def _routed(teacher: torch.nn.Module, **hparams: object) -> torch.nn.Module:
    return convert(teacher, "all", "featural", keys="routed", group_size=8,
                   calibration=_ids(teacher, 4, 32), **hparams)


def test_every_group_read_is_the_mlp_exactly(teacher: torch.nn.Module) -> None:
    ids = _ids(teacher)
    student = _routed(teacher, read_share=1.0)
    with torch.no_grad():
        expected = teacher(input_ids=ids).logits
        got = student(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-5


def test_a_partial_read_changes_the_output(teacher: torch.nn.Module) -> None:
    ids = _ids(teacher)
    student = _routed(teacher, read_share=0.25)
    with torch.no_grad():
        assert (student(input_ids=ids).logits - teacher(input_ids=ids).logits).abs().max() > 1e-4


def test_router_topk_matches_brute_force(teacher: torch.nn.Module) -> None:
    memory = next(iter(memory_layers(_routed(teacher, read_share=0.25)).values()))
    routed = memory.routed
    x = torch.randn(64, teacher.config.hidden_size)
    full = x @ (routed.router_up @ routed.router_down).t() + routed.router_bias  # every group
    expected = full.argsort(dim=-1, descending=True)[:, : routed.groups_read]
    got = routed.route(x)
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)


def test_read_paths_agree_with_a_masked_reference(teacher: torch.nn.Module) -> None:
    memory = next(iter(memory_layers(_routed(teacher, read_share=0.375)).values()))
    routed = memory.routed
    x = torch.randn(9, teacher.config.hidden_size)
    with torch.no_grad():
        weights = routed.slot_weights(x)
        groups = routed.route(x)
        mask = torch.zeros(x.shape[0], routed.num_groups).scatter_(1, groups, 1.0)
        mask = mask.repeat_interleave(routed.group_size, dim=1)
        reference = (weights * mask) @ memory.values + memory.out_bias
        dispatched = memory(x)  # no gradients: group by group
        one_by_one = torch.cat([memory(row.view(1, -1)) for row in x])  # generation path
    with torch.enable_grad():
        padded = memory(x)  # batched products, as in training
        one_with_grad = torch.cat([memory(row.view(1, -1)) for row in x])
        one_with_grad.sum().backward()  # the single-token read is differentiable too
    assert memory.routed.group_keys.grad is not None and memory.values.grad is not None
    for got in (dispatched, one_by_one, padded.detach(), one_with_grad.detach()):
        assert (got - reference).abs().max() < 1e-5


def test_gradients_reach_only_read_slots(teacher: torch.nn.Module) -> None:
    memory = next(iter(memory_layers(_routed(teacher, read_share=0.25)).values()))
    x = torch.randn(1, teacher.config.hidden_size)
    memory(x).pow(2).sum().backward()
    read = set(memory.routed.route(x)[0].tolist())
    grads = memory.values.grad.view(memory.routed.num_groups, -1).abs().sum(-1)
    touched = {int(g) for g in torch.nonzero(grads).flatten()}
    assert touched and touched <= read


def test_cost_share_formula() -> None:
    config = FeaturalConfig.from_hparams(576, {"keys": "routed"}, intermediate_size=1536,
                                         activation="silu", gated=True)
    assert config.num_groups == 24 and config.groups_read == 8
    expected = (576 * 64 + 64 * 24 + 8 * 64 * 576 * 3) / (1536 * 576 * 3)
    assert config.cost_share(1536) == pytest.approx(expected)
    assert config.cost_share(1536) <= 0.4
    # Twice the slots read at half the share: the same per-token read, a slightly dearer router.
    wide = FeaturalConfig.from_hparams(576, {"keys": "routed", "slots": 3072,
                                             "read_share": 1 / 6},
                                       intermediate_size=1536, activation="silu", gated=True)
    assert wide.groups_read == 8
    assert wide.cost_share(1536) - config.cost_share(1536) == pytest.approx(
        64 * 24 / (1536 * 576 * 3))
    # Flat keys score all 1,536 keys and up keys, then read 512 values: 0.78 of the MLP.
    flat = FeaturalConfig.from_hparams(576, {"keys": "flat", "topk": 512},
                                       intermediate_size=1536, activation="silu", gated=True)
    assert flat.cost_share(1536) == pytest.approx((2 * 1536 + 512) / (3 * 1536))


def test_more_slots_than_neurons(teacher: torch.nn.Module) -> None:
    inner = memory_layers(_routed(teacher, read_share=1.0))[0].routed.num_slots
    student = _routed(teacher, read_share=1.0, slots=2 * inner)
    memory = memory_layers(student)[0]
    assert memory.num_slots == 2 * inner
    ids = _ids(teacher)
    with torch.no_grad():  # split neurons sum back to the neuron (keys perturbed by 1e-3)
        gap = (student(input_ids=ids).logits - teacher(input_ids=ids).logits).abs().max()
    assert gap < 5e-2


def test_added_slots_leave_outputs_alone_and_are_routable(teacher: torch.nn.Module,
                                                          tmp_path) -> None:
    from engine.model.student import load_student_model, save_student

    student = _routed(teacher, read_share=0.25)
    memory = memory_layers(student)[1]
    hidden = teacher.config.hidden_size
    x = torch.randn(32, hidden)
    with torch.no_grad():
        before = memory(x)
    query = torch.randn(hidden) * 4
    keys = query.view(1, -1) / query.norm()
    values = torch.randn(1, hidden)
    slots = add_memory_slots(student, 1, keys, values, query)
    assert slots == [memory.num_slots - memory.routed.group_size]
    new_group = memory.routed.num_groups - 1
    assert new_group in memory.routed.route(query.view(1, -1))[0].tolist()
    with torch.no_grad():
        chosen = memory.routed.route(x)
        untouched = ~(chosen == new_group).any(-1)
        assert untouched.sum() >= 24  # random inputs do not pick the new group
        assert (memory(x)[untouched] - before[untouched]).abs().max() < 1e-6
    save_student(student, tmp_path / "grown")
    loaded = load_student_model(tmp_path / "grown")
    assert memory_layers(loaded)[1].num_slots == memory.num_slots
    ids = _ids(teacher)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, student(input_ids=ids).logits,
                              atol=1e-6)


def test_fact_groups_are_read_in_addition_and_never_displace(teacher: torch.nn.Module,
                                                              tmp_path) -> None:
    from engine.model.memory_trace import memory_trace
    from engine.model.student import load_student_model, save_student

    student = _routed(teacher, read_share=0.25)
    memory = memory_layers(student)[1]
    routed = memory.routed
    hidden = teacher.config.hidden_size
    x = torch.randn(32, hidden)
    query = torch.randn(hidden) * 4
    x[0] = query
    with torch.no_grad():
        before = memory(x)
        regular = routed.route(x)
    for _ in range(2):  # two facts on the same query: both read there, neither elsewhere
        keys = query.view(1, -1) / query.norm()
        add_memory_slots(student, 1, keys, torch.randn(1, hidden), query, fact=True)
    assert routed.fact_groups == 2 and memory.config.fact_groups == 2
    with pytest.raises(InputError, match="only more facts"):
        add_memory_slots(student, 1, keys, torch.randn(1, hidden), query)
    s = routed.group_size
    with torch.no_grad():
        assert torch.equal(routed.route(x), regular)  # facts take no regular read away
        facts = routed.route_facts(x)
        assert facts[0].all() and not facts[1:].any()
        after = memory(x)
        assert torch.equal(after[1:], before[1:])
        added = routed.slot_weights(x[:1])[:, -2 * s:] @ memory.values[-2 * s:]
        assert torch.allclose(after[0] - before[0], added[0], rtol=1e-4, atol=1e-4)
        one_by_one = torch.cat([memory(row.view(1, -1)) for row in x])
        memory.trace_reads = []
        traced = memory(x)
        reads = memory.trace_reads[0]
        memory.trace_reads = None
    with torch.enable_grad():
        padded = memory(x)
    for got in (one_by_one, traced, padded.detach()):
        assert torch.allclose(got, after, rtol=1e-5, atol=1e-5)
    fact_slots = set(range(memory.num_slots - 2 * s, memory.num_slots))
    assert fact_slots & set(reads.slots[0].tolist())
    assert not fact_slots & set(reads.slots[1:].flatten().tolist())
    save_student(student, tmp_path / "facts")
    loaded = load_student_model(tmp_path / "facts")
    assert memory_layers(loaded)[1].routed.fact_groups == 2
    with torch.no_grad(), memory_trace(loaded):
        assert torch.allclose(memory_layers(loaded)[1](x), after, rtol=1e-5, atol=1e-5)
    memory.remove_last_group()
    memory.remove_last_group()
    assert routed.fact_groups == 0 and memory.config.fact_groups == 0
    with torch.no_grad():
        assert torch.equal(memory(x), before)


def test_mapped_routed_student_matches_in_ram(teacher: torch.nn.Module, tmp_path) -> None:
    from engine.model.mapped_weights import is_file_backed
    from engine.model.student import WEIGHTS_FILE, load_student_model, save_student

    directory = save_student(_routed(teacher), tmp_path / "routed")
    mapped = load_student_model(directory)
    in_ram = load_student_model(directory, map_memory=False)
    ids = _ids(teacher)
    with torch.no_grad():
        assert torch.equal(mapped(input_ids=ids).logits, in_ram(input_ids=ids).logits)
    values = memory_layers(mapped)[0].values
    assert is_file_backed(values, directory / WEIGHTS_FILE)


def test_students_saved_slot_major_still_load(teacher: torch.nn.Module, tmp_path) -> None:
    """Files written before keys went input-major name them ``gate_up`` [G, parts·s, hidden];
    both loaders (the student file and a plain state dict) lay them out again."""
    from safetensors.torch import load_file, save_file

    from engine.model.student import WEIGHTS_FILE, load_student_model, save_student

    directory = save_student(_routed(teacher, read_share=0.5), tmp_path / "routed")
    ids = _ids(teacher)
    with torch.no_grad():
        expected = load_student_model(directory)(input_ids=ids).logits
    tensors = load_file(directory / WEIGHTS_FILE)
    legacy = {}
    for name, tensor in tensors.items():
        if name.endswith("routed.group_keys"):
            name, tensor = name.replace("group_keys", "gate_up"), tensor.transpose(1, 2)
        legacy[name] = tensor.contiguous()
    assert any(name.endswith("gate_up") for name in legacy)
    save_file(legacy, directory / WEIGHTS_FILE)
    for map_memory in (True, False):
        loaded = load_student_model(directory, map_memory=map_memory)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, expected)
    fresh = _routed(teacher, read_share=0.5)
    with torch.no_grad():
        for memory in memory_layers(fresh).values():
            memory.routed.group_keys.zero_()  # only the legacy tensors can restore them
    fresh.load_state_dict(legacy, strict=False)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)


@pytest.mark.parametrize("hparams, words", [
    ({"group_size": 7}, "does not divide"),
    ({"read_share": 1.5}, "read_share"),
    ({"read_share": 0.0}, "read_share"),
    ({"router_rank": 0}, "router_rank"),
    ({"topk": 4}, "does not apply to routed keys"),
    ({"slots": 8, "group_size": 8}, "fewer than the teacher MLP"),
])
def test_bad_settings_fail_before_any_work(hparams: dict, words: str) -> None:
    teacher = load_model("tiny-llama").model
    with pytest.raises(InputError, match=words):
        convert(teacher, "all", "featural", keys="routed", **hparams)


def test_bad_settings_in_the_cli_exit_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from mindset.cli import run as main

    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50, encoding="utf-8")
    out = tmp_path / "run"
    for hparam in ("group_size=7", "read_share=2", "router_rank=0"):
        code = main(["distill", "--teacher", "tiny-llama", "--layers", "0", "--hparam",
                     "keys=routed", "--hparam", hparam, "--data", str(text), "--steps", "1",
                     "--out", str(out)])
        assert code == 2
        assert not out.exists()
    code = main(["distill", "--teacher", "tiny-llama", "--layers", "0", "--router-steps", "5",
                 "--data", str(text), "--steps", "1", "--out", str(out)])
    assert code == 2 and "routed memories only" in capsys.readouterr().err


async def test_the_workbench_mirrors_and_edits_a_routed_memory(tmp_path) -> None:
    """A saved routed student in the engine: its slots become a table, and an edit of a row
    reaches the live (memory-mapped, copy-on-write) value table, never the file."""
    import hashlib

    from engine.facade import STUDENT, Engine
    from engine.model.student import WEIGHTS_FILE, save_student

    teacher = load_model("tiny-llama")
    student = convert(teacher, [1], "featural", keys="routed", group_size=8,
                      calibration=_ids(teacher.model, 4, 32))
    directory = save_student(student, tmp_path / "routed", teacher.tokenizer)
    weights = directory / WEIGHTS_FILE
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    engine = Engine("tiny-llama", student_spec=str(directory), database=tmp_path / "m.db",
                    runs_root=tmp_path / "runs")
    try:
        await engine.load_model(STUDENT)
        table = engine.memory.mirror("layer1_featural")
        assert table is not None and len(table.ids) == memory_layers(student)[1].num_slots
        module = table.module
        before = module.values[3].clone()
        await engine.memory.update_entry("layer1_featural", int(table.ids[3]), scale=2.0)
        assert torch.allclose(module.values[3], 2 * before)
    finally:
        await engine.close()
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
