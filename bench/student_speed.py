"""Forward speed and peak memory of featural students next to their teacher, in one run.

Students with 1, 3 and all layers' MLPs replaced (featural product-key memories) are timed
against the teacher on the same 512-token windows, interleaved round by round so that load on
the machine hits every model alike; each model's best round counts. Peak memory is the peak
resident memory of a fresh process that loads only that model (teacher spec or saved student
directory) and runs the same forward.

This is not the recommended student: the product-key memory timed here (``FAST_FEATURAL``)
was never distilled close to the teacher, so its speed says nothing about a faithful
student. ``bench/student_pareto.py`` measures speed, memory and quality on the same
recommended (routed) student.

    python bench/student_speed.py                 # default model (SmolLM2-135M), full run
    python bench/student_speed.py --quick         # fewer windows and rounds
    python bench/student_speed.py --model tiny-llama --output /tmp/speed.json --quick

Writes bench/results/student_speed.json (top level: speed_ratio_1_layer, speed_ratio_3_layers,
speed_ratio_all_layers, peak_mem_ratio_all_layers; each student / teacher) and prints ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "student_speed.json"
# Engineered for speed and size on CPU: 2 heads of 32-dim queries over 96^2 = 9,216 slots,
# top-16 (50 candidate pairs after pruning), 224-dim values, SiLU gate: about 2.36M parameters
# per layer against the SwiGLU MLP's 2.65M, and far fewer multiply-adds per token.
FAST_FEATURAL: dict[str, Any] = dict(
    keys="product", heads=2, query_dim=32, num_subkeys=96, topk=16, value_dim=224, gate=True
)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    On Linux ``ru_maxrss`` survives fork + exec (a child started by a big parent reports the
    parent's peak), so the per-address-space high-water mark ``VmHWM`` is read instead.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def windows_of(vocab: int, count: int, window: int, seed: int = 0) -> Any:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, 1, window), generator=generator)


def forward_all(model: Any, windows: Any) -> float:
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for ids in windows:
            model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def layer_sets(num_layers: int) -> dict[str, list[int]]:
    middle = num_layers // 2
    three = sorted({num_layers // 4, middle, (3 * num_layers) // 4})
    if len(three) < 3:
        three = list(range(min(3, num_layers)))
    return {"1_layer": [middle], "3_layers": three, "all_layers": list(range(num_layers))}


def measure_peak(spec: str, window: int, vocab: int) -> float:
    """Peak RSS (MiB) of a fresh process that loads ``spec`` and runs one forward window."""
    code = (
        "import sys, json, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from engine.model.loading import load_model\n"
        "from bench.student_speed import peak_rss_mb, windows_of, forward_all\n"
        f"loaded = load_model({spec!r})\n"
        f"forward_all(loaded.model, windows_of({vocab}, 1, {window}))\n"
        "print(json.dumps(peak_rss_mb()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory child for {spec} failed:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from engine.model.loading import load_model
    from engine.model.student import save_student
    from engine.model.surgery import convert

    if args.threads:
        torch.set_num_threads(args.threads)
    hparams = dict(FAST_FEATURAL, **json.loads(args.hparams)) if args.hparams else FAST_FEATURAL
    teacher = load_model(args.model)
    num_layers = teacher.num_layers
    vocab = int(teacher.model.config.vocab_size)
    windows = windows_of(vocab, args.windows, args.window)
    sets = layer_sets(num_layers)
    models: dict[str, Any] = {"teacher": teacher.model}
    for name, layers in sets.items():
        # Speed does not depend on the initialisation; "random" skips k-means on 30 layers.
        models[name] = convert(teacher, layers, "featural", init="random", **hparams)

    best = {name: float("inf") for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            best[name] = min(best[name], forward_all(model, windows))
    tokens = args.windows * args.window
    tok_s = {name: tokens / seconds for name, seconds in best.items()}

    with tempfile.TemporaryDirectory() as scratch:
        student_dir = Path(scratch) / "all_layers"
        save_student(models["all_layers"], student_dir, teacher.tokenizer)
        del models
        teacher_peak = measure_peak(args.model, args.window, vocab)
        student_peak = measure_peak(str(student_dir), args.window, vocab)

    result: dict[str, Any] = {
        "speed_ratio_1_layer": tok_s["1_layer"] / tok_s["teacher"],
        "speed_ratio_3_layers": tok_s["3_layers"] / tok_s["teacher"],
        "speed_ratio_all_layers": tok_s["all_layers"] / tok_s["teacher"],
        "peak_mem_ratio_all_layers": student_peak / teacher_peak,
        "tokens_per_s": tok_s,
        "peak_rss_mb": {"teacher": teacher_peak, "all_layers": student_peak},
        "layers": sets,
        "model": args.model,
        "kind": "featural",
        "hparams": hparams,
        "window": args.window,
        "windows": args.windows,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="teacher spec (default: default)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--quick", action="store_true", help="2 windows, 2 rounds")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=None, help="windows per round (8)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (5)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--hparams", default="",
                        help="JSON object overriding the featural hyper-parameters")
    args = parser.parse_args(argv)
    args.windows = args.windows or (2 if args.quick else 8)
    args.rounds = args.rounds or (2 if args.quick else 5)
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tok_s = result["tokens_per_s"]
    print(f"teacher {args.model}: {tok_s['teacher']:.0f} tokens/s "
          f"(window {args.window}, best of {args.rounds} rounds of {args.windows} windows)")
    for name in ("1_layer", "3_layers", "all_layers"):
        print(f"student {name:>10}: {tok_s[name]:.0f} tokens/s, "
              f"speed ratio {result['speed_ratio_' + name]:.2f}x")
    peaks = result["peak_rss_mb"]
    print(f"peak memory: teacher {peaks['teacher']:.0f} MiB, all-layer student "
          f"{peaks['all_layers']:.0f} MiB, ratio {result['peak_mem_ratio_all_layers']:.2f}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
