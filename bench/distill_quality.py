"""How close do distilled memory students get to their teacher, against dense controls?

Side by side in one run, on one teacher and one text (trained on the first 90%, scored on the
last 10%): students with 1 middle layer, 3 evenly spaced layers and all layers replaced by
featural memory, each against a compute-matched control (a dense MLP as wide as the memory's
active width: the slots read per token, top-k for flat keys or heads x top-k for product keys;
trained on the same tokens with the same steps; for a memory started from the teacher's MLP
the control starts as that MLP pruned to its most important neurons), plus the distillation
throughput divided by plain fine-tuning throughput of the teacher (same batch).

By default the memory has flat keys: the teacher MLP's 1,536 neurons become 1,536 slots (key =
input weights, value = output weights) of which each token reads its top 512 by |weight|; the
layer-local stage fits them on captured MLP pairs, then end-to-end KL fixes what compounds.

This is not the recommended student: flat keys score all 1,536 keys for every token (about
0.78 of the MLP's multiply-adds), so they show what distillation can recover with an oracle
top-k, not a fast memory. The recommended routed student (``keys=routed``, 0.35 of the MLP's
multiply-adds) is measured for quality, speed and memory at once by
``bench/student_pareto.py``.

    python bench/distill_quality.py --data ../shared/data/wikitext2-valid.txt
    python bench/distill_quality.py --data FILE --quick          # minutes, not hours
    python bench/distill_quality.py --model tiny-llama --data FILE --quick --out /tmp/x.json

Writes bench/results/distill_quality.json (``--out``) with the figures, each run's CPU time,
settings and the student's config (not its weights) so every figure can be reproduced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETS = ("1_layer", "3_layers", "all_layers")


def layer_sets(num_layers: int) -> dict[str, list[int]]:
    return {
        "1_layer": [num_layers // 2],
        "3_layers": sorted({int(num_layers * (i + 1) / 4) for i in range(3)}),
        "all_layers": list(range(num_layers)),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", required=True, help="a UTF-8 text file (e.g. wikitext2-valid)")
    parser.add_argument("--quick", action="store_true", help="a few steps per run")
    parser.add_argument("--sets", default=",".join(SETS),
                        help=f"which students to run, from {', '.join(SETS)}")
    parser.add_argument("--steps", type=int, default=None, help="end-to-end steps per run")
    parser.add_argument("--local-steps", type=int, default=None, help="layer-local steps")
    parser.add_argument("--all-steps", type=int, default=None,
                        help="end-to-end steps of the all-layers runs (default: --steps)")
    parser.add_argument("--all-local-steps", type=int, default=None,
                        help="layer-local steps of the all-layers runs (default: --local-steps)")
    parser.add_argument("--local-tokens", type=int, default=None,
                        help="training tokens whose MLP pairs feed the layer-local stage")
    parser.add_argument("--local-batch-tokens", type=int, default=None,
                        help="token rows per layer-local step")
    parser.add_argument("--keys", choices=["flat", "product"], default="flat",
                        help="featural keys: flat (the MLP's neurons as slots, top-k read) "
                        "or product (num_subkeys^2 learned slots)")
    parser.add_argument("--init", choices=["mlp", "data", "random"], default="mlp")
    parser.add_argument("--control-init", choices=["mlp", "zero"], default=None,
                        help="dense control start (default: mlp when --init mlp and flat keys)")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--heldout-blocks", type=int, default=None)
    parser.add_argument("--num-subkeys", type=int, default=None)
    parser.add_argument("--topk", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--query-dim", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--value-lr", type=float, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's)")
    parser.add_argument("--runs-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="the results file (default: bench/results/distill_quality.json; "
                        "a --quick run writes to a temporary folder unless given --out, so "
                        "it never touches the committed results)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="distill-quality-")) / "distill_quality.json"
                    if args.quick else ROOT / "bench" / "results" / "distill_quality.json")
    quick = args.quick
    flat = args.keys == "flat"
    defaults = dict(steps=(4 if quick else 60), local_steps=(4 if quick else 300),
                    local_tokens=(256 if quick else 65536),
                    local_batch_tokens=(64 if quick else 4096),
                    block_size=(64 if quick else 256), batch_size=(2 if quick else 4),
                    heldout_blocks=(4 if quick else 48), num_subkeys=(16 if quick else 128),
                    topk=(4 if quick else (512 if flat else 16)), heads=(2 if quick else 4),
                    query_dim=(16 if quick else 64), finetune_steps=(3 if quick else 6))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lr is None:  # a memory started from the MLP needs only small corrections
        args.lr = 3e-4 if (flat and args.init == "mlp") else 1e-3
    if args.value_lr is None and flat:
        args.value_lr = args.lr  # flat values are the MLP's own output weights
    if args.all_steps is None:
        args.all_steps = args.steps
    if args.all_local_steps is None:
        args.all_local_steps = args.local_steps
    if args.control_init is None:
        args.control_init = "mlp" if (flat and args.init == "mlp") else "zero"
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = sorted(set(args.sets) - set(SETS))
    if unknown:
        parser.error(f"unknown sets {unknown}; give some of {', '.join(SETS)}")
    return args


def finetune_tokens_per_s(teacher: Any, blocks: Any, *, steps: int, batch_size: int) -> float:
    """Plain full fine-tuning of a copy of the teacher (AdamW, next-token CE), tokens/s."""
    import copy

    import torch

    model = copy.deepcopy(teacher)
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rates = []
    for step in range(steps + 1):
        batch = blocks[(step * batch_size) % len(blocks):][:batch_size]
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        if step:  # the first step warms up allocations
            rates.append(batch.numel() / (time.perf_counter() - started))
    del model, optimizer
    return statistics.median(rates)


def distill_rate(run_dir: Path) -> float | None:
    from engine.distill.job_events import StepEvent, read_events

    rates = [e.tokens_per_s for e in read_events(run_dir)
             if isinstance(e, StepEvent) and e.stage == "e2e"]
    return statistics.median(rates[1:] or rates) if rates else None


def student_files(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("mindset_student.json", "config.json"):
        path = run_dir / "student" / name
        if path.exists():
            out[name] = json.loads(path.read_text(encoding="utf-8"))
    return out


def keep_student_configs(out: Path, label: str, files: dict[str, Any]) -> None:
    """The student's configs (not its weights) beside the results, to be committed."""
    directory = out.parent / f"{out.stem}_students" / label
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def write_results(path: Path, results: dict[str, Any], started_cpu: float,
                  started_wall: float) -> None:
    results["cpu_seconds"] = {name: run["cpu_seconds"] for name, run in results["runs"].items()}
    results["cpu_seconds"]["total"] = time.process_time() - started_cpu
    results["wall_seconds"] = time.time() - started_wall
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from engine.distill.config import DistillConfig
    from engine.distill.data import load_text_data
    from engine.distill.loop import run_distillation
    from engine.model.loading import load_model
    from engine.paths import data_dir

    started_cpu, started_wall = time.process_time(), time.time()
    teacher = load_model(args.model)
    num_layers = teacher.num_layers
    sets = layer_sets(num_layers)
    runs_root = args.runs_dir or Path(tempfile.mkdtemp(prefix="distill-quality-"))
    if args.keys == "flat":
        hparams: dict[str, Any] = {"keys": "flat", "topk": args.topk, "init": args.init}
        active_width = args.topk  # slots read per token
    else:
        hparams = {"num_subkeys": args.num_subkeys, "topk": args.topk, "heads": args.heads,
                   "query_dim": args.query_dim, "init": args.init}
        active_width = args.heads * args.topk
    control = {"width": active_width, "init": args.control_init}
    common = dict(teacher=args.model, data=[str(Path(args.data).resolve())],
                  local_tokens=args.local_tokens, local_batch_tokens=args.local_batch_tokens,
                  block_size=args.block_size,
                  batch_size=args.batch_size, heldout_fraction=0.1,
                  heldout_blocks=args.heldout_blocks, lr=args.lr, value_lr=args.value_lr,
                  warmup_steps=0, eval_every=10**9, checkpoint_every=10**9, seed=0,
                  threads=args.threads)
    results: dict[str, Any] = {
        "model": args.model, "data": str(args.data), "quick": args.quick, "complete": False,
        "command": "python bench/distill_quality.py " + " ".join(argv or sys.argv[1:]),
        "settings": {**common, "hparams": hparams, "control": control,
                     "steps": args.steps, "local_steps": args.local_steps,
                     "all_steps": args.all_steps, "all_local_steps": args.all_local_steps},
        "runs": {},
    }
    for label in SETS:
        for key in ("ppl_ratio", "gap_closed", "control_ppl_ratio"):
            results[f"{key}_{label}"] = None
    distill_rates = []
    for label in args.sets:
        layers = sets[label]
        spec = ",".join(str(i) for i in layers)
        steps = dict(steps=args.all_steps, local_steps=args.all_local_steps) \
            if label == "all_layers" else dict(steps=args.steps, local_steps=args.local_steps)
        for kind, kind_hparams in (("featural", hparams), ("dense", control)):
            config = DistillConfig(layers=spec, memory=kind, hparams=kind_hparams, **steps,
                                   **common)
            run_dir = runs_root / f"{label}-{kind}"
            print(f"[{time.strftime('%H:%M:%S')}] {label} {kind}: layers {spec}", flush=True)
            report = run_distillation(config, run_dir, teacher=teacher, resume=False)
            if not report:
                print(f"cancelled; the run's checkpoint is in {run_dir}")
                return 130
            rate = distill_rate(run_dir)
            results["runs"][f"{label}_{kind}"] = {
                "layers": layers, "config": config.to_dict(), "run_dir": str(run_dir),
                "distill_tokens_per_s": rate, "student": student_files(run_dir),
                **{k: report[k] for k in ("ppl_teacher", "ppl_student", "ppl_zeroed",
                                          "ppl_ratio", "gap_closed", "kl_per_token",
                                          "top1_agreement", "tokens_seen", "cpu_seconds",
                                          "wall_seconds", "trainable_parameters")},
            }
            print(f"    ppl ratio {report['ppl_ratio']:.4f}, gap closed "
                  f"{report['gap_closed']:.4f}, KL {report['kl_per_token']:.4f}, "
                  f"CPU {report['cpu_seconds']:.0f} s", flush=True)
            results["ppl_teacher"] = report["ppl_teacher"]
            if kind == "featural":
                keep_student_configs(args.out, label, student_files(run_dir))
                results[f"ppl_ratio_{label}"] = report["ppl_ratio"]
                results[f"gap_closed_{label}"] = report["gap_closed"]
                if rate:
                    distill_rates.append(rate)
            else:
                results[f"control_ppl_ratio_{label}"] = report["ppl_ratio"]
            write_results(args.out, results, started_cpu, started_wall)  # partial results
    data = load_text_data(common["data"], teacher.tokenizer, block_size=args.block_size,
                          heldout_fraction=0.1, cache_dir=data_dir() / "cache" / "tokens")
    finetune = finetune_tokens_per_s(teacher.model, data.train, steps=args.finetune_steps,
                                     batch_size=args.batch_size)
    torch.set_grad_enabled(True)
    results["finetune_tokens_per_s"] = finetune
    results["distill_tokens_per_s"] = distill_rates[0] if distill_rates else None
    results["throughput_ratio_vs_finetune"] = (
        distill_rates[0] / finetune if distill_rates and finetune else None)
    results["complete"] = True
    write_results(args.out, results, started_cpu, started_wall)
    print(f"teacher ppl {results['ppl_teacher']:.4f}")
    for label in args.sets:
        print(f"{label:>10}: ppl ratio {results[f'ppl_ratio_{label}']:.4f} "
              f"(control {results[f'control_ppl_ratio_{label}']:.4f}), gap closed "
              f"{results[f'gap_closed_{label}']:.4f}")
    if results["throughput_ratio_vs_finetune"] is not None:
        print(f"throughput vs fine-tuning: {results['throughput_ratio_vs_finetune']:.3f} "
              f"({results['distill_tokens_per_s']:.0f} vs {finetune:.0f} tokens/s)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
