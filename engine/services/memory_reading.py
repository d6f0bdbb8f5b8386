"""Learning by reading from the workbench: a loaded student reads a file or folder of notes.

Runs on the store's thread (no edit or mirror change interleaves): each document is read by
the student's associative layers (:mod:`engine.model.reading`), then the layer's mirror
table follows the cache in one batch (new rows labelled with the context that wrote them,
their meta naming the document and position; evicted rows deleted), so the Memory pane
shows the table growing. ``w`` saves the entries with the student, as it saves edits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import MindsetError
from engine.runtime import STUDENT, Runtime

if TYPE_CHECKING:
    from engine.memory import MemoryStore
    from engine.model.loading import LoadedModel
    from engine.services.memory_mirror import AssociativeTable


@dataclass(frozen=True)
class ReadSummary:
    table: str
    documents: int
    tokens: int
    entries_added: int
    entries: int  # in the table now
    capacity: int
    seconds: float

    def describe(self) -> str:
        rate = self.entries_added / self.seconds if self.seconds > 0 else 0.0
        return (f"read {self.documents} document(s), {self.tokens} tokens: "
                f"{self.entries_added} entries added ({rate:.0f}/s); {self.table} holds "
                f"{self.entries}/{self.capacity}; w saves them with the student")


def check_readable(table: str, mirror: AssociativeTable | None) -> AssociativeTable:
    if mirror is None or mirror.module.base is None:
        raise MindsetError(f"{table} is not the table of an associative memory that learns "
                           "by reading; distill a student with --memory associative")
    return mirror


def read_into_mirror(store: MemoryStore, table: str, mirror: AssociativeTable,
                     loaded: LoadedModel, files: list[Path], root: Path) -> ReadSummary:
    """Read ``files`` into the mirrored layer and keep its mirror table equal to the cache."""
    import numpy as np

    from engine.model.read_tables import TableSync
    from engine.model.reading import ReadReport, read_text
    from engine.textdata import read_text_file

    handle = store.table(table)
    module = mirror.module
    sync = TableSync(handle, module, mirror.ids, mirror.source)
    total = ReadReport()
    for file in files:
        name = str(file.relative_to(root)) if file != root else file.name
        total.merge(read_text(loaded.model, loaded.tokenizer, read_text_file(file),
                              document=name))
        sync.sync()
        mirror.ids = np.asarray([sync.rows[uid] for uid in module.cache.uids.tolist()],
                                dtype=np.int64)
    return ReadSummary(table, total.documents, total.tokens, total.entries_added,
                       len(module.cache), module.config.capacity, total.seconds)


async def read_notes(runtime: Runtime, mirror: AssociativeTable | None,
                     open_store: Callable[[], MemoryStore], table: str, path: str
                     ) -> ReadSummary:
    """Check everything (the table reads, a student is loaded, the path holds text), then
    read on the store's thread."""
    from engine.textdata import text_files

    readable = check_readable(table, mirror)
    loaded = runtime.model(STUDENT)
    if loaded is None:
        raise MindsetError("no student is loaded; load one in the Models pane")
    root = Path(path).expanduser()
    files = text_files(root)  # a bad path fails before any work
    store = open_store()
    return await runtime.in_store(read_into_mirror, store, table, readable, loaded, files, root)
