"""Featural memory, product-key search and the straight-through estimator."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InputError
from engine.model.memory_layers import (
    FeaturalConfig,
    FeaturalMemory,
    ProductKeys,
    StraightThrough,
    straight_through,
)


def small_product(**overrides: object) -> FeaturalMemory:
    params: dict[str, object] = dict(
        heads=2, query_dim=8, num_subkeys=6, topk=3, value_dim=5, gate=True, sparse=False
    )
    params.update(overrides)
    torch.manual_seed(0)
    memory = FeaturalMemory(FeaturalConfig.from_hparams(12, params))
    with torch.no_grad():  # non-zero output projection, so every part gets a gradient
        assert memory.out_proj is not None
        memory.out_proj.weight.normal_()
        memory.out_proj.bias.normal_()
    return memory


def test_product_key_search_is_exact() -> None:
    torch.manual_seed(1)
    keys = ProductKeys(heads=3, query_dim=10, num_subkeys=7, topk=4)
    query = torch.randn(11, 30)
    scores, slots = keys.search(query)
    for head in range(3):
        full = query.view(11, 3, 10)[:, head] @ keys.slot_keys(head).t()  # [11, 49]
        expected_scores, expected_slots = full.topk(4, dim=-1)
        torch.testing.assert_close(scores[:, head], expected_scores)
        assert torch.equal(slots[:, head], expected_slots)


def test_ste_forward_returns_the_store_read_and_backward_follows_its_definition() -> None:
    torch.manual_seed(2)
    query = torch.randn(5, 4, requires_grad=True)
    key_in = torch.randn(5, 4, requires_grad=True)
    value_in = torch.randn(5, 6, requires_grad=True)
    key_out = torch.randn(5, 3, 4)
    value_out = torch.randn(5, 3, 6)
    keys, values = straight_through(query, key_in, value_in, key_out, value_out)
    assert torch.equal(keys, key_out) and torch.equal(values, value_out)
    d_keys, d_values = torch.randn(5, 3, 4), torch.randn(5, 3, 6)
    torch.autograd.backward([keys, values], [d_keys, d_values])
    assert query.grad is not None and key_in.grad is not None and value_in.grad is not None
    torch.testing.assert_close(query.grad, d_keys.sum(dim=1))
    torch.testing.assert_close(key_in.grad, d_keys.sum(dim=1))
    torch.testing.assert_close(value_in.grad, d_values.sum(dim=1))


def test_ste_without_a_k_dimension_passes_gradients_unchanged() -> None:
    query = torch.randn(3, 4, requires_grad=True)
    key_in = torch.randn(3, 4, requires_grad=True)
    value_in = torch.randn(3, 2, requires_grad=True)
    keys, values = StraightThrough.apply(
        query, key_in, value_in, torch.randn(3, 4), torch.randn(3, 2)
    )
    (keys * 2).sum().backward(retain_graph=True)
    torch.testing.assert_close(query.grad, torch.full((3, 4), 2.0))
    torch.testing.assert_close(key_in.grad, torch.full((3, 4), 2.0))
    (values * 3).sum().backward()
    torch.testing.assert_close(value_in.grad, torch.full((3, 2), 3.0))


def test_gradcheck_product_featural_memory_float64() -> None:
    memory = small_product().double()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in memory.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in memory.parameters())

    def as_function(inputs: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(memory, dict(zip(names, values, strict=True)), (inputs,))

    # The top-k choice is piecewise constant; gradcheck's small steps keep the same choice.
    assert torch.autograd.gradcheck(as_function, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)
    assert torch.autograd.gradcheck(memory, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_gradcheck_flat_gated_memory_float64() -> None:
    hparams = dict(keys="flat", slots=9, topk=4, activation="silu", gated=True, sparse=False)
    config = FeaturalConfig.from_hparams(6, hparams, intermediate_size=9)
    memory = FeaturalMemory(config).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(memory, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_flat_masked_dense_read_equals_the_gathered_read(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    import engine.model.memory_layers.featural as featural

    hparams = dict(keys="flat", slots=64, topk=8, activation="silu", gated=True, sparse=False)
    config = FeaturalConfig.from_hparams(12, hparams, intermediate_size=64)
    torch.manual_seed(0)
    memory = FeaturalMemory(config)
    assert memory.flat is not None
    x = torch.randn(10, 12, requires_grad=True)
    results = []
    for share in (1, 16):  # 8 * 1 < 64 slots: gathered; 8 * 16 >= 64: masked dense product
        monkeypatch.setattr(featural, "DENSE_READ_SHARE", share)
        out = memory(x)
        grads = torch.autograd.grad(out.pow(2).sum(), [x, memory.values, memory.flat.keys])
        results.append((out.detach(), [g.to_dense() for g in grads]))
    (gathered, gathered_grads), (dense, dense_grads) = results
    torch.testing.assert_close(dense, gathered)
    for a, b in zip(dense_grads, gathered_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert int((dense_grads[1].abs().sum(dim=1) > 0).sum()) < 64  # unread slots get nothing


def test_ste_gradcheck_float64() -> None:
    inputs = (
        torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 5, 3, dtype=torch.float64),
        torch.randn(2, 5, 4, dtype=torch.float64),
    )
    # gradcheck compares to finite differences: the STE's gradient is by definition not the
    # true one, so check it against its own definition through a linear probe instead.
    keys, values = StraightThrough.apply(*inputs)
    probe_k, probe_v = torch.randn_like(keys), torch.randn_like(values)
    grads = torch.autograd.grad((keys * probe_k).sum() + (values * probe_v).sum(), inputs[:3])
    torch.testing.assert_close(grads[0], probe_k.sum(1))
    torch.testing.assert_close(grads[1], probe_k.sum(1))
    torch.testing.assert_close(grads[2], probe_v.sum(1))


def test_sparse_value_gradient_equals_the_dense_one() -> None:
    dense = small_product(sparse=False)
    sparse = small_product(sparse=True)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(7, 12)
    dense(x).pow(2).sum().backward()
    sparse(x).pow(2).sum().backward()
    assert sparse.values.grad is not None and sparse.values.grad.is_sparse
    assert dense.values.grad is not None
    torch.testing.assert_close(sparse.values.grad.to_dense(), dense.values.grad)
    assert sparse.sparse_parameters() == [sparse.values]
    assert all(p is not sparse.values for p in sparse.dense_parameters())


def test_memory_keeps_the_mlp_call_signature_and_shape() -> None:
    memory = small_product()
    x = torch.randn(2, 5, 12)
    assert memory(x).shape == (2, 5, 12)
    slots, weights = memory.lookup(x.view(-1, 12))
    assert slots.shape == weights.shape == (10, 2 * 3)
    torch.testing.assert_close(weights.view(10, 2, 3).sum(-1), torch.ones(10, 2))


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        (dict(topk=10, num_subkeys=8), "topk=10 exceeds num_subkeys=8"),
        (dict(query_dim=15), "query_dim=15 is odd"),
        (dict(heads=0), "heads=0 must be a positive integer"),
        (dict(keys="hash"), "not a featural key kind"),
        (dict(bogus=1), "unknown featural hyper-parameter"),
        (dict(keys="flat", slots=8, topk=9), "topk=9 exceeds the 8 slots"),
        (dict(keys="flat", gate=True), "gate=True applies to product keys only"),
        (dict(keys="flat", activation="nope"), "activation='nope' is unknown"),
    ],
)
def test_impossible_hyper_parameters_are_refused(hparams: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FeaturalConfig.from_hparams(16, hparams, intermediate_size=32)
