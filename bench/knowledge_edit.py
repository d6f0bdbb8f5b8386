"""Knowledge editing on a distilled student, CounterFact style (Meng et al. 2022).

    .venv/bin/python bench/knowledge_edit.py --data COUNTERFACT_JSON --student DIR \
        --heldout WIKITEXT [--quick] [--out FILE]

Records in EasyEdit's CounterFact format (``prompt``, ``subject``, ``ground_truth``,
``target_new``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``). Only
records whose ground truth the student prefers to the new target are edited (their case ids
are listed). Each is inserted as a new memory entry (``engine.model.knowledge_edit``) and
scored, where "A beats B after P" compares the mean log-probability of each answer's tokens:

* efficacy: the new target beats the ground truth after ``prompt``;
* paraphrase: the same after ``rephrase_prompt``;
* specificity: ``locality_ground_truth`` still beats the new target after
  ``locality_prompt`` (``specificity_before`` gives the same share before any edit);
* ppl_change: relative change of perplexity on the held-out text.

Two ways: each edit alone (then undone; perplexity on every 10th), and all of them together:
each edit as fitted alone, applied one after another to the same student (every new group's
router row set against the groups already there), then all scored. The teacher has no
memory to insert into, so only its preference baseline is reported. ``--quick`` edits 8
records and writes a temp file unless ``--out`` is given; committed results are never
touched by it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "knowledge_edit.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="CounterFact JSON records")
    parser.add_argument("--student", required=True, type=Path,
                        help="a distilled student directory with routed memory layers")
    parser.add_argument("--heldout", required=True, type=Path,
                        help="held-out text for the perplexity change (its last 10%% is used)")
    parser.add_argument("--records", type=int, default=None, help="edits (default 100)")
    parser.add_argument("--steps", type=int, default=25, help="value-fitting steps per edit")
    parser.add_argument("--layer", type=int, default=None,
                        help="memory layer to insert into (default: ranked by the trace)")
    parser.add_argument("--sequential", choices=("fitted", "applied"), default="fitted",
                        help="all edits together: each fitted on the model the earlier "
                        "edits already changed (fitted, the default), or each as fitted "
                        "alone, applied one after another (applied)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def answer_logprob(model: Any, tokenizer: Any, prompt: str, answer: str) -> float:
    import torch

    from engine.model.knowledge_edit import target_ids

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    answer_ids = torch.tensor(target_ids(tokenizer, answer))
    full = torch.cat([ids, answer_ids]).view(1, -1)
    with torch.no_grad():
        logits = model(input_ids=full).logits[0, ids.numel() - 1:-1]
    return float(torch.log_softmax(logits.float(), -1).gather(
        1, answer_ids.view(-1, 1)).mean())


def beats(model: Any, tokenizer: Any, prompt: str, first: str, second: str) -> bool:
    return answer_logprob(model, tokenizer, prompt, first) > answer_logprob(
        model, tokenizer, prompt, second)


def scores(model: Any, tokenizer: Any, record: dict[str, Any]) -> dict[str, bool]:
    return {
        "efficacy": beats(model, tokenizer, record["prompt"], record["target_new"],
                          record["ground_truth"]),
        "paraphrase": beats(model, tokenizer, record["rephrase_prompt"], record["target_new"],
                            record["ground_truth"]),
        "specificity": beats(model, tokenizer, record["locality_prompt"],
                             record["locality_ground_truth"], record["target_new"]),
    }


def share(rows: list[dict[str, bool]], key: str) -> float:
    return sum(r[key] for r in rows) / max(1, len(rows))


def rebased(model: Any, edit: Any) -> Any:
    """An insert fitted alone, renumbered to append to the layer as it is now."""
    import dataclasses

    from engine.model.surgery import memory_layers

    first = memory_layers(model)[edit.layer].num_slots
    return dataclasses.replace(edit, slots=[first + i for i in range(len(edit.slots))],
                               info={**edit.info, "first_slot": first})


def summary(args: argparse.Namespace, chosen: list[dict[str, Any]], scanned: int,
            layers: list[int], singles: list[dict[str, bool]], before: list[dict[str, bool]],
            single_ppl: list[float], restored_ppl: float, base_ppl: float, ppl_tokens: int,
            teacher_prefers: list[bool], started: float) -> dict[str, Any]:
    return {
        "student": str(args.student),
        "teacher": json.loads((args.student / "mindset_student.json").read_text())["teacher"],
        "records_scanned": scanned, "edit_steps": args.steps,
        "layers_used": sorted(set(layers)),
        "efficacy": share(singles, "efficacy"), "paraphrase": share(singles, "paraphrase"),
        "specificity": share(singles, "specificity"),
        "specificity_before": share(before, "specificity"),
        "paraphrase_before": share(before, "paraphrase"),
        "ppl_change": sum(single_ppl) / max(1, len(single_ppl)),
        "ppl_change_max": max(single_ppl, default=0.0),
        "ppl_after_undo_change": restored_ppl / base_ppl - 1,
        "sequential_efficacy": None, "sequential_paraphrase": None,
        "sequential_specificity": None, "sequential_ppl_change": None,
        "base_ppl": base_ppl, "heldout_tokens": ppl_tokens,
        "teacher_prefers_ground_truth": sum(teacher_prefers) / max(1, len(teacher_prefers)),
        "edits": [r["case_id"] for r in chosen],
        "cpu_seconds": time.process_time() - started,
        "quick": args.quick,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from engine.evaluation import perplexity
    from engine.model.knowledge_edit import apply_edit, insert_fact, undo_edit
    from engine.model.loading import load_model

    torch.set_num_threads(2)
    started = time.process_time()
    records = json.loads(args.data.read_text(encoding="utf-8"))
    wanted = args.records or (8 if args.quick else 100)
    text = args.heldout.read_text(encoding="utf-8")
    heldout = text[int(len(text) * 0.9):]
    ppl_tokens = 512 if args.quick else 2048
    student = load_model(str(args.student))
    teacher = load_model(json.loads((args.student / "mindset_student.json").read_text())
                         ["teacher"])
    model, tokenizer = student.model, student.tokenizer

    def ppl() -> float:
        return perplexity(model, tokenizer, heldout, tokens=ppl_tokens, window=512).ppl

    base_ppl = ppl()
    chosen: list[dict[str, Any]] = []
    scanned = 0
    for record in records:
        if len(chosen) >= wanted:
            break
        if record["subject"] not in record["prompt"] or record["subject"] not in record.get(
                "rephrase_prompt", ""):
            continue
        scanned += 1
        if beats(model, tokenizer, record["prompt"], record["ground_truth"],
                 record["target_new"]):
            chosen.append(record)
    before = [scores(model, tokenizer, r) for r in chosen]
    teacher_prefers = [beats(teacher.model, teacher.tokenizer, r["prompt"], r["ground_truth"],
                             r["target_new"]) for r in chosen]
    print(f"{len(chosen)} records chosen of {scanned} scanned; base ppl {base_ppl:.3f}",
          flush=True)

    edits: list[Any] = []
    singles: list[dict[str, bool]] = []
    single_ppl: list[float] = []
    layers: list[int] = []
    for index, record in enumerate(chosen):
        edit = insert_fact(model, tokenizer, record["prompt"], record["subject"],
                           record["target_new"], layer=args.layer, steps=args.steps)
        layers.append(edit.layer)
        edits.append(edit)
        singles.append(scores(model, tokenizer, record))
        if index % 10 == 0:
            single_ppl.append(ppl() / base_ppl - 1)
        undo_edit(model, edit)
        if index % 10 == 9:
            print(f"  single {index + 1}: efficacy {share(singles, 'efficacy'):.2f} "
                  f"paraphrase {share(singles, 'paraphrase'):.2f} "
                  f"specificity {share(singles, 'specificity'):.2f}", flush=True)
    restored_ppl = ppl()

    results = summary(args, chosen, scanned, layers, singles, before, single_ppl,
                      restored_ppl, base_ppl, ppl_tokens, teacher_prefers, started)
    out = args.out or (Path(tempfile.mkstemp(suffix=".json")[1]) if args.quick else RESULTS)
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")  # singles, if stopped
    if args.sequential == "applied":  # each edit as fitted alone, applied in sequence
        for edit in edits:
            apply_edit(model, rebased(model, edit))
    else:  # each edit fitted on the model that holds every earlier edit
        for index, record in enumerate(chosen):
            insert_fact(model, tokenizer, record["prompt"], record["subject"],
                        record["target_new"], layer=args.layer, steps=args.steps)
            if index % 10 == 9:
                print(f"  sequential {index + 1} inserted", flush=True)
    sequential = [scores(model, tokenizer, r) for r in chosen]
    sequential_ppl = ppl() / base_ppl - 1

    results.update({
        "sequential_mode": args.sequential,
        "sequential_efficacy": share(sequential, "efficacy"),
        "sequential_paraphrase": share(sequential, "paraphrase"),
        "sequential_specificity": share(sequential, "specificity"),
        "sequential_ppl_change": sequential_ppl,
        "cpu_seconds": time.process_time() - started,
    })
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                      for k, v in results.items() if k != "edits"}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
