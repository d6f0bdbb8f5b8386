"""The local adapter on tiny-llama: sampling, stop strings, context limits, cancellation."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from contextlib import aclosing

import pytest
import torch

from engine.errors import InputError
from engine.llm.adapter import GenerationRequest
from engine.llm.decoding import IncrementalDecoder, StopMatcher
from engine.llm.local import ContextLengthError, LocalAdapter
from engine.llm.log import InteractionLog
from engine.llm.types import (
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    ParameterError,
    SamplingParams,
    as_messages,
)
from engine.model.tiny import byte_level_tokenizer

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    # Tiny models run faster on one thread than fighting for two shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapter() -> LocalAdapter:
    return LocalAdapter.from_spec("tiny-llama")


async def test_same_seed_same_text_and_usage(adapter: LocalAdapter) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    first = await adapter.chat(HELLO, params)
    second = await adapter.chat(HELLO, params)
    other = await adapter.chat(HELLO, SamplingParams(max_tokens=12, temperature=0.9, seed=8))
    assert first.text == second.text
    assert first.text != other.text
    assert first.usage.completion_tokens == 12
    assert first.finish_reason == "length"
    assert first.usage.prompt_tokens == adapter.count_prompt_tokens(as_messages(HELLO))


async def test_stream_joins_to_the_whole_reply(adapter: LocalAdapter) -> None:
    params = SamplingParams(max_tokens=30, temperature=0)
    whole = await adapter.complete("Hello", params)
    chunks = [c async for c in adapter.stream_complete("Hello", params)]
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 30
    assert len({c.id for c in chunks}) == 1


async def test_stop_string_cuts_the_reply(adapter: LocalAdapter) -> None:
    # Greedy tiny-llama answers "hi" with newlines: stopping at two of them leaves nothing.
    free = await adapter.chat(HELLO, SamplingParams(max_tokens=8, temperature=0))
    assert free.text.startswith("\n\n")
    stopped = await adapter.chat(HELLO, SamplingParams(max_tokens=8, temperature=0,
                                                       stop=["\n\n"]))
    assert stopped.text == ""
    assert stopped.finish_reason == "stop"
    assert stopped.usage.completion_tokens == 2


async def test_repetition_penalty_changes_greedy_output(adapter: LocalAdapter) -> None:
    plain = await adapter.chat(HELLO, SamplingParams(max_tokens=10, temperature=0))
    penalised = await adapter.chat(HELLO, SamplingParams(max_tokens=10, temperature=0,
                                                         repetition_penalty=5.0))
    assert plain.text == "\n" * 10
    assert penalised.text != plain.text


async def test_prompt_longer_than_context_is_refused(adapter: LocalAdapter) -> None:
    with pytest.raises(ContextLengthError, match="context is 1024 tokens"):
        await adapter.complete("x" * 2000, SamplingParams(max_tokens=4))


async def test_max_tokens_is_clamped_to_the_context(adapter: LocalAdapter) -> None:
    reply = await adapter.complete("x" * 1020, SamplingParams(max_tokens=50, temperature=0))
    assert reply.usage.completion_tokens == 1024 - reply.usage.prompt_tokens
    assert reply.finish_reason == "length"


@pytest.mark.parametrize("bad", [
    SamplingParams(max_tokens=0), SamplingParams(temperature=-1),
    SamplingParams(top_p=0), SamplingParams(top_k=-2), SamplingParams(repetition_penalty=0),
    SamplingParams(stop=[""]), SamplingParams(temperature=float("nan")),
    SamplingParams(temperature=1e-45), SamplingParams(repetition_penalty=1e-40),
    SamplingParams(repetition_penalty=float("inf")), SamplingParams(stop=["\ud800"]),
])
async def test_bad_parameters_are_input_errors(adapter: LocalAdapter,
                                               bad: SamplingParams) -> None:
    with pytest.raises(ParameterError):
        await adapter.complete("Hello", bad)


async def test_the_smallest_allowed_values_still_sample(adapter: LocalAdapter) -> None:
    # At the bounds the logits stay finite: a reply, not a NaN distribution.
    params = SamplingParams(max_tokens=4, temperature=MIN_TEMPERATURE,
                            repetition_penalty=MIN_REPETITION_PENALTY, seed=1)
    reply = await adapter.complete("Hello", params)
    assert reply.usage.completion_tokens == 4 or reply.finish_reason == "stop"


@pytest.mark.parametrize(("text", "found"), [
    ("a\ud800b", "a lone surrogate U+D800 at character 1"),
    ("caf\udcff", "byte 0xff at character 3"),  # how surrogateescape carries a bad byte
])
async def test_text_that_is_not_utf8_is_an_input_error(adapter: LocalAdapter, text: str,
                                                       found: str) -> None:
    with pytest.raises(InputError, match=re.escape(found)):
        await adapter.complete(text, SamplingParams(max_tokens=2))
    with pytest.raises(InputError, match=re.escape(found)):
        await adapter.chat([{"role": "user", "content": text}], SamplingParams(max_tokens=2))


async def test_prompts_are_tokenised_off_the_event_loop(
        adapter: LocalAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.current_thread()
    seen: list[threading.Thread] = []
    original = adapter.encode_labelled  # what generation tokenises with (ids and labels)

    def encode(request: GenerationRequest) -> tuple[list[int], list[int] | None]:
        seen.append(threading.current_thread())
        return original(request)

    monkeypatch.setattr(adapter, "encode_labelled", encode)
    await adapter.complete("Hello", SamplingParams(max_tokens=2))
    assert seen and loop_thread not in seen


async def test_bad_messages_are_input_errors(adapter: LocalAdapter) -> None:
    with pytest.raises(InputError, match="role"):
        await adapter.chat([{"role": "wizard", "content": "x"}])
    with pytest.raises(InputError, match="no messages"):
        await adapter.chat([])


async def test_breaking_out_of_a_stream_stops_generation(tmp_path: object) -> None:
    log = InteractionLog(f"{tmp_path}/log.sqlite")
    adapter = LocalAdapter.from_spec("tiny-llama", log=log)
    params = SamplingParams(max_tokens=1000, temperature=0)
    async with aclosing(adapter.stream_chat(HELLO, params)) as stream:
        async for _ in stream:
            break
    assert not adapter.active  # closing waited for the thread to leave its step
    assert adapter.tokens_generated < 100
    [entry] = log.recent()
    assert entry.finish_reason == "cancelled"
    assert entry.completion_tokens == adapter.tokens_generated


async def test_cancelling_the_task_stops_generation(tmp_path: object) -> None:
    adapter = LocalAdapter.from_spec("tiny-llama", log=InteractionLog(f"{tmp_path}/l.sqlite"))
    task = asyncio.create_task(adapter.chat(HELLO, SamplingParams(max_tokens=1000,
                                                                  temperature=0)))
    while adapter.tokens_generated < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    count = adapter.tokens_generated
    await asyncio.sleep(0.2)
    assert adapter.tokens_generated == count < 1000
    assert adapter.log is not None and adapter.log.recent()[0].finish_reason == "cancelled"


async def test_a_dropped_stream_stops_generation_soon(adapter: LocalAdapter) -> None:
    before = adapter.tokens_generated
    async for _ in adapter.stream_chat(HELLO, SamplingParams(max_tokens=1000, temperature=0)):
        break
    for _ in range(100):  # the garbage-collected generator is closed on the event loop
        if not adapter.active:
            break
        await asyncio.sleep(0.02)
    assert not adapter.active
    assert adapter.tokens_generated - before < 100


async def test_requests_take_turns_and_do_not_mix(adapter: LocalAdapter) -> None:
    params = SamplingParams(max_tokens=15, temperature=0.8, seed=3)
    alone = await adapter.complete("Hello", params)
    together = await asyncio.gather(*(adapter.complete("Hello", params) for _ in range(3)))
    assert [r.text for r in together] == [alone.text] * 3


def test_incremental_decoder_holds_back_split_characters() -> None:
    tokenizer = byte_level_tokenizer()
    text = "naïve café ☕ ok"
    ids = tokenizer(text)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_matcher_never_leaks_part_of_a_stop_string() -> None:
    matcher = StopMatcher(["END"])
    outputs = [matcher.push(p) for p in ["abc E", "N", "x E", "N", "D tail"]]
    assert outputs == [("abc ", False), ("", False), ("ENx ", False), ("", False), ("", True)]
