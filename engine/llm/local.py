"""The local adapter: a model from :func:`engine.model.loading.load_model`, in this process.

Generation runs token by token with a KV cache on one background thread per model; tokens
reach the event loop through an asyncio queue. Requests take turns in arrival order (one
generation at a time per model). Closing or cancelling a stream stops its generation before
the next forward pass.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.errors import InputError
from engine.llm.adapter import BaseAdapter, GenerationRequest
from engine.llm.decoding import IncrementalDecoder, StopMatcher
from engine.llm.defaults import generation_defaults
from engine.llm.labels import content_labels, render_chat
from engine.llm.log import InteractionLog
from engine.llm.types import (
    ChatMessage,
    ParameterError,
    SamplingParams,
    StreamChunk,
    TokenLogprob,
    Usage,
)


class ContextLengthError(InputError):
    """The prompt does not fit in the model's context window."""


class LocalAdapter(BaseAdapter):
    adapter_name = "local"

    def __init__(self, loaded: Any, *, name: str | None = None,
                 log: InteractionLog | None = None) -> None:
        """``loaded`` is a :class:`engine.model.loading.LoadedModel`."""
        super().__init__(name or loaded.spec, log=log)
        self.loaded = loaded
        self.context_length = _context_length(loaded.model.config)
        self.eos_ids = _eos_ids(loaded.model.config, loaded.tokenizer)
        # What a request that names no sampling parameter gets (engine.llm.defaults).
        self.sampling_defaults = generation_defaults(loaded.model)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mindset-generate")
        self._turn: asyncio.Lock | None = None
        self._counter_lock = threading.Lock()
        # Observable progress, for status displays and tests.
        self.tokens_generated = 0
        self.active = False
        # Reading mode for every request (``mindset serve --learn``); a request may ask too.
        self.learns = False
        self._reader: PromptReader | None = None

    @classmethod
    def from_spec(cls, spec: str, *, log: InteractionLog | None = None) -> LocalAdapter:
        """Load ``spec`` (default, tiny-llama, a directory...); blocks for seconds."""
        from engine.model.loading import load_model

        return cls(load_model(spec), name=spec, log=log)

    # Prompts -------------------------------------------------------------------------------

    def encode(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids; raises :class:`ContextLengthError` when it cannot fit."""
        return self.encode_labelled(request)[0]

    def encode_labelled(self, request: GenerationRequest) -> tuple[list[int], list[int] | None]:
        """The prompt's token ids and, for a chat to a model with a content channel, their
        content labels (:func:`engine.llm.labels.content_labels`; None: all 0)."""
        content: list[int] | None = None
        if request.messages is not None and self._labels_content(request.params):
            ids, content = content_labels(self.loaded.tokenizer,
                                          [m.as_dict() for m in request.messages])
        elif request.messages is not None:
            ids = self._encode_chat(request.messages)
        else:
            ids = self._encode_text(request.prompt or "")
        if len(ids) >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {len(ids)} tokens but {self.model}'s context is "
                f"{self.context_length} tokens; shorten the prompt"
            )
        return ids, content

    # Label channels ------------------------------------------------------------------------

    def check_labels(self, params: SamplingParams, *, chat: bool = True) -> None:
        """Refuse labels the model has no channel for (:mod:`engine.model.label_channels`)."""
        from engine.model.label_channels import channel_settings

        channels = channel_settings(self.loaded.model) or []
        if params.affect is not None and "affect" not in channels:
            raise ParameterError("mindset.affect", f"this model ({self.model}) has no affect "
                                 "channel; leave affect out")
        if params.content_labels and "content" not in channels:
            raise ParameterError("mindset.content_labels", f"this model ({self.model}) has no "
                                 "content channel; leave content_labels out")
        if params.content_labels and not chat:
            raise ParameterError("mindset.content_labels", "content labels come from chat "
                                 "messages; send a chat, not a plain prompt")

    def _labels_content(self, params: SamplingParams) -> bool:
        if params.content_labels is not None:
            return params.content_labels
        from engine.model.label_channels import channel_settings

        return "content" in (channel_settings(self.loaded.model) or [])

    def count_prompt_tokens(self, messages: list[ChatMessage] | None = None,
                            prompt: str | None = None) -> int:
        """Tokens of a chat or a prompt; raises :class:`ContextLengthError` when too long."""
        request = GenerationRequest("", "chat" if messages is not None else "completion",
                                    SamplingParams(), messages=messages, prompt=prompt)
        return len(self.encode(request))

    def _encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        tokenizer = self.loaded.tokenizer
        text = chat_prompt_text(tokenizer, [m.as_dict() for m in messages])
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_text(self, prompt: str) -> list[int]:
        tokenizer = self.loaded.tokenizer
        ids = list(tokenizer(prompt)["input_ids"]) if prompt else []
        if not ids:
            bos = tokenizer.bos_token_id
            if bos is None:
                raise InputError("the prompt is empty; give some text to continue")
            ids = [int(bos)]
        return ids

    # Reading mode --------------------------------------------------------------------------

    def check_learn(self) -> None:
        """Refuse reading mode for a model without an associative memory that reads."""
        self._prompt_reader()

    def _prompt_reader(self) -> PromptReader:
        if self._reader is None:
            self._reader = PromptReader(self.loaded)  # raises InputError for other models
        return self._reader

    async def read_prompt(self, messages: list[ChatMessage] | None = None,
                          prompt: str | None = None) -> int:
        """Reading mode: the model reads the prompt (its associative layers write entries,
        committed to a student's store) before it answers; returns the entries added."""
        reader = self._prompt_reader()
        request = GenerationRequest("", "chat" if messages is not None else "completion",
                                    SamplingParams(), messages=messages, prompt=prompt)
        ids = await asyncio.to_thread(self.encode, request)
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:  # the caches change: no generation may run meanwhile
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, reader.read, ids)

    # Streaming -----------------------------------------------------------------------------

    async def _stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        self.check_labels(request.params, chat=request.messages is not None)
        # Off the event loop: a long prompt takes seconds to tokenise.
        prompt_ids, content = await asyncio.to_thread(self.encode_labelled, request)
        request.usage = Usage(prompt_tokens=len(prompt_ids))
        if self._turn is None:
            self._turn = asyncio.Lock()  # FIFO: waiters acquire in arrival order
        async with self._turn:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()
            stop = threading.Event()

            def emit(item: StreamChunk | BaseException) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            future = loop.run_in_executor(self._executor, self._generate, request, prompt_ids,
                                          stop, emit, content)
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.finish_reason:
                        return
            finally:
                stop.set()
                # Hold the model until the thread has left its forward pass.
                await asyncio.wait({future})

    def _generate(self, request: GenerationRequest, prompt_ids: list[int],
                  stop: threading.Event,
                  emit: Callable[[StreamChunk | BaseException], None],
                  content: list[int] | None = None) -> None:
        """Runs on the generation thread; every result goes through ``emit``."""
        params = request.params
        decoder = IncrementalDecoder(self.loaded.tokenizer)
        stopper = StopMatcher(params.stop)
        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        finish = "length"
        recorder = LogprobRecorder(self.loaded.tokenizer, params.logprobs)
        self.active = True
        try:
            for token in generate_tokens(self.loaded.model, prompt_ids, params, budget,
                                         stop.is_set, on_logits=recorder.on_logits,
                                         content=content):
                with self._counter_lock:
                    self.tokens_generated += 1
                request.usage.completion_tokens += 1
                if token in self.eos_ids:
                    finish = "stop"
                    recorder.drop_last()  # the end-of-text token is not part of the reply
                    break
                text, reached = stopper.push(decoder.push(token))
                if reached:
                    if text:
                        emit(StreamChunk(request.id, text, logprobs=recorder.take()))
                    finish = "stop"
                    break
                if text:
                    emit(StreamChunk(request.id, text, logprobs=recorder.take()))
            else:
                if stop.is_set():
                    return
            if finish == "length":
                tail, reached = stopper.push(decoder.flush())
                tail += "" if reached else stopper.flush()
            else:
                tail = ""
            emit(StreamChunk(request.id, tail, finish,
                             Usage(request.usage.prompt_tokens,
                                   request.usage.completion_tokens), recorder.take()))
        except Exception as exc:  # reported to the awaiting coroutine, not lost in the thread
            emit(exc)
        finally:
            self.active = False

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._reader is not None:
            self._reader.close()


class PromptReader:
    """Reads prompts into a model's associative memory; for a student directory, each read
    is committed to the student's own store (so a restarted server still knows it)."""

    def __init__(self, loaded: Any) -> None:
        from pathlib import Path

        from engine.model.reading import require_reading_layers
        from engine.model.student import is_student_dir

        self.loaded = loaded
        self.layers = require_reading_layers(loaded.model)
        self.store: Any = None
        self.syncs: dict[int, Any] = {}
        directory = Path(str(loaded.spec)).expanduser()
        if is_student_dir(directory):
            from engine.model.read_tables import open_student_tables

            self.store, self.syncs = open_student_tables(directory, self.layers)
        self.requests = 0

    def read(self, ids: list[int]) -> int:
        from engine.model.reading import CHUNK_TOKENS, read_chunk

        self.requests += 1
        added = 0
        for start in range(0, len(ids), CHUNK_TOKENS):
            report = read_chunk(self.loaded.model, self.loaded.tokenizer,
                                ids[start:start + CHUNK_TOKENS],
                                document=f"request {self.requests}", offset=start)
            added += report.entries_added
        for sync in self.syncs.values():
            sync.sync()
        return added

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def chat_prompt_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text a chat becomes before the model's reply (its chat template, or a plain
    transcript for base models without one); tokenise it without special tokens."""
    return render_chat(tokenizer, messages)  # one rendering, shared with content labels


def generate_tokens(model: Any, prompt_ids: list[int], params: SamplingParams, budget: int,
                    should_stop: Callable[[], bool],
                    on_logits: Callable[[Any, int], None] | None = None,
                    content: list[int] | None = None) -> Iterator[int]:
    """Sample up to ``budget`` tokens after ``prompt_ids``, reusing the KV cache each step;
    ``on_logits(logits, token)`` sees each step's raw logits and the token drawn. ``content``
    (a label per prompt token) and ``params.affect`` feed a model's label channels."""
    from contextlib import nullcontext

    import torch
    from transformers import DynamicCache

    from engine.model.label_channels import labelled

    sampler = TokenSampler(params)
    history = torch.tensor([prompt_ids], dtype=torch.long)
    cache = DynamicCache()
    step_input = history
    labels = nullcontext() if content is None and params.affect is None else labelled(
        model, content=None if content is None else torch.tensor([content]),
        affect=None if params.affect is None else torch.tensor(params.affect))
    with torch.inference_mode(), labels:
        for _ in range(budget):
            if should_stop():
                return
            logits = model(input_ids=step_input, cache=cache, use_cache=True,
                           logits_to_keep=1).logits[:, -1, :]
            token = sampler.next_token(history, logits)
            if on_logits is not None:
                on_logits(logits, token)
            yield token
            step_input = torch.tensor([[token]], dtype=torch.long)
            if sampler.needs_history:
                history = torch.cat([history, step_input], dim=1)


class LogprobRecorder:
    """Each sampled token's log-probability and top alternatives, under the model's own
    distribution (temperature 1, no cuts), when a request asks for ``logprobs``."""

    def __init__(self, tokenizer: Any, top: int | None) -> None:
        self.tokenizer = tokenizer
        self.top = top
        self.pending: list[TokenLogprob] = []

    def on_logits(self, logits: Any, token: int) -> None:
        if self.top is None:
            return
        import torch

        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        alternatives: tuple[tuple[str, float], ...] = ()
        if self.top:
            values, ids = torch.topk(logprobs, self.top)
            alternatives = tuple((self._text(int(i)), float(v))
                                 for v, i in zip(values, ids, strict=True))
        self.pending.append(TokenLogprob(self._text(token), float(logprobs[token]),
                                         alternatives))

    def _text(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def drop_last(self) -> None:
        if self.pending:
            self.pending.pop()

    def take(self) -> list[TokenLogprob] | None:
        """The tokens recorded since the last chunk (None when none were asked for)."""
        if self.top is None:
            return None
        taken, self.pending = self.pending, []
        return taken


class TokenSampler:
    """Repetition penalty, temperature, top-k and top-p (transformers' processors), then a draw."""

    def __init__(self, params: SamplingParams) -> None:
        import torch
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.greedy = params.temperature == 0
        processors: list[Any] = []
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not self.greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        self.processors = LogitsProcessorList(processors)
        self.needs_history = params.repetition_penalty != 1.0
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.generator = torch.Generator().manual_seed(seed % (2**63))

    def next_token(self, history: Any, logits: Any) -> int:
        import torch

        logits = logits.float()
        if len(self.processors):
            logits = self.processors(history, logits)
        if self.greedy:
            return int(logits.argmax(dim=-1)[0])
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator)[0, 0])


def _context_length(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(config: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
