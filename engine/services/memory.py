"""The memory service: the Memory pane's view of the store and of a student's memory layers.

Paging, finding, editing, deleting (with undo), inserting, eviction, recombination and text
search over the store's tables. Every store call runs on the runtime's store thread. A
student's memory layers are mirrored into tables when it loads (a hook on the runtime, run
before the student becomes visible); edits to a mirror reach the live student, and
:meth:`MemoryService.save_student` writes them back to its student directory. A mirror kept
from an earlier session is reconciled with the student, never silently rebuilt; what that
found is in :meth:`MemoryService.reconcile_warnings`.

Importing this module is cheap: numpy, torch and SQLAlchemy load on first use.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import MindsetError, one_line
from engine.runtime import STUDENT, TEACHER, Runtime, module_exists
from engine.services.memory_live import LiveMirrors
from engine.services.memory_mirror import (
    AssociativeTable,
    FeaturalTable,
    MemoryTracker,
    featural_table_name,
)
from engine.services.memory_notes import (
    annotate_views,
    annotated_ids,
    journal_value_edit,
    label_annotation,
    student_annotations,
    traced_rows,
)
from engine.services.memory_reconcile import is_ledger, with_pending
from engine.services.memory_rows import (
    NormOrder,
    entry_view,
    page_rows,
    promoted_tokens,
    text_vectors,
)
from engine.views import Availability, DeletedEntries, EntryView, TracedRow

if TYPE_CHECKING:
    import numpy as np

    from engine.memory import MemoryRow, MemoryStore
    from engine.model.loading import LoadedModel
    from engine.model.memory_trace import TracedEntry
    from engine.services.memory_reading import ReadSummary


class MemoryService:
    """The store and the mirrors of the live student's memory layers."""

    def __init__(self, runtime: Runtime, database: str) -> None:
        self.runtime = runtime
        self.database = database
        self._store: MemoryStore | None = None
        self._store_error: str | None = None
        self.live = LiveMirrors()
        self._norms = NormOrder()  # rows by value norm, per table version
        runtime.on_student_loaded(self._student_loaded)

    def availability(self) -> Availability:
        if not module_exists("engine.memory.store"):
            return Availability(False, "the memory store (engine.memory) is not installed")
        if self._store_error:
            return Availability(False, self._store_error)
        return Availability(True)

    def mirror(self, table: str) -> FeaturalTable | AssociativeTable | None:
        """The live memory layer mirrored into ``table``, if it is a mirror."""
        return self.live.get(table)

    def fixed_slots(self, table: str) -> bool:
        """Whether ``table`` mirrors a featural layer: a fixed number of slots, so no insert,
        eviction or recombination."""
        return table in self.live.featural

    def tracker(self) -> MemoryTracker | None:
        """A recorder of the memory entries one reply of the student reads (None when the
        student has no mirrored memory layers)."""
        if not (self.live.featural or self.live.associative):
            return None
        return MemoryTracker(self.live.featural, self.live.associative)

    def reconcile_warnings(self, table: str | None = None) -> list[str]:
        """What reconciling the student's mirror tables with it found when it loaded (edits
        re-applied, deletions kept, rows added or flagged), for one table or all."""
        return self.live.messages(table)

    def take_warnings(self) -> list[str]:
        """The reconcile warnings not taken yet: a front end shows each once."""
        return self.live.take_messages()

    async def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            with contextlib.suppress(Exception):
                await self.runtime.in_store(store.close)

    # ----------------------------------------------------------------------- the student

    async def _student_loaded(self, loaded: LoadedModel) -> None:
        try:
            await self.runtime.in_store(self._export_memory, loaded)
        except MindsetError as exc:
            self._store_error = str(exc)
        except Exception as exc:  # an unexpected failure still reaches the user as one line
            self._store_error = (f"could not mirror the student's memory layers: "
                                 f"{one_line(exc)}")

    def _export_memory(self, loaded: LoadedModel) -> None:
        """Mirror each memory layer (featural slots, associative entries) into a table, so
        the Memory pane can page, search and edit them; edits are written back into the live
        student (see :mod:`engine.services.memory_mirror`)."""
        from engine.model.surgery import memory_layers

        self.live.load(self._open_store(), memory_layers(loaded), self.runtime.student_spec)

    async def save_student(self) -> str:
        """Write the live student, with the memory edits made since it loaded, back to its
        student directory (atomically: the old directory stays whole until the new one is
        complete); returns the directory."""
        loaded = self.runtime.model(STUDENT)
        if loaded is None:
            raise MindsetError("no student is loaded; distil one first (Training pane)")

        def save() -> str:
            from engine.model.student import is_student_dir, save_student

            directory = Path(str(loaded.source or loaded.spec))
            if not is_student_dir(directory):
                raise MindsetError(f"the student was not loaded from a student directory "
                                   f"({directory}); nothing to save it back to")
            try:
                saved = str(save_student(loaded.model, directory, loaded.tokenizer))
            except OSError as exc:
                raise MindsetError(f"could not save the student to {directory}: {exc}") from exc
            self.live.saved(self._open_store())
            return saved

        # The store's thread is the one that writes edits into the live slots: saving there
        # means no edit lands halfway through the save.
        return await self.runtime.in_store(save)

    def _refuse_featural(self, table: str, what: str) -> None:
        if table in self.live.featural:
            raise MindsetError(
                f"{what} applies to associative memory tables; a featural layer has fixed slots"
            )

    # ----------------------------------------------------------------------------- reads

    def _open_store(self) -> MemoryStore:
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
        def names() -> list[str]:
            return [name for name in self._open_store().table_names() if not is_ledger(name)]

        return await self.runtime.in_store(names)

    async def table_stats(self, table: str) -> dict[str, Any]:
        def stats() -> dict[str, Any]:
            handle = self._open_store().table(table)
            result = dict(handle.stats())
            result.setdefault("size", len(handle))
            if table in self.live.featural:  # fixed slots: dead ones (norm ~0) add nothing
                result["dead"] = self._norms.of(handle)[1]
            return result

        return await self.runtime.in_store(stats)

    async def table_page(
        self, table: str, offset: int, limit: int, *, with_tokens: bool = True,
        order: str = "id",
    ) -> list[EntryView]:
        """One page of entries by id, usage or value norm (``memory_rows.PAGE_ORDERS``)."""
        rows = await self.runtime.in_store(lambda: page_rows(
            self._open_store().table(table), offset, limit, order, self._norms))
        views = [entry_view(row) for row in rows]
        if with_tokens and views:
            await self._fill_top_tokens(table, rows, views)
        return views

    async def find_entry(self, table: str, entry_id: int) -> list[EntryView]:
        try:
            rows = await self.runtime.in_store(
                lambda: self._open_store().table(table).get([entry_id])
            )
        except (KeyError, ValueError, MindsetError):
            return []
        views = [entry_view(row) for row in rows]
        await self._fill_top_tokens(table, rows, views)
        return views

    async def search_text(self, table: str, text: str, k: int = 20) -> list[EntryView]:
        """Entries whose annotations (label, triggers, promotes) mention ``text``, then the
        entries nearest to what ``text`` looks like to the memory layer."""
        query, _ = await self._vectors_for_text(table, text)
        featural = self.live.featural.get(table)

        def search() -> list[MemoryRow]:
            import numpy as np

            handle = self._open_store().table(table)
            found = annotated_ids(student_annotations(self.runtime), featural, text, k) \
                if featural is not None else []
            # A person looking is not the model reading: a search counts no access.
            result = handle.query(np.asarray(query, dtype=np.float32).reshape(1, -1), k,
                                  record_access=False)
            found += [int(i) for i in result.ids[0] if int(i) >= 0 and int(i) not in found]
            return handle.get(found[:k]) if found else []

        rows = await self.runtime.in_store(search)
        views = [entry_view(row) for row in rows]
        await self._fill_top_tokens(table, rows, views)
        return views

    async def _vectors_for_text(self, table: str, text: str) -> tuple[np.ndarray, np.ndarray]:
        """A key and a value for ``text``: the hidden state entering the table's layer."""
        runtime = self.runtime
        loaded = runtime.model(STUDENT) or await runtime.load_model(TEACHER)

        def dims() -> tuple[int, int]:
            handle = self._open_store().table(table)
            return handle.key_dim, handle.value_dim

        key_dim, value_dim = await runtime.in_store(dims)
        return await text_vectors(runtime, loaded, table, self.live.get(table), text,
                                  key_dim, value_dim)

    async def _fill_top_tokens(
        self, table: str, rows: list[MemoryRow], views: list[EntryView], top: int = 5
    ) -> None:
        """What each value promotes through the output embedding, when a model is loaded."""
        featural = self.live.featural.get(table)
        tokens = await promoted_tokens(self.runtime, table, rows, featural,
                                       self.live.associative.get(table), top)
        if tokens is not None:
            for view, words in zip(views, tokens, strict=True):
                # A read entry's value acts through the layers above, not directly: its
                # raw projection would be noise; its label says what it was written for.
                view.top_tokens = [] if view.source else words
        if featural is not None:  # measured promotes and triggers replace the projection
            await self.runtime.in_store(annotate_views, student_annotations(self.runtime),
                                        featural, rows, views)

    async def traced_rows(self, entries: list[TracedEntry]) -> list[TracedRow]:
        """Traced reads named by their mirror rows, with the rows' labels."""
        def name() -> list[TracedRow]:
            store = None
            with contextlib.suppress(MindsetError):  # no store: reads keep only their slots
                store = self._open_store()
            return traced_rows(self.live, store, student_annotations(self.runtime), entries)

        return await self.runtime.in_store(name)

    async def annotate(self, table: str, path: str, tokens: int = 2048) -> int:
        """Annotate a featural mirror's slots from the text file ``path`` (their triggers,
        measured promotes and auto-labels, kept in the student directory); how many."""
        featural = self.live.featural.get(table)
        loaded = self.runtime.model(STUDENT)
        annotations = student_annotations(self.runtime)
        if featural is None or loaded is None or annotations is None:
            raise MindsetError(f"{table} is not a featural memory table of a loaded student; "
                               "annotations describe a student's featural layers")
        from engine.textdata import read_text_file

        text = read_text_file(path)

        def run() -> int:
            from engine.model.annotate import annotate

            found = annotate(loaded.model, loaded.tokenizer, text, layers=[featural.layer],
                             tokens=tokens)
            annotations.save(found)
            return len(found)

        # On the store's thread: no knowledge edit changes the layer while it is read.
        return await self.runtime.in_store(run)

    async def read_notes(self, table: str, path: str) -> ReadSummary:
        """The student reads a text file or a folder of notes into the associative layer of
        ``table`` (learning by reading); its mirror rows follow, one batch per document."""
        from engine.services.memory_reading import read_notes

        return await read_notes(self.runtime, self.live.associative.get(table),
                                self._open_store, table, path)

    def slots_changed(self, layer: int, slots: list[int], label: str | None = None) -> None:
        """After a knowledge edit of ``layer`` (on the store's thread): its mirror rows hold
        the live slots again."""
        if self._store is not None:
            self.live.slots_changed(self._store, featural_table_name(layer), slots, label)

    # ---------------------------------------------------------------------------- writes

    async def update_entry(
        self,
        table: str,
        entry_id: int,
        *,
        label: str | None = None,
        tags: list[str] | None = None,
        scale: float | None = None,
        value: np.ndarray | list[float] | None = None,
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
                row = handle.get([entry_id])[0]
                new_value = np.asarray(row.value, dtype=np.float32).reshape(1, -1)
                new_value = new_value * np.float32(scale)
            ids = np.asarray([entry_id], dtype=np.int64)
            meta = None
            if new_value is not None:
                row = handle.get([entry_id])[0]
                featural, slot = self.live.featural.get(table), row.meta.get("slot")
                if featural is not None and isinstance(slot, int):
                    what = f"scale x{scale:g}" if value is None else "new value"
                    journal_value_edit(self.runtime, featural, slot, new_value,
                                       f"Memory pane: {what}")
                meta = self.live.edited_meta(table, row)
            handle.update(ids, values=new_value, label=label, tags=tags, meta=meta)
            if new_value is not None:
                self.live.values_changed(table, handle, handle.get([entry_id]), new_value)
            if label is not None:  # the user's label replaces the automatic one everywhere
                label_annotation(self.runtime, self.live.featural.get(table),
                                 handle.get([entry_id])[0], label)

        await self.runtime.in_store(update)

    async def delete_entries(self, table: str, ids: list[int]) -> DeletedEntries:
        """Delete entries and return what is needed to undo it."""

        def delete() -> DeletedEntries:
            import numpy as np

            store = self._open_store()
            handle = store.table(table)
            rows = handle.get(ids)
            keys = np.stack([np.asarray(r.key, dtype=np.float32) for r in rows])
            values = np.stack([np.asarray(r.value, dtype=np.float32) for r in rows])
            labels = [r.label for r in rows]
            tags = [list(r.tags) for r in rows]
            metas = [dict(r.meta) for r in rows]
            stats = [(r.created, r.last_access, r.access_count) for r in rows]
            before = (np.asarray([r.id for r in rows], dtype=np.int64), keys, values)
            self.live.removing(store, table, handle, before,
                               lambda: handle.delete(np.asarray(ids, dtype=np.int64)))
            self.live.deleted(table, handle, rows)
            return DeletedEntries(table, list(ids), keys, values, labels, tags, metas, stats)

        return await self.runtime.in_store(delete)

    async def restore_entries(self, deleted: DeletedEntries) -> list[int]:
        """Undo a delete: the entries come back under their ids, with their labels, tags,
        meta and access counts; a mirror's live layer reads them again."""

        def restore() -> list[int]:
            store = self._open_store()
            handle = store.table(deleted.table)
            mirror = self.live.get(deleted.table)
            metas = deleted.metas or [{} for _ in deleted.ids]
            if mirror is not None:  # the live student differs from its directory again
                metas = [with_pending(meta, True) for meta in metas]
            handle.restore(
                deleted.ids, deleted.keys, deleted.values, labels=deleted.labels,
                tags=deleted.tags, meta=metas, stats=deleted.stats or None,
                provenance=mirror.source if mirror is not None else None,
            )
            self.live.restored(store, deleted.table, handle, handle.get(deleted.ids))
            return list(deleted.ids)

        return await self.runtime.in_store(restore)

    async def insert_entry(
        self, table: str, *, label: str | None = None, key: np.ndarray | None = None,
        value: np.ndarray | None = None, text: str | None = None,
    ) -> int:
        """Insert one entry. Without a key and value, ``text`` run through the model gives them."""
        if table in self.live.featural:
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
            mirror = self.live.associative.get(table)
            if mirror is not None and len(handle) >= mirror.module.config.capacity:
                raise MindsetError(
                    f"layer {mirror.layer} holds its capacity of "
                    f"{mirror.module.config.capacity} entries: run eviction (v) or delete "
                    "entries first"
                )
            ids = handle.insert(
                np.asarray(key, dtype=np.float32).reshape(1, -1),
                np.asarray(value, dtype=np.float32).reshape(1, -1),
                labels=[label or text], meta=self.live.new_meta(table),
            )
            self.live.reload(table, handle)
            return int(ids[0])

        return await self.runtime.in_store(insert)

    async def evict(self, table: str, count: int | None = None) -> str:
        """LRFU eviction: down to the table's capacity, or the coldest tenth without one."""
        self._refuse_featural(table, "eviction")

        def evict() -> str:
            store = self._open_store()
            handle = store.table(table)
            amount = count
            if amount is None and handle.capacity is None:
                amount = max(1, len(handle) // 10) if len(handle) else 0
            evicted = self.live.removing(store, table, handle, handle.export_arrays(),
                                         lambda: handle.evict(amount))
            self.live.removed(table, handle, [])
            return f"evicted {len(evicted)} entries"

        return await self.runtime.in_store(evict)

    async def recombine(self, table: str, sample: int = 512, k: int = 8) -> str:
        """Merge near-duplicate entries found among the top-k of a sample of stored keys.

        The merge distance is the 5th percentile of the sample's neighbour distances, so only
        the closest pairs merge."""
        self._refuse_featural(table, "recombination")

        def recombine() -> str:
            import numpy as np

            store = self._open_store()
            handle = store.table(table)
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
            # Only entries of the top-k can merge: they alone go to the ledger first.
            ids, keys, values = handle.export_arrays()
            near = np.isin(ids, result.ids)
            groups = self.live.removing(
                store, table, handle, (ids[near], keys[near], values[near]),
                lambda: handle.recombine(result, distance),
                lambda found: [kept for kept, _ in found])
            self.live.removed(table, handle, [kept for kept, _ in groups])
            merged = sum(len(members) for _, members in groups)
            return f"merged {merged} entries into {len(groups)} (distance {distance:.4g})"

        return await self.runtime.in_store(recombine)
