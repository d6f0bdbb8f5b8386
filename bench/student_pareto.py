"""One benchmark, one student: quality, speed, memory and cost of routed-memory students.

For 1 middle layer, 3 evenly spaced layers and every layer of the model replaced by routed
featural memory (``keys=routed``, the recommended read: a third of 64-slot groups), each
student is distilled by the recommended recipe (router stage, layer-local stage on captured
pairs, end-to-end KL) on the first 90% of ``--data``, then measured side by side with the
teacher in this one run, on that same saved student (loaded as a user loads it, its memory
layers memory-mapped):

* perplexity ratio on the held-out last 10% of ``--data`` and on ``--ood`` (another domain,
  never trained on), KL per token and top-1 agreement with the teacher (on ``--data``);
* prefill tokens/s (512-token windows) and batch-1 greedy generation tokens/s (128 new
  tokens) over the teacher's, timed round-robin so machine load hits every model alike;
* peak RSS and peak anonymous memory of a fresh process that loads only that model and runs
  the same prefill and generation, over the teacher's;
* the share of the MLP's multiply-adds spent per token, and the CPU time of each distillation;
* for the all-layer student, perplexity ratio against the read share (the same student read
  at other shares).

    python bench/student_pareto.py --data ../shared/data/wikitext2-valid.txt \\
        --ood ../shared/data/tinyshakespeare.txt
    python bench/student_pareto.py --data D --ood O --quick      # minutes, to a temp file
    python bench/student_pareto.py --model tiny-llama --data D --ood O --quick --out /tmp/p.json

Writes ``bench/results/student_pareto.json`` (a ``--quick`` run writes to a temporary file
unless given ``--out``; no run ever writes under ``bench/results`` unless asked to).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "student_pareto.json"
SETS = ("1_layer", "3_layers", "all_layers")
CURVE_SHARES = (1 / 8, 1 / 4, 1 / 3, 1 / 2, 1.0)
# The recommended recipe, per set: steps of each stage and the captured local pairs.
RECIPES: dict[str, dict[str, int]] = {
    "1_layer": dict(router_steps=100, local_steps=300, local_tokens=32768,
                    local_batch_tokens=2048, steps=20),
    "3_layers": dict(router_steps=100, local_steps=300, local_tokens=32768,
                     local_batch_tokens=2048, steps=20),
    "all_layers": dict(router_steps=60, local_steps=150, local_tokens=16384,
                       local_batch_tokens=1024, steps=20),
}
QUICK = dict(router_steps=4, local_steps=4, local_tokens=1024, local_batch_tokens=256, steps=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", type=Path, required=True, help="training text (WikiText)")
    parser.add_argument("--ood", type=Path, required=True, help="held-out text of another domain")
    parser.add_argument("--quick", action="store_true", help="a few steps, few tokens")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="tokens of each held-out text (default 8,192; quick 1,024)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="generated tokens per timing (default 128)")
    parser.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                        help="routed memory setting (repeatable), e.g. read_share=0.25")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--runs-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse-runs", action="store_true",
                        help="measure the students already distilled in --runs-dir by this "
                        "recipe again, without distilling (their CPU time is read back)")
    args = parser.parse_args(argv)
    unknown = set(args.sets.split(",")) - set(SETS)
    if unknown:
        parser.error(f"unknown sets {sorted(unknown)}; choose from {', '.join(SETS)}")
    for path in (args.data, args.ood):
        if not path.is_file():
            parser.error(f"{path} is not a file; give a UTF-8 text file")
    if args.reuse_runs and args.runs_dir is None:
        parser.error("--reuse-runs needs --runs-dir, the folder of an earlier run")
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "student_pareto.quick.json" if args.quick
                    else DEFAULT_OUTPUT)
    return args


def layer_sets(num_layers: int) -> dict[str, list[int]]:
    middle = num_layers // 2
    spaced = sorted({round((num_layers - 1) * f) for f in (0.25, 0.5, 0.75)})
    return {"1_layer": [middle], "3_layers": spaced, "all_layers": list(range(num_layers))}


def hparams_of(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"keys": "routed"}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def distil(args: argparse.Namespace, label: str, layers: list[int], train_file: Path,
           runs: Path) -> tuple[Path, dict[str, Any]]:
    from engine.distill.config import DistillConfig
    from engine.distill.loop import run_distillation

    recipe = QUICK if args.quick else RECIPES[label]
    config = DistillConfig(
        teacher=args.model, layers=",".join(map(str, layers)), memory="featural",
        hparams=hparams_of(args.hparam), data=[str(train_file)], batch_size=4,
        lr=3e-4, value_lr=3e-4, block_size=64 if args.quick else 256,
        heldout_fraction=0.05, heldout_blocks=4, eval_every=10**6,
        checkpoint_every=10**6, threads=args.threads, **recipe,
    )
    run_dir = runs / label
    started = time.time()
    if args.reuse_runs:
        report = reused_report(run_dir, config)
    else:
        report = run_distillation(config, run_dir, resume=False)
    recall = [e for e in read_steps(run_dir) if e.get("router_recall") is not None]
    return run_dir / "student", {
        "recipe": recipe, "cpu_seconds": report["cpu_seconds"],
        "wall_seconds": report.get("wall_seconds", time.time() - started),
        "router_recall_first": recall[0]["router_recall"] if recall else None,
        "router_recall_last": recall[-1]["router_recall"] if recall else None,
    }


def reused_report(run_dir: Path, config: Any) -> dict[str, Any]:
    """The report of a completed run in ``run_dir`` made with exactly ``config``."""
    from engine.distill.config import DistillConfig

    saved = DistillConfig.load(run_dir / "config.json")
    report_file = run_dir / "report.json"
    if saved.to_dict() != config.to_dict() or not report_file.is_file():
        raise SystemExit(f"{run_dir} holds no completed run of this recipe; distil it again "
                         "(drop --reuse-runs)")
    report: dict[str, Any] = json.loads(report_file.read_text(encoding="utf-8"))
    return report


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    from engine.distill.job_events import StepEvent, read_events

    return [vars(e) for e in read_events(run_dir) if isinstance(e, StepEvent)]


def windows(tokenizer: Any, text: str, tokens: int, window: int) -> Any:
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[0][:tokens]
    count = len(ids) // window
    return ids[: count * window].view(count, window) if count else torch.empty(0, window)


def compare(models: dict[str, Any], blocks: Any) -> dict[str, dict[str, float]]:
    """Perplexity of each model; KL per token and top-1 agreement against the teacher."""
    import torch
    import torch.nn.functional as F

    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in models}
    count = 0
    with torch.inference_mode():
        for block in blocks:
            ids = block.view(1, -1)
            teacher = models["teacher"](input_ids=ids).logits[0, :-1].float()
            teacher_log = F.log_softmax(teacher, dim=-1)
            count += ids.shape[1] - 1
            for name, model in models.items():
                logits = teacher if name == "teacher" else \
                    model(input_ids=ids).logits[0, :-1].float()
                log = F.log_softmax(logits, dim=-1)
                sums[name]["nll"] -= float(log.gather(1, ids[0, 1:].view(-1, 1)).sum())
                sums[name]["kl"] += float((teacher_log.exp() * (teacher_log - log)).sum())
                sums[name]["agree"] += float((logits.argmax(-1) == teacher.argmax(-1)).sum())
    return {name: {"ppl": math.exp(s["nll"] / max(1, count)), "kl": s["kl"] / max(1, count),
                   "top1": s["agree"] / max(1, count)} for name, s in sums.items()}


def timings(models: dict[str, Any], prompt: Any, window: Any, rounds: int,
            new_tokens: int) -> dict[str, dict[str, float]]:
    """Best-of-rounds prefill and generation tokens/s, round-robin over the models.

    Each round starts with another model (the order rotates), so no model always runs right
    after the same neighbour; every model is warmed up on a whole window first.
    """
    import torch

    best: dict[str, dict[str, float]] = {n: {"prefill": 0.0, "generate": 0.0} for n in models}
    names = list(models)
    with torch.inference_mode():
        for model in models.values():  # warm up: touch every weight once
            model(input_ids=window)
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                model = models[name]
                started = time.perf_counter()
                model(input_ids=window)
                prefill = window.numel() / (time.perf_counter() - started)
                started = time.perf_counter()
                model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)
                generate = new_tokens / (time.perf_counter() - started)
                best[name]["prefill"] = max(best[name]["prefill"], prefill)
                best[name]["generate"] = max(best[name]["generate"], generate)
    return best


MEMORY_PROBE = """
import json, sys, torch
from engine.process_memory import PeakMemory
spec, threads, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
with PeakMemory() as peak:
    from engine.model.loading import load_model
    loaded = load_model(spec)
    seeded = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 512), generator=seeded)
    with torch.inference_mode():
        loaded.model(input_ids=ids)
        loaded.model.generate(ids[:, :16], max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
print(json.dumps({"peak_rss_mb": peak.peak_rss_mb, "peak_anon_mb": peak.peak_anon_mb}))
"""


def peak_memory(spec: str, threads: int, new_tokens: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, spec, str(threads),
                           str(new_tokens)], capture_output=True, text=True, cwd=ROOT,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_ram_copy(spec: str) -> Any:
    """The teacher with every weight copied into process memory (ties kept)."""
    import torch

    from engine.model.loading import load_model

    model = load_model(spec).model
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    model.tie_weights()
    return model


def cost_share(student: Any) -> float:
    from engine.model.surgery import memory_layers

    layers = memory_layers(student)
    inner = student.config.intermediate_size if hasattr(student.config, "intermediate_size") \
        else student.config.n_inner or 4 * student.config.n_embd
    shares = [m.config.cost_share(inner) for m in layers.values()]
    return sum(shares) / len(shares)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from engine.model.loading import load_model
    from engine.model.surgery import memory_layers

    cpu_start = time.process_time()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = load_model(args.model)
    tokenizer = teacher.tokenizer
    text = args.data.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="student-pareto-"))
    runs.mkdir(parents=True, exist_ok=True)
    train_file = runs / "train.txt"
    train_file.write_text(text[:cut], encoding="utf-8")
    eval_tokens = args.eval_tokens or (1024 if args.quick else 8192)
    window = 128 if args.quick else 512
    heldout = {"wikitext": windows(tokenizer, text[cut:], eval_tokens, window),
               "shakespeare": windows(tokenizer, args.ood.read_text(encoding="utf-8"),
                                      eval_tokens, window)}
    sets = layer_sets(teacher.model.config.num_hidden_layers)
    chosen = [s for s in SETS if s in args.sets.split(",")]
    results: dict[str, Any] = {"model": args.model, "hparams": hparams_of(args.hparam),
                               "quick": args.quick, "eval_tokens": eval_tokens,
                               "window": window, "students": {}}
    students: dict[str, Any] = {}
    for label in chosen:
        print(f"distilling {label} (layers {sets[label]}) ...", flush=True)
        directory, info = distil(args, label, sets[label], train_file, runs)
        students[label] = load_model(str(directory)).model
        info.update(layers=sets[label], student=str(directory),
                    mlp_cost_share=cost_share(students[label]))
        results["students"][label] = info
        print(f"  {label}: {info['cpu_seconds']:.0f} CPU s, router recall "
              f"{info['router_recall_first']} -> {info['router_recall_last']}", flush=True)
    models = {"teacher": teacher.model, **students}
    for domain, blocks in heldout.items():
        measured = compare(models, blocks)
        for label in students:
            row = results["students"][label]
            row[f"ppl_{domain}"] = measured[label]["ppl"]
            row[f"ppl_ratio_{domain}"] = measured[label]["ppl"] / measured["teacher"]["ppl"]
            row[f"kl_{domain}"] = measured[label]["kl"]
            row[f"top1_{domain}"] = measured[label]["top1"]
        results[f"ppl_teacher_{domain}"] = measured["teacher"]["ppl"]
    rounds = args.rounds or (1 if args.quick else 4)
    new_tokens = args.new_tokens or (8 if args.quick else 128)
    prompt = tokenizer("The history of the city", return_tensors="pt").input_ids
    # The teacher as Hugging Face loads it (weights mapped from its file) ran 1.18x slower at
    # batch 1 than the same weights copied into RAM, and a 1-layer student measured 1.18x
    # "faster" against it. Speed ratios divide by the copy (the same architecture's best),
    # and the ratios against the teacher as loaded are kept beside them.
    in_ram = in_ram_copy(args.model)
    speed = timings({**models, "teacher_in_ram": in_ram}, prompt, heldout["wikitext"][:1],
                    rounds, new_tokens)
    del in_ram
    results["teacher_speed"] = speed["teacher_in_ram"]
    results["teacher_as_loaded_speed"] = speed["teacher"]
    teacher_memory = peak_memory(args.model, args.threads, new_tokens)
    results["teacher_memory"] = teacher_memory
    for label in students:
        row = results["students"][label]
        row["prefill_tok_s"] = speed[label]["prefill"]
        row["generate_tok_s"] = speed[label]["generate"]
        for kind in ("prefill", "generate"):
            row[f"{kind}_speed_ratio"] = speed[label][kind] / speed["teacher_in_ram"][kind]
            row[f"{kind}_speed_ratio_vs_loaded_teacher"] = (speed[label][kind]
                                                            / speed["teacher"][kind])
        memory = peak_memory(row["student"], args.threads, new_tokens)
        row.update(memory)
        row["rss_ratio"] = memory["peak_rss_mb"] / teacher_memory["peak_rss_mb"]
        row["anon_mem_ratio"] = memory["peak_anon_mb"] / teacher_memory["peak_anon_mb"]
    if "all_layers" in students:
        curve = []
        student = students["all_layers"]
        for share in CURVE_SHARES:
            for layer in memory_layers(student).values():
                layer.set_read_share(share)
            measured = compare({"teacher": teacher.model, "s": student}, heldout["wikitext"])
            curve.append({"read_share": share, "mlp_cost_share": cost_share(student),
                          "ppl_ratio_wikitext": measured["s"]["ppl"] / measured["teacher"]["ppl"],
                          "kl_wikitext": measured["s"]["kl"]})
            print(f"  read share {share:.3f}: ppl ratio {curve[-1]['ppl_ratio_wikitext']:.4f}",
                  flush=True)
        results["curve_all_layers"] = curve
    summarise(results, students, time.process_time() - cpu_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def summarise(results: dict[str, Any], students: dict[str, Any], bench_cpu: float) -> None:
    rows = results["students"]
    for label in students:
        for domain in ("wikitext", "shakespeare"):
            results[f"ppl_ratio_{domain}_{label}"] = rows[label][f"ppl_ratio_{domain}"]
    if "all_layers" in rows:
        every = rows["all_layers"]
        results["prefill_speed_ratio_all_layers"] = every["prefill_speed_ratio"]
        results["generate_speed_ratio_all_layers"] = every["generate_speed_ratio"]
        results["anon_mem_ratio_all_layers"] = every["anon_mem_ratio"]
    results["mlp_cost_share"] = max(row["mlp_cost_share"] for row in rows.values())
    results["cpu_seconds"] = {"benchmark_process": bench_cpu,
                              **{label: row["cpu_seconds"] for label, row in rows.items()}}
    print("\nset         ppl wiki  ppl shak  KL/tok  top-1  prefill  generate  anon mem  cost")
    for label, row in rows.items():
        print(f"{label:<11} {row['ppl_ratio_wikitext']:8.4f}  {row['ppl_ratio_shakespeare']:8.4f}"
              f"  {row['kl_wikitext']:6.3f}  {row['top1_wikitext']:5.3f}"
              f"  {row['prefill_speed_ratio']:6.2f}x  {row['generate_speed_ratio']:7.2f}x"
              f"  {row['anon_mem_ratio']:7.2f}x  {row['mlp_cost_share']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
