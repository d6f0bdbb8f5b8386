"""``mindset memory``: trace which memory entries an answer used, edit them, insert facts,
undo, and list a student's edit history."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mindset.commands.common import finite_float, non_negative_int, positive_int


def _entries(text: str) -> list[int]:
    try:
        slots = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"entries must be slot numbers separated by commas, not {text!r}") from None
    if not slots or any(s < 0 for s in slots):
        raise argparse.ArgumentTypeError(f"entries must be slot numbers >= 0, not {text!r}")
    return slots


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "memory", help="trace, edit, insert, delete and undo memory entries of a student, "
        "or read notes into it",
        description="Knowledge editing on a student's featural memory (every change is "
        "journaled in the student directory and saved; `undo` reverts any of them), and "
        "learning by reading into its associative memory.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("student", help="a student directory")
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        sub.set_defaults(handler=run)
        return sub

    trace = action("trace", "rank the memory entries a prompt's next token used")
    trace.add_argument("--prompt", required=True)
    trace.add_argument("--target", default=None,
                       help="the answer to explain (default: the predicted next token)")
    trace.add_argument("--top", type=positive_int, default=10, help="entries to list")
    annotate = action("annotate", "label entries: their triggering contexts in a text and "
                      "the tokens they measurably promote")
    annotate.add_argument("--data", required=True, help="a UTF-8 calibration text")
    annotate.add_argument("--layer", type=non_negative_int, action="append", default=None,
                          help="a featural memory layer (repeatable; default: all)")
    annotate.add_argument("--tokens", type=positive_int, default=4096,
                          help="tokens of the text to read (default 4096)")
    edit = action("edit", "scale entries' values, or point them at a token")
    edit.add_argument("--layer", type=non_negative_int, required=True)
    edit.add_argument("--entry", type=_entries, required=True, help="slot numbers, a,b,c")
    how = edit.add_mutually_exclusive_group(required=True)
    how.add_argument("--scale", type=finite_float, help="multiply the values by this factor")
    how.add_argument("--promote", help="replace each value by this token's output direction "
                     "at the value's own norm")
    edit.add_argument("--note", default="")
    delete = action("delete", "zero entries' values (undo brings them back)")
    delete.add_argument("--layer", type=non_negative_int, required=True)
    delete.add_argument("--entry", type=_entries, required=True)
    delete.add_argument("--note", default="")
    insert = action("insert", "insert a fact: a new entry that makes PROMPT lead to TARGET")
    insert.add_argument("--prompt", required=True)
    insert.add_argument("--subject", required=True, help="the part of the prompt the fact is "
                        "about; the key is taken at its last token")
    insert.add_argument("--target", required=True, help="the new answer")
    insert.add_argument("--layer", type=non_negative_int, default=None,
                        help="memory layer (default: the one the trace ranks highest)")
    insert.add_argument("--steps", type=positive_int, default=25)
    insert.add_argument("--note", default="")
    undo = action("undo", "undo one edit by its id (see `history`)")
    undo.add_argument("edit_id", type=positive_int)
    undo.add_argument("--note", default="")
    read = action("read", "read a text file or a folder of notes into the student's "
                  "associative memory (an entry per novel context, kept in its store)")
    read.add_argument("path", help="a UTF-8 text file or a folder of them (.txt, .md, ...)")
    read.add_argument("--chunk", type=positive_int, default=256,
                      help="tokens read at a time (default 256; rereading in the same "
                      "chunks recalls exactly)")
    history = action("history", "list the student's edits")
    history.add_argument("--export", type=Path, default=None, help="also write them as JSON")


def _load(student: str) -> Any:
    from engine.model.loading import load_model

    _load_spec_only(student)
    return load_model(str(Path(student).expanduser()))


def _answer(loaded: Any, prompt: str) -> str:
    import torch

    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=6, do_sample=False,
                                    pad_token_id=loaded.tokenizer.eos_token_id or 0)
    text = str(loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    lead = " " if text[:1].isspace() else ""
    return lead + " ".join(text.split())


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text)


def run(args: argparse.Namespace) -> int:
    from engine.errors import InputError

    if args.action == "history":
        return _history(args)
    if args.action == "read":
        from engine.textdata import text_files
        from mindset.commands.memory_read import run_read

        spec = _load_spec_only(args.student)
        if spec.kind != "associative" or spec.hparams.get("base", "none") == "none":
            raise InputError(f"{args.student} has no associative memory that learns by "
                             "reading; distill one with: mindset distill --memory associative")
        files = text_files(Path(args.path))  # a bad path fails before the model loads
        if args.chunk < 8:
            raise InputError(f"--chunk {args.chunk} is too small; give at least 8 tokens")
        return run_read(args, _load(args.student), files)
    if args.action == "annotate":
        from engine.textdata import read_text_file

        _load_spec_only(args.student)
        args.text = read_text_file(args.data)  # a bad path fails before the model loads
    for field in ("prompt", "subject", "target"):
        value = getattr(args, field, None)
        if value is not None and not value.strip() and not (field == "target"
                                                             and args.action == "trace"):
            raise InputError(f"--{field} is empty; give some text")
    loaded = _load(args.student)
    handlers = {"trace": _trace, "annotate": _annotate, "edit": _edit, "delete": _edit,
                "insert": _insert, "undo": _undo}
    return handlers[args.action](args, loaded)


def _trace(args: argparse.Namespace, loaded: Any) -> int:
    from engine.errors import InputError
    from engine.model.knowledge_edit import target_ids
    from engine.model.memory_trace import trace_ids

    ids = loaded.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    target = None if args.target is None else target_ids(loaded.tokenizer, args.target)[0]
    if ids.shape[1] == 0:
        raise InputError("--prompt tokenises to nothing; give some text")
    trace = trace_ids(loaded.model, ids, target=target)
    word = loaded.tokenizer.decode([trace.target])
    ranked = trace.ranked(args.top)
    from engine.model.annotate import Annotations

    notes = Annotations(Path(args.student).expanduser())
    labels = [(notes.get(e.layer, e.entry) or {}).get("label", "") if e.kind == "featural"
              else "" for e in ranked]
    data = {"target": word, "target_id": trace.target, "logit": trace.target_logit,
            "layers": {str(k): {"direct": v.direct, "bias": v.bias}
                       for k, v in trace.layers.items()},
            "entries": [{**vars(e), "label": label} for e, label in zip(ranked, labels,
                                                                         strict=True)]}
    lines = [f"next token {word!r} (logit {trace.target_logit:.3f}); direct effect by "
             "layer: " + ", ".join(f"{k}: {v.direct:+.3f}" for k, v in trace.layers.items()),
             "  layer  entry  head   weight  influence  label"]
    lines += [f"  {e.layer:5d}  {e.entry:5d}  {e.head:4d}  {e.weight:7.3f}  {e.influence:+9.4f}"
              f"  {label}" for e, label in zip(ranked, labels, strict=True)]
    _emit(args, data, "\n".join(lines))
    return 0


def _annotate(args: argparse.Namespace, loaded: Any) -> int:
    from engine.model.annotate import Annotations, annotate

    found = annotate(loaded.model, loaded.tokenizer, args.text, layers=args.layer,
                     tokens=args.tokens)
    Annotations(Path(args.student).expanduser()).save(found)
    strongest = sorted(found, key=lambda a: a.strength, reverse=True)[:5]
    lines = [f"annotated {len(found)} entries; the strongest:"]
    lines += [f"  layer {a.layer} entry {a.slot}: {a.label}   e.g. {a.triggers[0]}"
              for a in strongest]
    _emit(args, {"annotated": len(found), "strongest": [vars(a) for a in strongest]},
          "\n".join(lines))
    return 0


def _edit(args: argparse.Namespace, loaded: Any) -> int:
    import torch

    from engine.model.edit_session import commit
    from engine.model.knowledge_edit import (
        check_slots,
        delete_entries,
        featural_layer,
        scale_entries,
        set_values,
        target_ids,
    )

    model = loaded.model
    if args.action == "delete":
        edit = delete_entries(model, args.layer, args.entry)
    elif args.scale is not None:
        edit = scale_entries(model, args.layer, args.entry, args.scale)
    else:
        token = target_ids(loaded.tokenizer, args.promote)[0]
        module = featural_layer(model, args.layer)
        if module.values.shape[1] != model.config.hidden_size:
            from engine.errors import InputError

            raise InputError("--promote needs values in the hidden space (flat or routed "
                             "keys); use --scale on this layer")
        check_slots(module, args.layer, args.entry)
        direction = model.get_output_embeddings().weight[token].detach().float()
        norms = module.values.detach()[torch.tensor(args.entry)].norm(dim=-1, keepdim=True)
        rows = direction / direction.norm() * norms
        edit = set_values(model, args.layer, args.entry,
                          rows.contiguous(),
                          note=f"promote {args.promote!r}")
    edit_id = commit(model, args.student, edit, args.note, loaded.tokenizer)
    _emit(args, {"edit": edit_id, "op": edit.info.get("what"), "layer": edit.layer,
                 "entries": edit.slots},
          f"edit {edit_id}: {edit.info.get('what')} layer {edit.layer} entries "
          f"{', '.join(map(str, edit.slots))} (saved; `mindset memory undo "
          f"{args.student} {edit_id}` reverts it)")
    return 0


def _insert(args: argparse.Namespace, loaded: Any) -> int:
    from engine.model.edit_session import commit
    from engine.model.knowledge_edit import insert_fact

    before = _answer(loaded, args.prompt)
    edit = insert_fact(loaded.model, loaded.tokenizer, args.prompt, args.subject,
                       args.target, layer=args.layer, steps=args.steps)
    after = _answer(loaded, args.prompt)
    edit_id = commit(loaded.model, args.student, edit, args.note, loaded.tokenizer)
    _emit(args, {"edit": edit_id, "layer": edit.layer, "entries": edit.slots,
                 "before": before, "after": after},
          f"edit {edit_id}: inserted entry {edit.slots[0]} in layer {edit.layer}\n"
          f"  before: {args.prompt}{before}\n  after:  {args.prompt}{after}")
    return 0


def _undo(args: argparse.Namespace, loaded: Any) -> int:
    from engine.model.edit_session import undo

    undo_id = undo(loaded.model, args.student, args.edit_id, args.note, loaded.tokenizer)
    _emit(args, {"edit": undo_id, "undoes": args.edit_id},
          f"edit {undo_id}: undid edit {args.edit_id} (saved)")
    return 0


def _history(args: argparse.Namespace) -> int:
    from engine.model.edit_journal import EditJournal

    _load_spec_only(args.student)
    entries = [e.as_dict() for e in EditJournal(Path(args.student).expanduser()).entries()]
    if args.export is not None:
        args.export.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    lines = [f"{e['id']:4d}  {e['time']}  {e['op']:6s}  layer {e['layer']}  entries "
             f"{','.join(map(str, e['slots']))}  {e['info'].get('what', '')}"
             f"{' undone by ' + str(e['undone_by']) if e['undone_by'] else ''}"
             f"{' (undoes ' + str(e['undoes']) + ')' if e['undoes'] else ''}  {e['note']}"
             for e in entries]
    _emit(args, {"edits": entries}, "\n".join(lines) or "no edits yet")
    return 0


def _load_spec_only(student: str) -> Any:
    from engine.errors import InputError
    from engine.model.student import is_student_dir, read_spec

    directory = Path(student).expanduser()
    if not is_student_dir(directory):
        raise InputError(f"{student} is not a student directory; give the folder a "
                         "distillation or `save` wrote")
    return read_spec(directory.resolve())
