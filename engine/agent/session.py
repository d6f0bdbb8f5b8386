"""An agent put together from settings: its adapters, its databases and its tools.

Where it keeps things, under the data directory (``MINDSET_HOME``):

- ``agent/agent.db``: the dialog tree, tasks, summaries and settings (what ``/sql`` reads);
- ``memory/memory.db``, table ``agent.memories``: the long-term memories, browsable in the
  workbench's Memory pane like any table;
- ``agent/files``: the one folder the ``read_file`` tool may read;
- ``agent/agent.log``: the notices of every turn (an unreadable feeling tag, a rating that
  was not a number), which the chat also shows;
- the interaction log: every model call, linked to the dialog by conversation id.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.agent.agent import Agent, AgentSettings
from engine.agent.cascade import Cascade
from engine.agent.dialog import DialogStore
from engine.agent.embedding import Embedder, default_embedder
from engine.agent.long_term import DEFAULT_TABLE, LongTermMemory
from engine.agent.state import AgentState
from engine.agent.tools import ToolBox
from engine.errors import InputError
from engine.llm.adapter import BaseAdapter
from engine.paths import data_dir, memory_dir


def agent_dir() -> Path:
    path = data_dir() / "agent"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class AgentPaths:
    database: Path = field(default_factory=lambda: agent_dir() / "agent.db")
    memory_store: Path = field(default_factory=lambda: memory_dir() / "memory.db")
    files: Path = field(default_factory=lambda: agent_dir() / "files")
    table: str = DEFAULT_TABLE


def log_to_file(path: Path) -> None:
    """Write the agent's notices (unreadable feelings, ratings that were not numbers) to
    ``path``, once per process and file; they are shown to the user as well."""
    logger = logging.getLogger("mindset.agent")
    logger.setLevel(logging.INFO)
    target = str(path)
    if any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
        return
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # shown as notices already: not printed a second time


class AgentSession:
    """An :class:`Agent` and what it owns; close it to release the databases."""

    def __init__(self, small: BaseAdapter, *, large: BaseAdapter | None = None,
                 paths: AgentPaths | None = None, embedder: Embedder | None = None,
                 settings: AgentSettings | None = None, plain: bool = False,
                 entropy_threshold: float = 2.0, web_search: bool = False,
                 owns_adapters: bool = True) -> None:
        from engine.memory.store import MemoryStore

        self.paths = paths or AgentPaths()
        self.paths.files.mkdir(parents=True, exist_ok=True)
        log_to_file(self.paths.database.with_name("agent.log"))
        self.owns_adapters = owns_adapters
        self.dialog = DialogStore(self.paths.database)
        self.state = AgentState(self.paths.database)
        self.store = MemoryStore.open(self.paths.memory_store)
        self.memory = LongTermMemory(self.store, embedder or default_embedder(),
                                     table=self.paths.table)
        self.cascade = Cascade(small, large, entropy_threshold=entropy_threshold)
        self.tools = ToolBox(memory_search=self._memory_search,
                             sql_database=self.paths.database, files_root=self.paths.files,
                             web_search=web_search)
        settings = settings or AgentSettings()
        if plain:  # the model and the conversation: no memory, feelings, tools or reflection
            settings.retrieve_k = 0
            settings.feelings = False
            settings.tools = False
            settings.rate_importance = False
            settings.reflection_threshold = 10**9
            settings.summaries = False
            settings.remember = False
        self.plain = plain
        self.agent = Agent(self.cascade, self.dialog, self.memory, self.state, self.tools,
                           settings)

    def _memory_search(self, query: str, k: int) -> str:
        return self.memory.format(self.memory.search(query, k=k))

    def replace_models(self, small: BaseAdapter, large: BaseAdapter | None = None) -> None:
        """Answer with other models from now on (``/model``, a newly adopted student);
        closing the old ones is the caller's business."""
        self.cascade.small, self.cascade.large = small, large

    async def aclose(self) -> None:
        if self.owns_adapters:
            for adapter in {id(a): a for a in (self.cascade.small, self.cascade.large)
                            if a is not None}.values():
                with contextlib.suppress(Exception):
                    await adapter.aclose()
        self.close()

    def close(self) -> None:
        for closing in (self.dialog.close, self.state.close, self.store.close):
            with contextlib.suppress(Exception):
                closing()


def build_session(model: str | None, *, large: str | None = None, plain: bool = False,
                  embedder_kind: str = "minilm", **options: Any) -> AgentSession:
    """A session on adapters built from specs (``default``, ``openai:gpt-4o-mini``, ...)."""
    from engine.llm import InteractionLog, build_adapter

    log = InteractionLog()
    small = build_adapter(model, log=log)
    big = build_adapter(large, log=log) if large else None
    if embedder_kind == "hidden":
        loaded = getattr(small, "loaded", None)
        if loaded is None:
            raise InputError("hidden-state embeddings need a local model; use the default "
                             "embedder with a remote one")
        from engine.agent.embedding import HiddenStateEmbedder

        options["embedder"] = HiddenStateEmbedder(loaded.model, loaded.tokenizer,
                                                  name=f"hidden-states:{small.model}")
        # Other vectors, other table: the MiniLM memories stay where they are.
        options["paths"] = AgentPaths(table=f"{DEFAULT_TABLE}.hidden")
    elif embedder_kind != "minilm":
        raise InputError(f"unknown embedder {embedder_kind!r}; use minilm or hidden")
    return AgentSession(small, large=big, plain=plain, **options)
