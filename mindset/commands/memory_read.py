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

from mindset.commands.progress import progress


def run_read(args: argparse.Namespace, loaded: Any, files: list[Path]) -> int:
    from engine.errors import InputError
    from engine.evaluation import model_context
    from engine.model.read_tables import open_student_tables
    from engine.model.reading import ReadReport, read_text, require_reading_layers
    from engine.textdata import read_text_file

    layers = require_reading_layers(loaded.model)
    context = model_context(loaded.model)
    if context is not None and args.chunk > context:
        raise InputError(f"--chunk {args.chunk} exceeds the model's context of {context} "
                         "tokens; give a smaller chunk")
    root = Path(args.path).expanduser()
    store, syncs = open_student_tables(Path(args.student).expanduser(), layers)
    total = ReadReport()
    bar = progress(len(files), "read", "doc", json_output=args.json)
    try:
        for file in files:
            name = str(file.relative_to(root)) if file != root else file.name
            report = read_text(loaded.model, loaded.tokenizer, read_text_file(file),
                               document=name, chunk_tokens=args.chunk)
            for sync in syncs.values():
                sync.sync()
            total.merge(report)
            bar.update(1)
            if not args.json:
                bar.write(f"{name}: {report.tokens} tokens, {report.entries_added} entries "
                          "added")
    finally:
        bar.close()
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
