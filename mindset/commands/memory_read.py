"""``mindset memory read STUDENT PATH``: a student reads a file or a folder of notes.

Every text file is read in chunks; its associative layers write an entry per novel context
(with the context, the document and the position beside it) and each document's entries are
committed to the student's own memory store in one batch, so chatting with the student
afterwards draws on them and a crash mid-read keeps every document already read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ".org", ".tex", ".csv", ".json",
                 ".html", ".htm", ".xml", ".yaml", ".yml", ".py", ".log"}
MAX_FILES = 10_000


def text_files(path: Path) -> list[Path]:
    """The text files to read under ``path`` (itself, if a file), sorted; a clear error
    before any work for a missing path, a binary file or a folder without text."""
    from engine.errors import InputError
    from engine.textdata import read_text_file

    path = path.expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; give a text file or a folder of "
                         "notes")
    if path.is_file():
        read_text_file(path)  # refuses binary, non-UTF-8 and empty files
        return [path]
    if not path.is_dir():
        raise InputError(f"{path} is not a regular file or folder; give a text file or a "
                         "folder of notes")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower()
                   in TEXT_SUFFIXES and not any(part.startswith(".")
                                                for part in p.relative_to(path).parts))
    if not found:
        raise InputError(f"{path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES)[:6])}"
                         ", ...); give a folder of notes")
    if len(found) > MAX_FILES:
        raise InputError(f"{path} holds {len(found)} text files, more than {MAX_FILES}; read "
                         "a smaller folder")
    for file in found:
        read_text_file(file)
    return found


def run_read(args: argparse.Namespace, loaded: Any, files: list[Path]) -> int:
    from engine.model.read_tables import open_student_tables
    from engine.model.reading import ReadReport, read_text, require_reading_layers
    from engine.textdata import read_text_file

    layers = require_reading_layers(loaded.model)
    root = Path(args.path).expanduser()
    store, syncs = open_student_tables(Path(args.student).expanduser(), layers)
    total = ReadReport()
    try:
        for file in files:
            name = str(file.relative_to(root)) if file != root else file.name
            report = read_text(loaded.model, loaded.tokenizer, read_text_file(file),
                               document=name, chunk_tokens=args.chunk)
            for sync in syncs.values():
                sync.sync()
            total.merge(report)
            if not args.json:
                print(f"{name}: {report.tokens} tokens, {report.entries_added} entries added")
    finally:
        store.close()
    sizes = {str(layer): {"entries": len(module.cache), "capacity": module.config.capacity}
             for layer, module in sorted(layers.items())}
    data = {**total.as_dict(), "tables": sizes}
    if args.json:
        print(json.dumps(data))
    else:
        rate = data["entries_per_s"] or 0
        tables = ", ".join(f"layer {layer} {size['entries']}/{size['capacity']}"
                           for layer, size in sizes.items())
        print(f"read {total.documents} document(s), {total.tokens} tokens: "
              f"{total.entries_added} entries added ({rate:.0f}/s); {tables}")
    return 0
