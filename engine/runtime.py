"""The engine's runtime: worker threads and the models it loads, by role.

Models load and generate in one pool of threads; SQL goes through a single thread, so a
SQLite connection is only ever used by the thread that made it. Each role (teacher,
student) loads lazily, once, under its own lock, and a failed load is remembered as a
one-line error a front end can show.

Services hook into the student's life cycle through callbacks registered here (see
:meth:`Runtime.on_student_loaded`) instead of reaching into one another.

Importing this module is cheap: torch and transformers load with the first model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.errors import MindsetError, one_line

if TYPE_CHECKING:
    from engine.model.loading import LoadedModel

T = TypeVar("T")

TEACHER = "teacher"
STUDENT = "student"
REMOTE = "remote"

StudentHook = Callable[["LoadedModel"], Awaitable[None]]
DropHook = Callable[[], Awaitable[None]]


class Runtime:
    """Thread pools and the loaded models; shared by every service of one engine."""

    def __init__(self, model_spec: str = "default", *, student_spec: str | None = None) -> None:
        self.model_spec = model_spec
        self.student_spec = student_spec
        self._models: dict[str, LoadedModel] = {}
        self._model_errors: dict[str, str] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}
        self._model_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mindset-model")
        self._store_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mindset-store")
        self._student_loaded: list[StudentHook] = []
        self._student_dropped: list[DropHook] = []

    # ----------------------------------------------------------------------------- threads

    async def in_models(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the model pool (torch work: loading, forward passes)."""
        return await asyncio.get_running_loop().run_in_executor(self._model_pool, fn, *args)

    async def in_store(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the store's single thread (every SQL call and live-slot write)."""
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, fn, *args)

    # ------------------------------------------------------------------------------- hooks

    def on_student_loaded(self, hook: StudentHook) -> None:
        """Await ``hook(loaded)`` after a student loads and before it becomes visible
        through :meth:`model`, so no one sees a student its services have not set up."""
        self._student_loaded.append(hook)

    def on_student_dropped(self, hook: DropHook) -> None:
        """Await ``hook()`` when the student is replaced (:meth:`adopt_student`)."""
        self._student_dropped.append(hook)

    # ------------------------------------------------------------------------------ models

    def model(self, role: str = TEACHER) -> LoadedModel | None:
        """The loaded model for ``role`` or None when it is not loaded (yet)."""
        return self._models.get(role)

    def model_error(self, role: str = TEACHER) -> str | None:
        return self._model_errors.get(role)

    def spec_for(self, role: str) -> str | None:
        return self.model_spec if role == TEACHER else self.student_spec

    async def load_model(self, role: str = TEACHER) -> LoadedModel:
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
                loaded = await self.in_models(load_spec, spec)
            except MindsetError as exc:
                self._model_errors[role] = str(exc)
                raise
            except Exception as exc:  # an unexpected failure still reaches the user as one line
                message = f"could not load {spec!r}: {one_line(exc)}"
                self._model_errors[role] = message
                raise MindsetError(message) from exc
            if role == STUDENT:
                try:
                    for hook in self._student_loaded:
                        await hook(loaded)
                except MindsetError as exc:
                    self._model_errors[role] = str(exc)
                    raise
                except Exception as exc:  # a failing service still reaches the user as one line
                    message = (f"could not set up the student {spec!r}: "
                               f"{one_line(exc)}")
                    self._model_errors[role] = message
                    raise MindsetError(message) from exc
            self._models[role] = loaded
            self._model_errors.pop(role, None)
            return loaded

    async def adopt_student(self, directory: str) -> None:
        """Use the student in ``directory`` from now on (after a job completes)."""
        if self.student_spec == directory and STUDENT in self._models:
            return
        self.student_spec = directory
        self._models.pop(STUDENT, None)
        for hook in self._student_dropped:
            await hook()
        await self.load_model(STUDENT)

    async def close(self) -> None:
        """Stop the worker threads; safe to call twice."""
        # Wait for a model load still in flight: building a model seeds and draws from the
        # process-wide torch RNG (and transformers patches torch's init functions), so one
        # left running after close would change the weights of the next model built in this
        # process. Queued work is cancelled; the interpreter would wait for it at exit anyway.
        await asyncio.to_thread(self._model_pool.shutdown, wait=True, cancel_futures=True)
        self._store_pool.shutdown(wait=False, cancel_futures=True)


def load_spec(spec: str) -> LoadedModel:
    """Build the model named by ``spec`` (in the calling thread)."""
    # load_model itself lets one build at a time run in a process (MODEL_BUILD_LOCK).
    from engine.model.loading import load_model

    return load_model(spec)


def module_exists(name: str) -> bool:
    """Whether an ``engine.*`` module is installed, without importing it: importing even a
    parent package (``engine.memory`` pulls in SQLAlchemy) would delay the first frame."""
    parts = name.split(".")
    if parts[0] != "engine":
        return False
    base = Path(__file__).resolve().parent.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
