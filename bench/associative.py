"""Associative memory: faithful where it replaces an MLP, and learning by reading.

Side by side on one teacher, for a middle and a late layer:

* faithfulness: perplexity of the teacher, of the teacher with that MLP zeroed, of the
  associative student (the recipe: the teacher's neurons as fixed entries, read entries on
  top; as ``mindset distill --memory associative`` builds it) and of the flat featural
  student on the same layer, on the held-out last 10% of wikitext2-valid and on
  tinyshakespeare; ratio to the teacher and gap closed (1 = the teacher, 0 = zeroed MLP);
* learning by reading (middle-layer student): held-out documents (windows of the last 10%
  of wikitext2-valid) read once with inserts on, scored before each is read, then read
  again; unrelated text (tinyshakespeare, and other held-out wikitext) scored before and
  after; entries inserted, insert throughput, table size against capacity.

    python bench/associative.py            # the default model, about 6 minutes on 2 cores
    python bench/associative.py --quick    # fewer tokens, about 2 minutes

Writes bench/results/associative.json (top level: ppl_ratio_middle, gap_closed_middle,
ppl_ratio_late, gap_closed_late, second_read_ratio, unrelated_ppl_change, inserts_per_s,
entries_inserted) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "associative.json"


def windows(ids: list[int], window: int, count: int, start: int = 0) -> list[list[int]]:
    chunks = [ids[i:i + window] for i in range(start, len(ids) - window + 1, window)]
    return chunks[:count]


def nll(model: Any, chunks: list[list[int]]) -> float:
    """Mean next-token loss over the windows, each scored on its own."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(chunk) - 1
    return total / count


def faithfulness(teacher: Any, layer: int, texts: dict[str, list[list[int]]],
                 calibration: Any, bar: Any) -> dict[str, Any]:
    from engine.model.anatomy import zeroed_mlps_hooks
    from engine.model.surgery import convert

    students = {
        "associative": convert(teacher, [layer], "associative", calibration=calibration),
        "featural_flat": convert(teacher, [layer], "featural", keys="flat"),
    }
    out: dict[str, Any] = {}
    for name, chunks in texts.items():
        base = nll(teacher.model, chunks)
        hooks = zeroed_mlps_hooks(teacher.model, [layer])
        try:
            zeroed = nll(teacher.model, chunks)
        finally:
            for hook in hooks:
                hook.remove()
        row: dict[str, Any] = {"teacher_ppl": math.exp(base), "zeroed_ppl": math.exp(zeroed)}
        for kind, student in students.items():
            loss = nll(student, chunks)
            gap = zeroed - base
            row[kind] = {"ppl": math.exp(loss), "ppl_ratio": math.exp(loss - base),
                         "gap_closed": (zeroed - loss) / gap if gap > 0 else None}
        out[name] = row
        bar.update(1)
    return out


def reading(teacher: Any, layer: int, documents: list[list[int]],
            unrelated: dict[str, list[list[int]]], calibration: Any, bar: Any) -> dict[str, Any]:
    from engine.model.reading import read_chunk, reading_layers
    from engine.model.surgery import convert

    student = convert(teacher, [layer], "associative", calibration=calibration)
    module = reading_layers(student)[layer]
    before = {name: nll(student, chunks) for name, chunks in unrelated.items()}
    first_total, count, added, seconds = 0.0, 0, 0, 0.0
    for chunk in documents:  # the first read: each document scored, then read
        first_total += nll(student, [chunk]) * (len(chunk) - 1)
        count += len(chunk) - 1
        report = read_chunk(student, teacher.tokenizer, chunk)
        added += report.entries_added
        seconds += report.seconds
        bar.update(1)
    first = first_total / count
    second = nll(student, documents)
    after = {name: nll(student, chunks) for name, chunks in unrelated.items()}
    return {
        "layer": layer, "documents": len(documents), "tokens": count + len(documents),
        "first_read_ppl": math.exp(first), "second_read_ppl": math.exp(second),
        "second_read_ratio": math.exp(second - first),
        "unrelated": {name: {"ppl_before": math.exp(before[name]),
                             "ppl_after": math.exp(after[name]),
                             "change": math.exp(after[name] - before[name]) - 1}
                      for name in unrelated},
        "entries_inserted": added, "inserts_per_s": added / seconds if seconds else None,
        "read_seconds": seconds, "table_entries": len(module.cache),
        "capacity": module.config.capacity, "config": module.config.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from engine.model.loading import load_model
    from mindset.commands.progress import progress

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--middle", type=int, default=15)
    parser.add_argument("--late", type=int, default=22)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--wikitext", type=Path, default=DATA / "wikitext2-valid.txt",
                        help="held-out text: its last 10%% is scored and read")
    parser.add_argument("--shakespeare", type=Path, default=DATA / "tinyshakespeare.txt",
                        help="the second held-out text, and the unrelated text for reading")
    parser.add_argument("--quick", action="store_true", help="fewer tokens (about 2 minutes)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()

    teacher = load_model(args.model)
    tok = teacher.tokenizer
    wiki = tok(args.wikitext.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    shakespeare = tok(args.shakespeare.read_text(encoding="utf-8")[:400_000],
                      add_special_tokens=False)["input_ids"]
    held = int(len(wiki) * 0.9)  # the held-out last 10%; calibration from the first 90%
    count = 8 if args.quick else 24
    calibration = torch.tensor(wiki[:16 * args.window]).view(16, args.window)
    texts = {"wikitext_heldout": windows(wiki, args.window, count, held),
             "tinyshakespeare": windows(shakespeare, args.window, count)}
    read_docs = count // 2
    bar = progress(2 * len(texts) + read_docs, "associative", "phase")
    faithful = {str(layer): faithfulness(teacher, layer, texts, calibration, bar)
                for layer in (args.middle, args.late)}
    documents = windows(wiki, args.window, read_docs, held)
    unrelated = {"tinyshakespeare": windows(shakespeare, args.window, read_docs),
                 "wikitext_other": windows(wiki, args.window, read_docs,
                                           held + (read_docs + 4) * args.window)}
    read = reading(teacher, args.middle, documents, unrelated, calibration, bar)
    bar.close()

    def worst(layer: int, key: str) -> float:
        rows = faithful[str(layer)].values()
        values = [row["associative"][key] for row in rows]
        return max(values) if key == "ppl_ratio" else min(values)

    changes = [abs(row["change"]) for row in read["unrelated"].values()]
    report = {
        "model": args.model, "window": args.window, "quick": args.quick,
        "ppl_ratio_middle": worst(args.middle, "ppl_ratio"),
        "gap_closed_middle": worst(args.middle, "gap_closed"),
        "ppl_ratio_late": worst(args.late, "ppl_ratio"),
        "gap_closed_late": worst(args.late, "gap_closed"),
        "second_read_ratio": read["second_read_ratio"],
        "unrelated_ppl_change": max(changes),
        "inserts_per_s": read["inserts_per_s"], "entries_inserted": read["entries_inserted"],
        "notes": "ratios and gap closed: the worse of the two held-out texts; "
                 "unrelated_ppl_change: the largest |change| over the unrelated texts",
        "faithfulness": faithful, "reading": read,
        "seconds": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for layer, rows in faithful.items():
        for text, row in rows.items():
            a, f = row["associative"], row["featural_flat"]
            print(f"layer {layer:>2} {text:17} teacher {row['teacher_ppl']:8.3f}  zeroed "
                  f"{row['zeroed_ppl']:8.3f}  associative {a['ppl_ratio']:.4f}x "
                  f"(gap {a['gap_closed']:.3f})  featural flat {f['ppl_ratio']:.4f}x "
                  f"(gap {f['gap_closed']:.3f})  assoc/featural "
                  f"{a['ppl'] / f['ppl']:.4f}")
    print(f"reading (layer {args.middle}): first {read['first_read_ppl']:.3f} second "
          f"{read['second_read_ppl']:.3f} ratio {read['second_read_ratio']:.3f}; unrelated "
          + ", ".join(f"{k} {v['change'] * 100:+.2f}%" for k, v in read["unrelated"].items())
          + f"; {read['entries_inserted']} entries at {read['inserts_per_s']:.0f}/s, table "
          f"{read['table_entries']}/{read['capacity']}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
