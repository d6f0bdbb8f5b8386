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
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import MindsetError
from engine.memory_mirror import (
    ASSOCIATIVE_SUFFIX,
    FEATURAL_SUFFIX,
    AssociativeTable,
    FeaturalTable,
    MemoryTracker,
    MemoryUse,
    associative_projection,
    mirror_associative,
    mirror_featural,
    reload_associative,
)
from engine.paths import memory_dir

T = TypeVar("T")

TEACHER = "teacher"
STUDENT = "student"
REMOTE = "remote"
# About 4-5 s per step of 4 x 128 tokens on 2 cores for the default model: a few minutes.
QUICK_START_STEPS = 50
JOB_POLL_SECONDS = 0.25  # how often a followed job's new events are read


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
    metas: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class JobRequest:
    """What the Training pane's form asks for."""

    teacher: str = "default"
    layers: str = "middle"  # "middle", an index, a list/range, or "all"
    memory: str = "featural"
    data: str | None = None  # a text file or folder; None samples text from the teacher
    steps: int = 200
    lr: float = 1e-3
    # Further DistillConfig fields (block_size, batch_size, data_free_blocks, ...).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobView:
    """One distillation job as the job list shows it."""

    id: str
    state: str
    step: int
    total_steps: int
    teacher: str
    layers: str
    memory: str
    loss: float | None = None
    error: str = ""
    run_dir: str = ""


@dataclass
class ChatMessage:
    role: str
    content: str


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
        runs_root: str | Path | None = None,
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
        self._adapters: dict[str, Any] = {}
        self._featural: dict[str, FeaturalTable] = {}
        self._associative: dict[str, AssociativeTable] = {}
        self.runs_root = Path(runs_root) if runs_root else None
        self._runner: Any = None
        self._job_losses: dict[str, float] = {}
        # Extra DistillConfig fields for every job started here (tests shrink blocks).
        self.job_overrides: dict[str, Any] = {}

    # ----------------------------------------------------------------------------- plumbing

    async def _in_models(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._model_pool, fn, *args)

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, fn, *args)

    async def close(self) -> None:
        """Release the store, adapters and worker threads; safe to call twice."""
        adapters, self._adapters = self._adapters, {}
        for adapter in adapters.values():
            with contextlib.suppress(Exception):
                await adapter.aclose()
        if self._store is not None:
            store, self._store = self._store, None
            with contextlib.suppress(Exception):
                await self._in_store(store.close)
        # Wait for a model load still in flight: building a model seeds and draws from the
        # process-wide torch RNG (and transformers patches torch's init functions), so one
        # left running after close would change the weights of the next model built in this
        # process. Queued work is cancelled; the interpreter would wait for it at exit anyway.
        await asyncio.to_thread(self._model_pool.shutdown, wait=True, cancel_futures=True)
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
            if role == STUDENT:
                # Mirror the memory tables before the student becomes visible, so no page is
                # ever described through a half-registered student.
                try:
                    await self._in_store(self._export_memory, loaded)
                except MindsetError as exc:
                    self._store_error = str(exc)
            self._models[role] = loaded
            self._model_errors.pop(role, None)
            return loaded

    async def adopt_student(self, directory: str) -> None:
        """Use the student in ``directory`` from now on (after a job completes)."""
        if self.student_spec == directory and STUDENT in self._models:
            return
        self.student_spec = directory
        self._models.pop(STUDENT, None)
        adapter = self._adapters.pop(STUDENT, None)
        if adapter is not None:
            with contextlib.suppress(Exception):
                await adapter.aclose()
        await self.load_model(STUDENT)

    async def save_student(self) -> str:
        """Write the live student, with the memory edits made since it loaded, back to its
        student directory (atomically: the old directory stays whole until the new one is
        complete); returns the directory."""
        loaded = self._models.get(STUDENT)
        if loaded is None:
            raise MindsetError("no student is loaded; distil one first (Training pane)")

        def save() -> str:
            from engine.model.student import is_student_dir, save_student

            directory = Path(str(loaded.source or loaded.spec))
            if not is_student_dir(directory):
                raise MindsetError(f"the student was not loaded from a student directory "
                                   f"({directory}); nothing to save it back to")
            try:
                return str(save_student(loaded.model, directory, loaded.tokenizer))
            except OSError as exc:
                raise MindsetError(f"could not save the student to {directory}: {exc}") from exc

        # The store's thread is the one that writes edits into the live slots: saving there
        # means no edit lands halfway through the save.
        return await self._in_store(save)

    def _export_memory(self, loaded: Any) -> None:
        """Mirror each memory layer (featural slots, associative entries) into a table, so
        the Memory pane can page, search and edit them; edits are written back into the live
        student (see :mod:`engine.memory_mirror`)."""
        from engine.model.surgery import memory_layers

        store = self._open_store()
        self._featural.clear()
        self._associative.clear()
        modules: dict[int, Any] = memory_layers(loaded)
        self._featural.update(mirror_featural(store, modules, self.student_spec))
        self._associative.update(mirror_associative(store, modules, self.student_spec))

    def _reload_associative(self, table: str, handle: Any) -> None:
        """After a change to an associative mirror, the live layer reads its entries again
        (on the store's thread, like every write)."""
        mirror = self._associative.get(table)
        if mirror is not None:
            reload_associative(handle, mirror)

    def describe_model(self, role: str = TEACHER) -> ModelNode | None:
        """The structure of a loaded model as a tree with parameter counts."""
        loaded = self._models.get(role)
        if loaded is None:
            return None
        return describe_model(loaded.model, title=f"{role}: {short_spec(loaded.spec)}")

    # ------------------------------------------------------------------------------- memory

    def _memory_availability(self) -> Availability:
        if not _module_exists("engine.memory.store"):
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
            if new_value is not None:
                self._write_slots(table, _rows_of(handle.get([entry_id])), new_value)
                self._reload_associative(table, handle)

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
            metas = [dict(_field(r, "meta") or {}) for r in rows]
            handle.delete(np.asarray(ids, dtype=np.int64))
            self._write_slots(table, rows, np.zeros_like(values))
            self._reload_associative(table, handle)
            return DeletedEntries(table, list(ids), keys, values, labels, tags, metas)

        return await self._in_store(delete)

    async def restore_entries(self, deleted: DeletedEntries) -> list[int]:
        """Undo a delete: the entries come back (with new ids)."""

        def restore() -> list[int]:
            handle = self._open_store().table(deleted.table)
            ids = handle.insert(
                deleted.keys, deleted.values, labels=deleted.labels, tags=deleted.tags,
                meta=deleted.metas,
            )
            self._write_slots(deleted.table, _rows_of(handle.get(ids)), deleted.values)
            self._reload_associative(deleted.table, handle)
            return [int(i) for i in ids]

        return await self._in_store(restore)

    def _write_slots(self, table: str, rows: list[Any], values: Any) -> None:
        """Copy changed values into the live student's featural layer (slot from meta)."""
        mirror = self._featural.get(table)
        if mirror is None:
            return
        import torch

        with torch.no_grad():
            for row, value in zip(rows, values, strict=True):
                slot = (_field(row, "meta") or {}).get("slot")
                if isinstance(slot, int):
                    mirror.module.values[slot] = torch.as_tensor(value, dtype=torch.float32)

    async def insert_entry(
        self, table: str, *, label: str | None = None, key: Any = None, value: Any = None,
        text: str | None = None,
    ) -> int:
        """Insert one entry. Without a key and value, ``text`` run through the model gives them."""
        if table in self._featural:
            raise MindsetError(
                "a featural layer has a fixed number of slots: edit a slot (e) instead of "
                "inserting one"
            )
        if key is None or value is None:
            if not text:
                raise MindsetError("give a text (or a key and a value) for the new entry")
            key, value = await self._vectors_for_text(table, text)

        def insert() -> int:
            import numpy as np

            handle = self._open_store().table(table)
            mirror = self._associative.get(table)
            if mirror is not None and len(handle) >= mirror.module.config.capacity:
                raise MindsetError(
                    f"layer {mirror.layer} holds its capacity of "
                    f"{mirror.module.config.capacity} entries: run eviction (v) or delete "
                    "entries first"
                )
            ids = handle.insert(
                np.asarray(key, dtype=np.float32).reshape(1, -1),
                np.asarray(value, dtype=np.float32).reshape(1, -1),
                labels=[label or text],
            )
            self._reload_associative(table, handle)
            return int(ids[0])

        return await self._in_store(insert)

    async def evict(self, table: str, count: int | None = None) -> str:
        """LRFU eviction: down to the table's capacity, or the coldest tenth without one."""
        self._refuse_featural(table, "eviction")

        def evict() -> str:
            handle = self._open_store().table(table)
            amount = count
            if amount is None and handle.capacity is None:
                amount = max(1, len(handle) // 10) if len(handle) else 0
            evicted = handle.evict(amount)
            self._reload_associative(table, handle)
            return f"evicted {len(evicted)} entries"

        return await self._in_store(evict)

    async def recombine(self, table: str, sample: int = 512, k: int = 8) -> str:
        """Merge near-duplicate entries found among the top-k of a sample of stored keys.

        The merge distance is the 5th percentile of the sample's neighbour distances, so only
        the closest pairs merge."""
        self._refuse_featural(table, "recombination")

        def recombine() -> str:
            import numpy as np

            handle = self._open_store().table(table)
            rows = handle.page(0, sample)
            if len(rows) < 2:
                return "nothing to merge"
            keys = np.stack([np.asarray(r.key, dtype=np.float32) for r in rows])
            result = handle.query(keys, min(k, len(handle)), record_access=False)
            neighbours = result.distances[:, 1:]
            finite = neighbours[np.isfinite(neighbours)]
            if finite.size == 0:
                return "nothing to merge"
            distance = float(np.quantile(finite, 0.05))
            groups = handle.recombine(result, distance)
            self._reload_associative(table, handle)
            merged = sum(len(members) for _, members in groups)
            return f"merged {merged} entries into {len(groups)} (distance {distance:.4g})"

        return await self._in_store(recombine)

    def _refuse_featural(self, table: str, what: str) -> None:
        if table in self._featural:
            raise MindsetError(
                f"{what} applies to associative memory tables; a featural layer has fixed slots"
            )

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
        mirror = self._featural.get(table) or self._associative.get(table)
        layer = mirror.layer if mirror else _layer_of_table(table)
        return await self._in_models(
            _hidden_vectors, loaded, text, layer, key_dim, value_dim,
            mirror.module if mirror else None,
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
        mirror = self._featural.get(table)
        associative = self._associative.get(table)
        if mirror is None and table.endswith(FEATURAL_SUFFIX):
            return  # a student's table whose student is still loading: its projection is unknown
        if associative is None and table.endswith(ASSOCIATIVE_SUFFIX) and self.student_spec \
                and STUDENT not in self._models:
            return  # likewise; without a student it is an ordinary table of that name
        out_proj = getattr(mirror.module, "out_proj", None) if mirror else None
        if associative is not None:
            out_proj = associative_projection(associative.module)
        elif out_proj is None and mirror is None:
            out_proj = _output_projection(loaded.model, _layer_of_table(table))
        try:
            tokens = await self._in_models(
                _promoted_tokens, loaded, np.stack(values), out_proj, top
            )
        except Exception:
            return  # dimensions that do not map onto the residual stream: leave blank
        for row, words in zip(memory_rows, tokens, strict=True):
            row.top_tokens = words

    # --------------------------------------------------------------------------------- jobs

    def _jobs_availability(self) -> Availability:
        if not _module_exists("engine.distill.jobs"):
            return Availability(False, "the job runner (engine.distill.jobs) is not installed")
        return Availability(True)

    def _job_runner(self) -> Any:
        if self._runner is None:
            from engine.distill.jobs import JobRunner

            self._runner = JobRunner(self.runs_root)
        return self._runner

    async def list_jobs(self) -> list[JobView]:
        """Every job under the runs directory, newest first, as the job list shows it."""
        jobs = await asyncio.to_thread(lambda: self._job_runner().jobs())
        return [self._job_view(job) for job in jobs]

    def _job_view(self, job: Any) -> JobView:
        return JobView(
            id=job.id, state=job.state, step=job.step, total_steps=job.total_steps,
            teacher=job.teacher, layers=job.layers, memory=job.memory,
            loss=self._job_losses.get(job.id), error=job.error or "", run_dir=str(job.run_dir),
        )

    def quick_start_request(self) -> JobRequest:
        """One middle layer of the workbench's model, a few minutes on a laptop."""
        # Small blocks and few sampled blocks: the teacher writes its own training text
        # (no data set needed) in a minute or two, then training takes a few minutes.
        return JobRequest(teacher=self.model_spec, layers="middle", memory="featural",
                          data=None, steps=QUICK_START_STEPS, lr=1e-3,
                          options=dict(block_size=128, batch_size=4, data_free_blocks=16,
                                       heldout_blocks=2))

    async def launch_job(self, request: JobRequest) -> JobView:
        """Start a distillation job in its own process; it outlives the workbench."""
        layers = request.layers.strip()
        if layers == "middle":
            layers = str(await self._middle_layer(request.teacher))

        def start() -> Any:
            from engine.distill.config import DistillConfig

            config = DistillConfig(
                teacher=request.teacher, layers=layers, memory=request.memory,
                data=[request.data] if request.data else [], steps=request.steps,
                lr=request.lr, eval_every=max(10, request.steps // 5),
                checkpoint_every=max(10, request.steps // 10),
                **{**request.options, **self.job_overrides},
            )
            return self._job_runner().start(config)

        job = await asyncio.to_thread(start)
        return self._job_view(job)

    async def _middle_layer(self, teacher: str) -> int:
        loaded: Any = self._models.get(TEACHER)
        if loaded is None or teacher != self.model_spec:
            loaded = await self._in_models(_load_spec, teacher)
        return int(loaded.num_layers) // 2

    async def follow_job(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The job's events from its start, then as they are written, until it exits."""
        # Every read of the run directory happens in a worker thread: the caller's event
        # loop draws the screen and must not wait on the disk while a job trains.
        def open_tail() -> Any:
            from engine.distill import events as ev

            runner = self._job_runner()  # first use imports torch
            return ev.EventTail(runner.run_dir(job_id), 0)

        def poll(tail: Any) -> tuple[bool, list[dict[str, Any]]]:
            alive = self._job_runner().job(job_id).alive
            return alive, list(tail.poll())

        tail = await asyncio.to_thread(open_tail)
        while True:
            alive, events = await asyncio.to_thread(poll, tail)
            if not alive:  # anything written just before the exit
                events += (await asyncio.to_thread(poll, tail))[1]
            for event in events:
                if event.get("type") == "step" and isinstance(event.get("loss"), int | float):
                    self._job_losses[job_id] = float(event["loss"])
                yield event
            if not alive:
                return
            await asyncio.sleep(JOB_POLL_SECONDS)

    async def control_job(self, job_id: str, command: str) -> None:
        """``pause``, ``resume`` or ``cancel`` a job."""
        runner = await asyncio.to_thread(self._job_runner)
        actions = {"pause": runner.pause, "resume": runner.resume, "cancel": runner.cancel}
        if command not in actions:
            raise MindsetError(f"unknown job command {command!r}; use pause, resume or cancel")
        await asyncio.to_thread(actions[command], job_id)

    async def job_log_tail(self, job_id: str, lines: int = 20) -> list[str]:
        """The last lines of the job's process output (errors a worker printed)."""
        def tail() -> list[str]:
            from engine.distill.jobs import LOG_NAME

            path = self._job_runner().run_dir(job_id) / LOG_NAME
            if not path.exists():
                return []
            return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]

        return await asyncio.to_thread(tail)

    async def latest_student(self) -> str | None:
        """The student directory of the newest completed job, if any.

        Reads the run directories directly (no torch import), so the workbench can decide at
        start-up, in a moment, whether to offer the quick start."""

        def find() -> str | None:
            import json

            from engine.paths import runs_dir

            root = self.runs_root or runs_dir()
            if not root.is_dir():
                return None
            candidates = []
            for run in root.iterdir():
                student = run / "student"
                if not (student / "mindset_student.json").is_file():
                    continue
                try:
                    state = json.loads((run / "state.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(state, dict) and state.get("state") == "completed":
                    candidates.append((student.stat().st_mtime, str(student)))
            return max(candidates)[1] if candidates else None

        return await asyncio.to_thread(find)

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
        targets.append(REMOTE)
        return targets

    async def stream_chat(
        self,
        target: str,
        messages: list[ChatMessage],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        conversation_id: str | None = None,
    ) -> AsyncIterator[str]:
        """Stream a reply from ``target`` (teacher, student or remote) through the LLM
        adapters, piece by piece. Failures arrive as :class:`MindsetError`."""
        from engine.llm import SamplingParams

        adapter = await self._adapter(target)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        payload = [{"role": m.role, "content": m.content} for m in messages]
        tracker = None
        if target == STUDENT and (self._featural or self._associative):
            tracker = MemoryTracker(self._featural, self._associative)
        try:
            if tracker is not None:
                tracker.attach()
            async for chunk in adapter.stream_chat(payload, params,
                                                   conversation_id=conversation_id):
                if chunk.text:
                    yield chunk.text
        except MindsetError:
            raise
        except Exception as exc:  # network and library errors reach the user as one line
            raise MindsetError(f"{target} request failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if tracker is not None:
                tracker.detach()
                self._memory_usage[target] = tracker.top()

    async def _adapter(self, target: str) -> Any:
        """One adapter per chat target, built on the models this engine already loaded."""
        if target in self._adapters:
            return self._adapters[target]
        from engine.llm import InteractionLog

        log = InteractionLog()
        if target == REMOTE:
            from engine.llm import build_adapter

            try:
                adapter = build_adapter("openai", log=log)
            except MindsetError as exc:
                raise MindsetError(
                    f"no remote model: {exc} (set [llm] model and base_url in the config "
                    "file, and OPENAI_API_KEY)"
                ) from exc
        else:
            from engine.llm.local import LocalAdapter

            loaded = await self.load_model(target)
            adapter = LocalAdapter(loaded, name=loaded.spec, log=log)
        self._adapters[target] = adapter
        return adapter


# ----------------------------------------------------------------------- model-side helpers


def short_spec(spec: str) -> str:
    """A model spec for display: built-in names as they are, paths by their last two parts."""
    if "/" not in spec:
        return spec
    parts = Path(spec).parts
    return "/".join(parts[-2:])


def _module_exists(name: str) -> bool:
    """Whether an ``engine.*`` module is installed, without importing it: importing even a
    parent package (``engine.memory`` pulls in SQLAlchemy) would delay the first frame."""
    parts = name.split(".")
    if parts[0] != "engine":
        return False
    base = Path(__file__).resolve().parent.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _load_spec(spec: str) -> Any:
    # load_model itself lets one build at a time run in a process (MODEL_BUILD_LOCK).
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
        if (id(parameter) not in layer_param_ids and "emb" in name) or name.startswith(
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
    loaded: Any, text: str, layer: int | None, key_dim: int, value_dim: int,
    featural: Any = None,
) -> tuple[Any, Any]:
    """Mean hidden state entering ``layer`` for ``text``, cut or padded to each width; for
    a featural layer with product keys the key is its query (first head); for an
    associative layer the key is its query and the value its value (first head), what the
    layer itself would search with and store."""
    import numpy as np
    import torch

    encoded = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        output = loaded.model(**encoded, output_hidden_states=True)
    states = output.hidden_states
    index = 0 if layer is None else min(layer, len(states) - 1)
    hidden = states[index][0].mean(dim=0).float()
    query = hidden
    if featural is not None and getattr(featural, "query_proj", None) is not None:
        with torch.no_grad():
            query = featural.query_proj(hidden)[:key_dim]
    value = hidden
    if featural is not None and getattr(featural, "value_proj", None) is not None:
        with torch.no_grad():
            value = featural.value_proj(hidden)[:value_dim]
    vector = value.detach().numpy()
    key_vector = query.detach().numpy()

    def fit(source: Any, width: int) -> Any:
        out = np.zeros(width, dtype=np.float32)
        out[: min(width, source.shape[0])] = source[:width]
        return out

    return fit(key_vector, key_dim), fit(vector, value_dim)


def _output_projection(model: Any, layer: int | None) -> Any:
    """The output projection of a memory layer at ``layer`` (None when there is none)."""
    layers = _decoder_layers(model)
    if layer is None or not 0 <= layer < len(layers):
        return None
    mlp = getattr(layers[layer], "mlp", None)
    for name in ("out_proj", "output_proj", "w_out"):
        candidate = getattr(mlp, name, None)
        if candidate is not None:
            return candidate
    return None


def _promoted_tokens(loaded: Any, values: Any, out_proj: Any, top: int) -> list[list[str]]:
    """Tokens each value pushes up most: through the layer's output projection when the
    value lives before it (weights only: the bias is the same for every slot), then the LM
    head."""
    import torch

    model = loaded.model
    vectors = torch.as_tensor(values, dtype=torch.float32)
    with torch.no_grad():
        if out_proj is not None and vectors.shape[-1] == out_proj.weight.shape[1]:
            vectors = vectors @ out_proj.weight.float().T
        head = model.get_output_embeddings()
        logits = head(vectors.to(head.weight.dtype))
    indices = logits.topk(top, dim=-1).indices.tolist()
    tokenizer = loaded.tokenizer
    return [[_token_text(tokenizer.decode([i])) for i in row] for row in indices]


def _token_text(text: str) -> str:
    """A token as printable text: stripped, or its repr when blank or unprintable."""
    stripped = text.strip()
    return stripped if stripped and stripped.isprintable() and "\ufffd" not in stripped else (
        repr(text)
    )


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
    if not _field(row, "access_count"):
        last = "never"
    elif isinstance(last, int | float):
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last))) if last else ""
    return EntryView(
        id=int(_field(row, "id")),
        label=str(_field(row, "label") or ""),
        tags=list(_field(row, "tags") or []),
        access_count=int(_field(row, "access_count") or 0),
        last_access=str(last) if last is not None else "",
        norm=norm,
    )
