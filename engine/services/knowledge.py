"""The knowledge service: which memory entries a student's reply used, and edits to them.

A front end traces one token of a reply (:meth:`KnowledgeService.trace_reply`) and gets the
memory reads at that token ranked by their influence on it (see
:mod:`engine.model.memory_trace`), each named by its row in the Memory pane's mirror table.
It can then scale or delete those entries, or insert a fact ("prompt → new answer") as a new
routed entry, and undo any edit.

Every edit is journaled in the student directory (``memory/edits.sqlite``) as soon as it is
applied to the live student, so it survives a crash before the student is saved: loading
replays the journal past the last edit the saved weights hold. The live student's spec
records that last edit, so saving it (the Memory pane's ``w``) never replays an edit twice.
Edits run on the store's thread, like every write into the live memory layers, so none lands
halfway through a save; the mirror tables follow each edit there.

Importing this module is cheap: torch and the model code load on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from engine.errors import InputError, MindsetError, one_line
from engine.llm.types import ChatMessage
from engine.runtime import STUDENT, Runtime
from engine.services.memory import MemoryService
from engine.views import EditRecord, ReplyTrace

if TYPE_CHECKING:
    from torch import nn

    from engine.model.edit_journal import EditJournal, JournalEntry
    from engine.model.knowledge_edit import Edit
    from engine.model.loading import LoadedModel

T = TypeVar("T")

LABEL_LIMIT = 60  # characters of "prompt → answer" kept as an inserted entry's label


class KnowledgeService:
    """Trace, edit, insert, undo and history over the live student's featural memory."""

    def __init__(self, runtime: Runtime, memory: MemoryService) -> None:
        self.runtime = runtime
        self.memory = memory

    # ------------------------------------------------------------------------------ trace

    def _student(self) -> LoadedModel:
        loaded = self.runtime.model(STUDENT)
        if loaded is None:
            raise MindsetError("tracing and editing memory need a student; chat with a "
                               "student (distil one in the Training pane first)")
        return loaded

    def _directory(self, loaded: LoadedModel) -> Path:
        from engine.model.student import is_student_dir

        directory = Path(str(loaded.source or loaded.spec))
        if not is_student_dir(directory):
            raise MindsetError(f"the student was not loaded from a student directory "
                               f"({directory}); its edits would have nowhere to be kept")
        return directory

    async def trace_reply(self, messages: Sequence[ChatMessage], reply: str, token: int = 0,
                          limit: int = 15) -> ReplyTrace:
        """The memory reads behind token ``token`` of ``reply`` (the student's answer to
        ``messages``), the most promoting first: influence = read weight × the entry's
        direct contribution to that token's logit."""
        loaded = self._student()
        history = [m.as_dict() for m in messages]

        def run() -> tuple[object, list[str]]:
            import torch

            from engine.llm.local import chat_prompt_text
            from engine.model.memory_trace import trace_ids

            tokenizer = loaded.tokenizer
            prompt = tokenizer(chat_prompt_text(tokenizer, history),
                               add_special_tokens=False)["input_ids"]
            answer = tokenizer(reply, add_special_tokens=False)["input_ids"]
            if not answer:
                raise InputError("the reply is empty: there is nothing to trace")
            if not 0 <= token < len(answer):
                raise InputError(f"token {token} is outside the reply's {len(answer)} tokens")
            ids = torch.tensor([list(prompt) + list(answer)])
            traced = trace_ids(loaded.model, ids, target=int(answer[token]),
                               position=len(prompt) + token - 1)
            return traced, [tokenizer.decode([t]) for t in answer]

        try:
            traced, tokens = await self.runtime.in_models(run)
        except MindsetError:
            raise
        except Exception as exc:  # an unexpected failure still reaches the user as one line
            raise MindsetError(f"could not trace the reply: {one_line(exc)}") from exc
        from engine.model.memory_trace import Trace

        assert isinstance(traced, Trace)
        rows = await self.memory.traced_rows(traced.ranked(limit))
        return ReplyTrace(tokens, token, traced.target_logit, rows, traced.layer_ranking())

    # ------------------------------------------------------------------------------ edits

    async def scale(self, layer: int, slots: list[int], factor: float,
                    note: str = "") -> EditRecord:
        """Multiply the values of ``slots`` of ``layer`` by ``factor`` (0 deletes them)."""
        from engine.model.knowledge_edit import scale_entries

        return await self._edit(lambda model: scale_entries(model, layer, slots, factor), note)

    async def delete(self, layer: int, slots: list[int], note: str = "") -> EditRecord:
        return await self.scale(layer, slots, 0.0, note)

    async def insert_fact(self, messages: Sequence[ChatMessage], subject: str, answer: str,
                          *, layer: int | None = None, note: str = "") -> EditRecord:
        """Insert "last user message → ``answer``" as a new routed entry; the key is taken at
        the subject's last token, the value fitted on the chat as the model sees it."""
        if not messages or messages[-1].role != "user":
            raise InputError("the chat has no question of yours to attach the fact to")
        loaded = self._student()
        earlier = [m.as_dict() for m in messages[:-1]]
        prompt = messages[-1].content

        def wrap(text: str) -> str:
            from engine.llm.local import chat_prompt_text

            return chat_prompt_text(loaded.tokenizer,
                                    [*earlier, {"role": "user", "content": text}])

        def make(model: nn.Module) -> Edit:
            from engine.model.knowledge_edit import insert_fact

            return insert_fact(model, loaded.tokenizer, prompt, subject, answer, layer=layer,
                               wrap=wrap)

        label = f"{prompt.strip()} → {answer.strip()}"
        if len(label) > LABEL_LIMIT:
            label = "…" + label[-LABEL_LIMIT:]
        return await self._edit(make, note, label=label)

    async def _edit(self, make: Callable[[nn.Module], Edit], note: str,
                    label: str | None = None) -> EditRecord:
        loaded = self._student()
        directory = self._directory(loaded)

        def run() -> EditRecord:
            from engine.model.edit_journal import EditJournal
            from engine.model.knowledge_edit import undo_edit

            edit = make(loaded.model)
            journal = EditJournal(directory)
            try:
                edit_id = journal.record(edit, note)
            except Exception as exc:
                undo_edit(loaded.model, edit)  # not journaled: not kept
                raise MindsetError(f"could not journal the edit in {journal.path}: "
                                   f"{one_line(exc)}; nothing was changed") from exc
            self._applied(loaded, edit_id)
            self.memory.slots_changed(edit.layer, edit.slots, label)
            return _record(journal.entry(edit_id))

        return await self._on_store(run)

    async def undo(self, edit_id: int | None = None, note: str = "") -> EditRecord:
        """Undo journal entry ``edit_id`` (default: the newest edit not undone yet)."""
        loaded = self._student()
        directory = self._directory(loaded)

        def run() -> EditRecord:
            from engine.model.edit_journal import EditJournal
            from engine.model.knowledge_edit import apply_edit, undo_edit

            journal = EditJournal(directory)
            target = edit_id if edit_id is not None else _last_undoable(journal)
            journal.undoable(target)
            edit = journal.edit(target)
            undo_edit(loaded.model, edit)
            try:
                undo_id = journal.record_undo(target, note)
            except Exception as exc:
                apply_edit(loaded.model, edit)
                raise MindsetError(f"could not journal the undo in {journal.path}: "
                                   f"{one_line(exc)}; nothing was changed") from exc
            self._applied(loaded, undo_id)
            self.memory.slots_changed(edit.layer, edit.slots)
            return _record(journal.entry(undo_id))

        return await self._on_store(run)

    async def history(self) -> list[EditRecord]:
        """Every journaled edit and undo of the live student, oldest first."""
        directory = self._directory(self._student())

        def run() -> list[EditRecord]:
            from engine.model.edit_journal import EditJournal

            return [_record(entry) for entry in EditJournal(directory).entries()]

        return await self._on_store(run)

    async def _on_store(self, run: Callable[[], T]) -> T:
        try:
            return await self.runtime.in_store(run)
        except MindsetError:
            raise
        except Exception as exc:  # an unexpected failure still reaches the user as one line
            raise MindsetError(f"the memory edit failed: {one_line(exc)}") from exc

    @staticmethod
    def _applied(loaded: LoadedModel, edit_id: int) -> None:
        """Record in the live student's spec that its weights hold journal entry
        ``edit_id``: a save writes it, and loading replays only what came after."""
        from engine.model.edit_journal import APPLIED_NOTE
        from engine.model.surgery import student_spec

        spec = student_spec(loaded.model)
        if spec is not None:
            spec.notes[APPLIED_NOTE] = edit_id


def _last_undoable(journal: EditJournal) -> int:
    for entry in reversed(journal.entries()):
        if entry.op != "undo" and entry.undone_by is None:
            return entry.id
    raise InputError("there is no edit left to undo")


def _record(entry: JournalEntry) -> EditRecord:
    shown = entry.as_dict()
    info = entry.info
    if entry.op == "insert":
        what = f"insert {info.get('prompt', '')!r} → {info.get('target', '')!r}"
    elif entry.op == "undo":
        what = f"undo edit {entry.undoes}"
    else:
        what = str(info.get("what", "set"))
    return EditRecord(entry.id, shown["time"], entry.op, entry.layer, list(entry.slots), what,
                      entry.note, entry.undone_by, entry.undoes)
