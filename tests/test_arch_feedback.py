"""Layerwise feedback: exact no-op at install, one semantics for forward, cache and generate,
no backpropagation through time, save/load by settings, and refused requests."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import decoder_layers
from engine.model.architecture.feedback import (
    add_feedback,
    feedback_settings,
    install_feedback,
    remove_feedback,
    set_higher_feedback,
)
from engine.model.tiny import tiny_model

FAMILIES = ("gpt2", "llama")
T = 8


def ids_for(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=generator)


def randomise(model: Any, seed: int = 0, std: float = 0.15) -> None:
    """Nonzero feedback weights (a fresh install is an exact no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.mindset_feedback.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def grads_of(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def generate(model: Any, ids: torch.Tensor, **options: Any) -> Any:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                          pad_token_id=258, return_dict_in_generate=True, output_logits=True,
                          **options)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def base(family: str) -> nn.Module:
    return tiny_model(family)


@pytest.fixture(scope="module")
def fed(base: nn.Module) -> Any:
    """Feedback on every layer, with nonzero weights."""
    model = add_feedback(base, rank=8)
    randomise(model)
    return model


# --- a fresh install is the base model --------------------------------------------------------


def test_zero_weights_are_exactly_the_base_model(base: nn.Module) -> None:
    model = add_feedback(base)
    ids = ids_for()
    assert feedback_settings(model) == {"rank": 32, "layers": [0, 1, 2, 3]}
    assert feedback_settings(base) is None and "forward" not in base.__dict__
    assert torch.allclose(logits(model, ids), logits(base, ids), atol=1e-5, rtol=0)
    ours, theirs = generate(model, ids, do_sample=False), generate(base, ids, do_sample=False)
    assert torch.equal(ours.sequences, theirs.sequences)
    for mine, reference in zip(ours.logits, theirs.logits, strict=True):
        assert torch.allclose(mine, reference, atol=1e-5, rtol=0)


# --- one semantics: full forward, cache steps, generate ---------------------------------------


def test_nonzero_weights_change_logits_and_steps_match_the_full_forward(
        base: nn.Module, fed: Any) -> None:
    ids = ids_for()
    full = logits(fed, ids)
    assert full.shape == (2, T, 259)
    assert (full - logits(base, ids)).abs().max() > 1e-2
    with torch.no_grad():
        out = fed(ids[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, T):
            out = fed(ids[:, t:t + 1], past_key_values=out.cache, use_cache=True)
            steps.append(out.logits)
        # a multi-token continuation of a cache, with the cache= name and a mask
        head = fed(ids[:, :3], use_cache=True)
        tail = fed(ids[:, 3:], cache=head.cache, attention_mask=torch.ones_like(ids),
                   use_cache=True)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert torch.allclose(torch.cat([head.logits, tail.logits], dim=1), full, atol=1e-5, rtol=0)


def test_greedy_generate_equals_a_manual_greedy_loop(fed: Any) -> None:
    ids = ids_for(length=4)
    out = generate(fed, ids, do_sample=False)
    manual = ids
    for _ in range(5):  # no cache: each step recomputes the whole sequence
        manual = torch.cat([manual, logits(fed, manual)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, manual)
    full = logits(fed, out.sequences)
    for step, step_logits in enumerate(out.logits):
        assert torch.allclose(step_logits, full[:, 3 + step], atol=1e-5, rtol=0)


def test_sampling_generate_continues_the_cache_exactly(fed: Any) -> None:
    ids = ids_for(length=4, seed=1)
    torch.manual_seed(0)
    out = generate(fed, ids, do_sample=True, top_k=0, temperature=1.0)
    full = logits(fed, out.sequences)
    for step, step_logits in enumerate(out.logits):
        assert torch.allclose(step_logits, full[:, 3 + step], atol=1e-5, rtol=0)


# --- exact semantics against a parallel reference, and no BPTT --------------------------------


def reference_loss(fed: Any, ids: torch.Tensor, higher: torch.Tensor | None
                   ) -> tuple[nn.Module, torch.Tensor]:
    """The loss of a feedback-free copy run on the whole sequence at once, with each chosen
    layer's input plus up(down(.)) of *constants*: layer i+1's outputs at t-1, as the
    feedback model itself produced them (or the higher signal for the top layer)."""
    maps = fed.mindset_feedback.maps
    blocks = decoder_layers(fed)
    outputs: dict[int, list[torch.Tensor]] = {j: [] for j in range(len(blocks))}
    handles = [block.register_forward_hook(
        lambda _m, _a, out, j=j: outputs[j].append(out.detach())) for j, block in
        enumerate(blocks)]
    with torch.no_grad():
        fed(ids)
    for handle in handles:
        handle.remove()
    seen = {j: torch.cat(steps, dim=1) for j, steps in outputs.items()}  # [batch, T, hidden]

    plain = remove_feedback(fed)
    top = len(blocks) - 1

    def adder(layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            hidden = args[0]
            if layer == top:
                assert higher is not None
                added = maps[str(layer)](higher).unsqueeze(1).expand_as(hidden)
            else:
                source = seen[layer + 1]
                shifted = torch.cat([torch.zeros_like(source[:, :1]), source[:, :-1]], dim=1)
                added = maps[str(layer)](shifted)  # no biases: zero at position 0
            return (hidden + added, *args[1:])
        return hook

    for layer in fed.mindset_feedback.chosen:
        if layer != top or higher is not None:
            decoder_layers(plain)[layer].register_forward_pre_hook(adder(layer))
    return plain, plain(ids, labels=ids).loss


@pytest.mark.parametrize("layers", [None, [1, 3]])
def test_forward_and_gradients_match_a_parallel_reference_without_bptt(
        base: nn.Module, layers: list[int] | None) -> None:
    model = add_feedback(base, rank=8, layers=layers)
    randomise(model, seed=2)
    higher = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    set_higher_feedback(model, higher)
    ids = ids_for(seed=4)

    model.train()  # the training path: no cache given, logits for every position
    plain, expected = reference_loss(model, ids, higher)
    expected.backward()
    feedback_names = {name for name, _ in model.named_parameters()
                      if name.startswith("mindset_feedback.")}
    feedback_grads = {name: grad for name, grad in grads_of(model).items()
                      if name in feedback_names}
    base_grads = grads_of(plain)
    assert set(feedback_grads) == feedback_names and base_grads
    model.zero_grad()

    out = model(ids, labels=ids)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    out.loss.backward()
    mine = grads_of(model)
    for name, grad in {**feedback_grads, **base_grads}.items():
        assert grad.abs().max() > 0 or name not in feedback_names, name
        assert torch.allclose(mine[name], grad, atol=1e-5, rtol=1e-3), name
    # the state carried to the next position is detached: no graph through time
    state = out.cache.mindset_feedback_state.outputs
    assert out.logits.requires_grad and all(not s.requires_grad for s in state if s is not None)


def test_higher_feedback_changes_the_top_layer_input(fed: Any) -> None:
    ids = ids_for()
    captured: list[torch.Tensor] = []
    top = decoder_layers(fed)[-1]
    handle = top.register_forward_pre_hook(  # runs after the feedback hook: sees its sum
        lambda _m, args, kwargs: captured.append(args[0].clone()), with_kwargs=True)
    try:
        without = logits(fed, ids)
        set_higher_feedback(fed, torch.ones(1, 64))
        with_signal = logits(fed, ids)
    finally:
        set_higher_feedback(fed, None)
        handle.remove()
    assert (with_signal - without).abs().max() > 1e-3
    assert (captured[T] - captured[0]).abs().max() > 1e-3  # position 0, without vs with
    assert torch.allclose(logits(fed, ids), without)


# --- copies, removal, save and load ------------------------------------------------------------


def test_deepcopy_has_its_own_hooks_and_weights(fed: Any) -> None:
    ids = ids_for()
    before = logits(fed, ids)
    twin = copy.deepcopy(fed)
    assert torch.allclose(logits(twin, ids), before, atol=1e-6, rtol=0)
    with torch.no_grad():
        for param in twin.mindset_feedback.parameters():
            param.mul_(3.0)
    assert (logits(twin, ids) - before).abs().max() > 1e-3
    assert torch.allclose(logits(fed, ids), before, atol=1e-6, rtol=0)


def test_remove_feedback_gives_the_base_model_back(base: nn.Module, fed: Any) -> None:
    plain = remove_feedback(fed)
    ids = ids_for()
    assert feedback_settings(plain) is None and feedback_settings(fed) is not None
    assert not any(name.startswith("mindset_feedback") for name in plain.state_dict())
    assert "forward" not in plain.__dict__ and "generate" not in plain.__dict__
    assert all(not block._forward_pre_hooks and not block._forward_hooks
               for block in decoder_layers(plain))
    assert torch.equal(logits(plain, ids), logits(base, ids))


def test_settings_and_weights_reload_the_same_model(family: str, fed: Any,
                                                    tmp_path: Any) -> None:
    settings = json.loads(json.dumps(feedback_settings(fed)))
    fresh = tiny_model(family)
    install_feedback(fresh, settings)
    assert set(fresh.state_dict()) == set(fed.state_dict())
    path = tmp_path / "feedback.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in fed.state_dict().items()
               if name.startswith("mindset_feedback.")}, str(path))
    missing, unexpected = fresh.load_state_dict(load_file(str(path)), strict=False)
    assert not unexpected and not any(name.startswith("mindset_feedback") for name in missing)
    ids = ids_for()
    assert torch.allclose(logits(fresh, ids), logits(fed, ids), atol=1e-6, rtol=0)


# --- refused requests ----------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"rank": 0}, "rank"),
    ({"rank": -3}, "rank"),
    ({"rank": 65}, "rank"),
    ({"layers": [4]}, "out of range"),
    ({"layers": "9"}, "unknown layer"),
])
def test_bad_requests_are_refused(base: nn.Module, options: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        add_feedback(base, **options)
    assert feedback_settings(base) is None


def test_misuse_is_refused(base: nn.Module, fed: Any) -> None:
    ids = ids_for()
    with pytest.raises(InputError, match="already has"):
        add_feedback(fed)
    with pytest.raises(InputError, match="already has"):
        install_feedback(fed, {"rank": 4, "layers": [0]})
    with pytest.raises(InputError, match="settings"):
        install_feedback(copy.deepcopy(base), {"rank": 4})
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(InputError, match="padding"):
        fed(ids, attention_mask=mask)
    with torch.no_grad():
        foreign = base(ids, use_cache=True).cache
    with pytest.raises(InputError, match="not built by the feedback model"):
        fed(ids[:, :1], past_key_values=foreign)
    with pytest.raises(InputError, match="beam search"):
        fed.generate(ids, num_beams=2, max_new_tokens=2)
    with pytest.raises(InputError, match=r"\[batch, 64\]"):
        set_higher_feedback(fed, torch.ones(64))
    partial = add_feedback(base, rank=2, layers=[0])
    with pytest.raises(InputError, match="top layer"):
        set_higher_feedback(partial, torch.ones(1, 64))
    with pytest.raises(InputError, match="no layerwise feedback"):
        remove_feedback(base)
