"""One async facade over the engine, for the workbench and any other front end.

:class:`Engine` builds the :class:`~engine.runtime.Runtime` (worker threads, models loaded
lazily by role) and the services over it, and exposes them: ``engine.memory`` (the store
and a student's memory layers), ``engine.jobs`` (distillation jobs), ``engine.chat``
(streamed replies) and ``engine.agent`` (the chat agent on the chat's models). A front end
awaits their methods: every call that touches torch, SQL or the network runs in an
executor, so a caller's event loop never blocks.

Each engine part is optional at run time: :meth:`Engine.availability` says which parts are
usable and, for those that are not, a one-line reason a front end can show.

Importing this module is cheap: torch, transformers and the store load on first use, and
the chat service (with :mod:`engine.llm`) on first use of ``engine.chat``, the agent (with
:mod:`engine.agent`) on first use of ``engine.agent``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.paths import memory_dir
from engine.runtime import REMOTE, STUDENT, TEACHER, Runtime
from engine.services.jobs import JobService
from engine.services.memory import MemoryService
from engine.views import Availability, ModelNode, short_spec

if TYPE_CHECKING:
    from engine.model.loading import LoadedModel
    from engine.services.agent import AgentService
    from engine.services.chat import ChatService
    from engine.services.knowledge import KnowledgeService
    from engine.services.surgery import SurgeryService

# The role names are part of the engine's public vocabulary: front ends name models by them.
__all__ = ["REMOTE", "STUDENT", "TEACHER", "Engine"]


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
        self.database = str(database) if database else str(memory_dir() / "memory.db")
        self.runs_root = Path(runs_root) if runs_root else None
        self.runtime = Runtime(model_spec, student_spec=student_spec)
        self.memory = MemoryService(self.runtime, self.database)
        self.jobs = JobService(self.runs_root, default_teacher=model_spec,
                               runtime=self.runtime)

    @cached_property
    def chat(self) -> ChatService:
        """The chat service, built on first use: :mod:`engine.llm` stays out of a front
        end's first frame."""
        from engine.services.chat import ChatService

        return ChatService(self.runtime, tracker=self.memory.tracker)

    @cached_property
    def agent(self) -> AgentService:
        """The chat agent (dialog tree, long-term memory, feelings, tasks) on the chat
        service's models, built on first use; its files are the terminal chat's."""
        from engine.services.agent import AgentService

        return AgentService(self.runtime, self.chat)

    @property
    def job_overrides(self) -> dict[str, Any]:
        """Extra DistillConfig fields for every job started here (tests shrink blocks)."""
        return self.jobs.job_overrides

    @job_overrides.setter
    def job_overrides(self, overrides: dict[str, Any]) -> None:
        self.jobs.job_overrides = overrides

    @cached_property
    def knowledge(self) -> KnowledgeService:
        """Trace a student's reply to the memory entries it used; edit, insert and undo."""
        from engine.services.knowledge import KnowledgeService

        return KnowledgeService(self.runtime, self.memory)

    @cached_property
    def surgery(self) -> SurgeryService:
        """Change a loaded model's shape (heads, MLPs, layers, gates, feedback), measure
        what that costs, heal and save the result."""
        from engine.services.surgery import SurgeryService

        return SurgeryService(self.runtime)

    async def close(self) -> None:
        """Release the adapters, the store and the worker threads; safe to call twice."""
        if "agent" in self.__dict__:  # its sessions run on the chat's adapters: first
            await self.agent.close()
        if "chat" in self.__dict__:  # never built: nothing to close
            await self.chat.close()
        await self.memory.close()
        await self.runtime.close()

    def availability(self) -> dict[str, Availability]:
        """Which parts of the engine this installation can use right now."""
        return {
            "memory": self.memory.availability(),
            "jobs": self.jobs.availability(),
            "llm": Availability(True),
        }

    # ------------------------------------------------------------------------------ models

    @property
    def model_spec(self) -> str:
        return self.runtime.model_spec

    @property
    def student_spec(self) -> str | None:
        return self.runtime.student_spec

    def model(self, role: str = TEACHER) -> LoadedModel | None:
        """The loaded model for ``role`` or None when it is not loaded (yet)."""
        return self.runtime.model(role)

    def model_error(self, role: str = TEACHER) -> str | None:
        return self.runtime.model_error(role)

    def spec_for(self, role: str) -> str | None:
        return self.runtime.spec_for(role)

    async def load_model(self, role: str = TEACHER) -> LoadedModel:
        """Load the model for ``role`` once, in a worker thread; later calls return it."""
        return await self.runtime.load_model(role)

    async def adopt_student(self, directory: str) -> None:
        """Use the student in ``directory`` from now on (after a job completes)."""
        await self.runtime.adopt_student(directory)

    def describe_model(self, role: str = TEACHER) -> ModelNode | None:
        """The structure of a loaded model as a tree with parameter counts."""
        loaded = self.runtime.model(role)
        if loaded is None:
            return None
        from engine.model.inspect import describe_model

        return describe_model(loaded.model, title=f"{role}: {short_spec(loaded.spec)}")
