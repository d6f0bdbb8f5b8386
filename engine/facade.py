"""One async facade over the engine, for the workbench and any other front end.

:class:`Engine` owns the memory store, the loaded models (loaded lazily, in a worker thread),
the job runner and the LLM adapters. A front end talks to it only through the public methods
here, and awaits them: every call that touches torch, SQL or the network runs in an executor,
so a caller's event loop never blocks.

Each engine part is optional at run time: :meth:`Engine.availability` says which parts are
usable and, for those that are not, a one-line reason a front end can show.

Importing this module is cheap: torch, transformers and the store load on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import MindsetError
from engine.paths import memory_dir

T = TypeVar("T")

TEACHER = "teacher"
STUDENT = "student"


@dataclass
class Availability:
    """Whether an engine part can be used; ``reason`` says why not, and what to do."""

    ok: bool
    reason: str = ""


@dataclass
class ModelNode:
    """One node of a model's structure, for display."""

    label: str
    params: int = 0
    detail: str = ""
    children: list[ModelNode] = field(default_factory=list)


@dataclass
class EntryView:
    """One memory entry as the workbench shows it."""

    id: int
    label: str
    tags: list[str]
    access_count: int
    last_access: str
    norm: float
    top_tokens: list[str] = field(default_factory=list)


@dataclass
class DeletedEntries:
    """What a delete removed, kept so that it can be undone."""

    table: str
    ids: list[int]
    keys: Any
    values: Any
    labels: list[str | None]
    tags: list[list[str]]


@dataclass
class ChatMessage:
    role: str
    content: str


@dataclass
class MemoryUse:
    """A memory entry a reply read, with the share of attention it got."""

    table: str
    id: int
    weight: float
    label: str = ""


def _count(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


class Engine:
    """The engine's single entry point for front ends."""

    def __init__(
        self,
        model_spec: str = "default",
        *,
        student_spec: str | None = None,
        database: str | Path | None = None,
    ) -> None:
        self.model_spec = model_spec
        self.student_spec = student_spec
        self.database = str(database) if database else str(memory_dir() / "memory.db")
        self._models: dict[str, Any] = {}
        self._model_errors: dict[str, str] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}
        # Models load and generate in one pool; SQL goes through a single thread, so a
        # SQLite connection is only ever used by the thread that made it.
        self._model_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mindset-model")
        self._store_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mindset-store")
        self._store: Any = None
        self._store_error: str | None = None
        self._memory_usage: dict[str, list[MemoryUse]] = {}

    # ----------------------------------------------------------------------------- plumbing

    async def _in_models(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._model_pool, fn, *args)

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, fn, *args)

    async def close(self) -> None:
        """Release the store and worker threads; safe to call twice."""
        if self._store is not None:
            store, self._store = self._store, None
            with contextlib.suppress(Exception):
                await self._in_store(store.close)
        self._model_pool.shutdown(wait=False, cancel_futures=True)
        self._store_pool.shutdown(wait=False, cancel_futures=True)

    def availability(self) -> dict[str, Availability]:
        """Which parts of the engine this installation can use right now."""
        return {
            "memory": self._memory_availability(),
            "jobs": self._jobs_availability(),
            "llm": self._llm_availability(),
        }

    # ------------------------------------------------------------------------------- models

    def model(self, role: str = TEACHER) -> Any | None:
        """The loaded model for ``role`` or None when it is not loaded (yet)."""
        return self._models.get(role)

    def model_error(self, role: str = TEACHER) -> str | None:
        return self._model_errors.get(role)

    def spec_for(self, role: str) -> str | None:
        return self.model_spec if role == TEACHER else self.student_spec

    async def load_model(self, role: str = TEACHER) -> Any:
        """Load the model for ``role`` once, in a worker thread; later calls return it."""
        spec = self.spec_for(role)
        if spec is None:
            raise MindsetError(
                f"no {role} model is configured; distil one first (Training pane) "
                "or start with --model"
            )
        lock = self._model_locks.setdefault(role, asyncio.Lock())
        async with lock:
            if role in self._models:
                return self._models[role]
            try:
                loaded = await self._in_models(_load_spec, spec)
            except MindsetError as exc:
                self._model_errors[role] = str(exc)
                raise
            except Exception as exc:  # an unexpected failure still reaches the user as one line
                message = f"could not load {spec!r}: {type(exc).__name__}: {exc}"
                self._model_errors[role] = message
                raise MindsetError(message) from exc
            self._models[role] = loaded
            self._model_errors.pop(role, None)
            return loaded

    def describe_model(self, role: str = TEACHER) -> ModelNode | None:
        """The structure of a loaded model as a tree with parameter counts."""
        loaded = self._models.get(role)
        if loaded is None:
            return None
        return describe_model(loaded.model, title=f"{role}: {loaded.spec}")

    # ------------------------------------------------------------------------------- memory

    def _memory_availability(self) -> Availability:
        try:
            from engine.memory import MemoryStore  # noqa: F401
        except ImportError:
            return Availability(False, "the memory store (engine.memory) is not installed")
        if self._store_error:
            return Availability(False, self._store_error)
        return Availability(True)

    def _open_store(self) -> Any:
        if self._store is None:
            try:
                from engine.memory import MemoryStore
            except ImportError as exc:
                raise MindsetError(
                    "the memory store (engine.memory) is not installed in this build"
                ) from exc
            try:
                self._store = MemoryStore.open(self.database)
            except MindsetError as exc:
                self._store_error = str(exc)
                raise
            except Exception as exc:
                self._store_error = (
                    f"could not open the memory database {self.database}: {exc}; "
                    "check the path or move the file away to start a new one"
                )
                raise MindsetError(self._store_error) from exc
            self._store_error = None
        return self._store

    async def table_names(self) -> list[str]:
        return await self._in_store(lambda: list(self._open_store().table_names()))

    async def table_stats(self, table: str) -> dict[str, Any]:
        def stats() -> dict[str, Any]:
            handle = self._open_store().table(table)
            result = dict(handle.stats())
            result.setdefault("size", len(handle))
            return result

        return await self._in_store(stats)

    async def table_page(
        self, table: str, offset: int, limit: int, *, with_tokens: bool = True
    ) -> list[EntryView]:
        """One page of entries, read from the database (never the whole table)."""
        rows = await self._in_store(
            lambda: list(self._open_store().table(table).page(offset, limit))
        )
        memory_rows = [_memory_row(row) for row in rows]
        if with_tokens and memory_rows:
            await self._fill_top_tokens(table, rows, memory_rows)
        return memory_rows

    async def find_entry(self, table: str, entry_id: int) -> list[EntryView]:
        def fetch() -> list[Any]:
            return _rows_of(self._open_store().table(table).get([entry_id]))

        try:
            rows = await self._in_store(fetch)
        except (KeyError, ValueError, MindsetError):
            return []
        memory_rows = [_memory_row(row) for row in rows]
        await self._fill_top_tokens(table, rows, memory_rows)
        return memory_rows

    async def update_entry(
        self,
        table: str,
        entry_id: int,
        *,
        label: str | None = None,
        tags: list[str] | None = None,
        scale: float | None = None,
        value: Any = None,
        value_text: str | None = None,
    ) -> None:
        """Change an entry's label, tags, or value (scaled, or replaced by numbers or by the
        vector the model gives a text) in one write."""
        if value is None and value_text:
            _, value = await self._vectors_for_text(table, value_text)

        def update() -> None:
            import numpy as np

            handle = self._open_store().table(table)
            new_value = None
            if value is not None:
                new_value = np.asarray(value, dtype=np.float32).reshape(1, -1)
            elif scale is not None and scale != 1.0:
                row = _rows_of(handle.get([entry_id]))[0]
                new_value = np.asarray(_field(row, "value"), dtype=np.float32).reshape(1, -1)
                new_value = new_value * np.float32(scale)
            ids = np.asarray([entry_id], dtype=np.int64)
            handle.update(ids, values=new_value, label=label, tags=tags)

        await self._in_store(update)

    async def delete_entries(self, table: str, ids: list[int]) -> DeletedEntries:
        """Delete entries and return what is needed to undo it."""

        def delete() -> DeletedEntries:
            import numpy as np

            handle = self._open_store().table(table)
            rows = _rows_of(handle.get(ids))
            keys = np.stack([np.asarray(_field(r, "key"), dtype=np.float32) for r in rows])
            values = np.stack([np.asarray(_field(r, "value"), dtype=np.float32) for r in rows])
            labels = [_field(r, "label") for r in rows]
            tags = [list(_field(r, "tags") or []) for r in rows]
            handle.delete(np.asarray(ids, dtype=np.int64))
            return DeletedEntries(table, list(ids), keys, values, labels, tags)

        return await self._in_store(delete)

    async def restore_entries(self, deleted: DeletedEntries) -> list[int]:
        """Undo a delete: the entries come back (with new ids)."""

        def restore() -> list[int]:
            handle = self._open_store().table(deleted.table)
            ids = handle.insert(
                deleted.keys, deleted.values, labels=deleted.labels, tags=deleted.tags
            )
            return [int(i) for i in ids]

        return await self._in_store(restore)

    async def insert_entry(
        self, table: str, *, label: str | None = None, key: Any = None, value: Any = None,
        text: str | None = None,
    ) -> int:
        """Insert one entry. Without a key and value, ``text`` run through the model gives them."""
        if key is None or value is None:
            if not text:
                raise MindsetError("give a text (or a key and a value) for the new entry")
            key, value = await self._vectors_for_text(table, text)

        def insert() -> int:
            import numpy as np

            handle = self._open_store().table(table)
            ids = handle.insert(
                np.asarray(key, dtype=np.float32).reshape(1, -1),
                np.asarray(value, dtype=np.float32).reshape(1, -1),
                labels=[label or text],
            )
            return int(ids[0])

        return await self._in_store(insert)

    async def evict(self, table: str, **options: Any) -> Any:
        return await self._in_store(lambda: self._open_store().table(table).evict(**options))

    async def recombine(self, table: str, **options: Any) -> Any:
        return await self._in_store(lambda: self._open_store().table(table).recombine(**options))

    async def search_text(self, table: str, text: str, k: int = 20) -> list[EntryView]:
        """The entries nearest to what ``text`` looks like to the memory layer."""
        query, _ = await self._vectors_for_text(table, text)

        def search() -> list[Any]:
            import numpy as np

            handle = self._open_store().table(table)
            result = handle.query(np.asarray(query, dtype=np.float32).reshape(1, -1), k)
            found = [int(i) for i in result.ids[0] if int(i) >= 0]
            return _rows_of(handle.get(found)) if found else []

        rows = await self._in_store(search)
        memory_rows = [_memory_row(row) for row in rows]
        await self._fill_top_tokens(table, rows, memory_rows)
        return memory_rows

    async def _vectors_for_text(self, table: str, text: str) -> tuple[Any, Any]:
        """A key and a value for ``text``: the hidden state entering the table's layer."""
        loaded = self._models.get(STUDENT) or await self.load_model(TEACHER)
        key_dim, value_dim = await self._in_store(lambda: _table_dims(self._open_store(), table))
        layer = _layer_of_table(table)
        return await self._in_models(
            _hidden_vectors, loaded, text, layer, key_dim, value_dim
        )

    async def _fill_top_tokens(
        self, table: str, rows: list[Any], memory_rows: list[EntryView], top: int = 5
    ) -> None:
        """What each value promotes through the output embedding, when a model is loaded."""
        loaded = self._models.get(STUDENT) or self._models.get(TEACHER)
        if loaded is None:
            return
        import numpy as np

        values = [np.asarray(_field(r, "value"), dtype=np.float32) for r in rows]
        if not values or any(v is None for v in values):
            return
        layer = _layer_of_table(table)
        try:
            tokens = await self._in_models(
                _promoted_tokens, loaded, np.stack(values), layer, top
            )
        except Exception:
            return  # dimensions that do not map onto the residual stream: leave blank
        for row, words in zip(memory_rows, tokens, strict=True):
            row.top_tokens = words

    # --------------------------------------------------------------------------------- jobs

    def _jobs_availability(self) -> Availability:
        try:
            from engine.distill import jobs  # noqa: F401
        except ImportError:
            return Availability(False, "the job runner (engine.distill.jobs) is not installed")
        return Availability(True)

    # ---------------------------------------------------------------------------------- llm

    def _llm_availability(self) -> Availability:
        return Availability(True)

    def last_memory_usage(self, target: str) -> list[MemoryUse] | None:
        """The memory entries the last reply of ``target`` used most; None when the model
        has no memory layers that report it."""
        return self._memory_usage.get(target)

    def chat_targets(self) -> list[str]:
        """Models the chat can talk to."""
        targets = [TEACHER]
        if self.student_spec:
            targets.append(STUDENT)
        targets.append("remote")
        return targets

    async def stream_chat(
        self,
        target: str,
        messages: list[ChatMessage],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
    ) -> AsyncIterator[str]:
        """Stream a reply from ``target`` (teacher, student or remote) piece by piece."""
        if target == "remote":
            async for piece in self._stream_remote(messages, max_tokens, temperature):
                yield piece
            return
        loaded = await self.load_model(target)
        async for piece in _iterate_in_thread(
            lambda: _generate_local(loaded, messages, max_tokens, temperature)
        ):
            yield piece

    async def _stream_remote(
        self, messages: list[ChatMessage], max_tokens: int, temperature: float
    ) -> AsyncIterator[str]:
        import os

        if not os.environ.get("OPENAI_API_KEY") and not os.environ.get("OPENAI_BASE_URL"):
            raise MindsetError(
                "no remote API configured: set OPENAI_API_KEY (and OPENAI_BASE_URL for a "
                "compatible server)"
            )
        from openai import AsyncOpenAI, OpenAIError

        client = AsyncOpenAI()
        model = os.environ.get("MINDSET_REMOTE_MODEL", "gpt-4o-mini")
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": m.role, "content": m.content} for m in messages],  # type: ignore[misc]
                max_tokens=max_tokens,
                temperature=temperature,
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except OpenAIError as exc:
            raise MindsetError(f"the remote API failed: {type(exc).__name__}: {exc}") from exc
        finally:
            await client.close()


# ----------------------------------------------------------------------- model-side helpers


def _load_spec(spec: str) -> Any:
    from engine.model.loading import load_model

    return load_model(spec)


def _decoder_layers(model: Any) -> list[Any]:
    for path in ("model.layers", "transformer.h"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            return list(node)
    return []


def describe_model(model: Any, *, title: str) -> ModelNode:
    """A display tree: embeddings, each layer (attention heads, MLP or memory), head."""
    config = model.config
    root = ModelNode(title, _count(model), f"{type(model).__name__}")
    layers = _decoder_layers(model)
    layer_param_ids = {id(p) for layer in layers for p in layer.parameters()}
    embedding_params = 0
    for name, parameter in model.named_parameters():
        if id(parameter) not in layer_param_ids and "emb" in name or name.startswith(
            ("transformer.wte", "transformer.wpe")
        ):
            embedding_params += parameter.numel()
    root.children.append(
        ModelNode("embeddings", embedding_params, f"vocab {config.vocab_size}")
    )
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))
    for index, layer in enumerate(layers):
        layer_node = ModelNode(f"layer {index}", _count(layer))
        for name, child in layer.named_children():
            params = _count(child)
            kind = type(child).__name__
            node = ModelNode(name, params, kind)
            if "attn" in name and heads:
                gates = getattr(child, "head_gates", None)
                for head in range(heads):
                    gate = ""
                    if gates is not None:
                        with contextlib.suppress(Exception):
                            gate = f"gate {float(gates.flatten()[head]):.3f}"
                    node.children.append(ModelNode(f"head {head}", params // heads, gate))
            elif "mlp" in name or "memory" in kind.lower():
                node.detail = _memory_detail(child) or kind
            layer_node.children.append(node)
        root.children.append(layer_node)
    return root


def _memory_detail(module: Any) -> str:
    """Slot usage for memory layers that report it; empty for plain MLPs."""
    kind = type(module).__name__
    if "Memory" not in kind:
        return ""
    for attribute in ("slot_usage", "usage"):
        usage = getattr(module, attribute, None)
        if callable(usage):
            with contextlib.suppress(Exception):
                value = usage()
                if isinstance(value, dict):
                    return f"{kind} " + ", ".join(f"{k} {v}" for k, v in value.items())
                return f"{kind} slots used {value}"
    slots = getattr(module, "num_slots", None) or getattr(module, "n_slots", None)
    return f"{kind} {slots} slots" if slots else kind


def _layer_of_table(table: str) -> int | None:
    """Tables are named per layer, e.g. ``layer_15_featural``; None when the name has none."""
    import re

    match = re.search(r"(\d+)", table)
    return int(match.group(1)) if match else None


def _table_dims(store: Any, table: str) -> tuple[int, int]:
    handle = store.table(table)
    stats = handle.stats()
    key_dim = getattr(handle, "key_dim", None) or stats.get("key_dim")
    value_dim = getattr(handle, "value_dim", None) or stats.get("value_dim")
    return int(key_dim), int(value_dim)


def _hidden_vectors(
    loaded: Any, text: str, layer: int | None, key_dim: int, value_dim: int
) -> tuple[Any, Any]:
    """Mean hidden state entering ``layer`` for ``text``, cut or padded to each width."""
    import numpy as np
    import torch

    encoded = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        output = loaded.model(**encoded, output_hidden_states=True)
    states = output.hidden_states
    index = 0 if layer is None else min(layer, len(states) - 1)
    vector = states[index][0].mean(dim=0).float().numpy()

    def fit(width: int) -> Any:
        out = np.zeros(width, dtype=np.float32)
        out[: min(width, vector.shape[0])] = vector[:width]
        return out

    return fit(key_dim), fit(value_dim)


def _promoted_tokens(loaded: Any, values: Any, layer: int | None, top: int) -> list[list[str]]:
    """Tokens each value pushes up most: through the layer's output projection when the
    value lives before it, then the final norm and the LM head (logit lens)."""
    import torch

    model = loaded.model
    vectors = torch.as_tensor(values, dtype=torch.float32)
    hidden = int(model.config.hidden_size if hasattr(model.config, "hidden_size")
                 else model.config.n_embd)
    if vectors.shape[-1] != hidden and layer is not None:
        layers = _decoder_layers(model)
        module = layers[layer] if 0 <= layer < len(layers) else None
        out_proj = None
        for name in ("out_proj", "output_proj", "w_out", "o_proj"):
            for sub in (getattr(module, "mlp", None), module):
                candidate = getattr(sub, name, None) if sub is not None else None
                if candidate is not None:
                    out_proj = candidate
                    break
            if out_proj is not None:
                break
        if out_proj is None:
            raise ValueError("no output projection to map values into the residual stream")
        with torch.no_grad():
            vectors = out_proj(vectors)
    head = model.get_output_embeddings()
    with torch.no_grad():
        logits = head(vectors)
    indices = logits.topk(top, dim=-1).indices.tolist()
    tokenizer = loaded.tokenizer
    return [[tokenizer.decode([i]).strip() or repr(tokenizer.decode([i])) for i in row]
            for row in indices]


def _generate_local(
    loaded: Any, messages: list[ChatMessage], max_tokens: int, temperature: float
) -> Iterator[str]:
    """Generate a reply with transformers' streamer; yields text pieces as they decode."""
    import torch
    from transformers import TextIteratorStreamer

    tokenizer = loaded.tokenizer
    chat = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "\n".join(f"{m.role}: {m.content}" for m in messages) + "\nassistant:"
    inputs = tokenizer(prompt, return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs: dict[str, Any] = dict(
        **inputs, max_new_tokens=max_tokens, streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
    else:
        kwargs.update(do_sample=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                loaded.model.generate(**kwargs)
        except BaseException as exc:
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise MindsetError(f"generation failed: {type(errors[0]).__name__}: {errors[0]}")


async def _iterate_in_thread(make: Callable[[], Iterator[str]]) -> AsyncIterator[str]:
    """Drive a blocking iterator in a thread and hand its items to the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in make():
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, ("item", item))
        except BaseException as exc:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

    threading.Thread(target=pump, daemon=True, name="mindset-stream").start()
    try:
        while True:
            kind, payload = await queue.get()
            if kind == "item":
                yield payload
            elif kind == "error":
                if isinstance(payload, MindsetError):
                    raise payload
                raise MindsetError(f"{type(payload).__name__}: {payload}") from payload
            else:
                return
    finally:
        stop.set()


# ------------------------------------------------------------------------ store-row helpers


def _field(row: Any, name: str) -> Any:
    if isinstance(row, dict):
        return row.get(name)
    return getattr(row, name, None)


def _rows_of(result: Any) -> list[Any]:
    """``table.get`` may give a list of rows or an object of arrays; normalise to rows."""
    if isinstance(result, list | tuple):
        return list(result)
    rows = getattr(result, "rows", None)
    if rows is not None:
        return list(rows)
    raise MindsetError("the memory store returned rows in a shape the workbench does not know")


def _memory_row(row: Any) -> EntryView:
    import numpy as np

    value = _field(row, "value")
    norm = float(np.linalg.norm(np.asarray(value, dtype=np.float32))) if value is not None else 0.0
    last = _field(row, "last_access")
    if isinstance(last, int | float):
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last))) if last else ""
    return EntryView(
        id=int(_field(row, "id")),
        label=str(_field(row, "label") or ""),
        tags=list(_field(row, "tags") or []),
        access_count=int(_field(row, "access_count") or 0),
        last_access=str(last) if last is not None else "",
        norm=norm,
    )
