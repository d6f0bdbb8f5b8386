"""Robust-text noise: does distilling on noised text make a student better on noised text?

Two students of one teacher (``--model``, the default SmolLM2-135M-Instruct), distilled the
same way: featural memory with flat keys reading the top ``--topk`` of the MLP's neurons in
layers ``--layers`` (an approximate memory, so distillation has something to fix), ``--steps``
end-to-end steps on the first 90% of ``--data``. The second student's training text is noised
with ``--augment`` (its own held-out split stays clean). Both are then scored on the last 10%
of ``--data``, which neither saw: as it is, and as a noised copy made with the same spec and
another seed (``mindset augment`` shows what that noise looks like). The teacher is scored on
both too.

    python bench/augment_robustness.py           # default model (about 15 minutes, 2 cores)
    python bench/augment_robustness.py --quick   # tiny-llama, smoke test

Writes bench/results/augment_robustness.json: top level ppl_clean_plain,
ppl_clean_augmented, ppl_noisy_plain, ppl_noisy_augmented (and the teacher's), with ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "augment_robustness.json"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"
DEFAULT_AUGMENT = "typo=0.03,homoglyph=0.01,word-swap=0.05,whitespace=0.02,run=0.02"
EVAL_SEED = 7919  # the held-out copy's noise: not the training noise's seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--layers", default="9,15,21")
    parser.add_argument("--topk", type=int, default=128)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--augment", default=DEFAULT_AUGMENT)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.layers, args.topk, args.steps = "tiny-llama", "1,2", 16, 3
        args.block_size, args.eval_tokens, args.window = 32, 2048, 64
    return args


def distill(args: argparse.Namespace, train_file: Path, run_dir: Path, augment: str) -> Any:
    from engine.distill.config import DistillConfig
    from engine.distill.loop import run_distillation

    config = DistillConfig(
        teacher=args.model, layers=args.layers, memory="featural",
        hparams={"keys": "flat", "topk": args.topk}, data=[str(train_file)],
        steps=args.steps, block_size=args.block_size, batch_size=args.batch_size,
        eval_every=args.steps, checkpoint_every=args.steps, seed=0, augment=augment)
    report = run_distillation(config, run_dir, resume=False)
    if not report:
        raise SystemExit(f"the distillation in {run_dir} was cancelled")
    return report


def score(spec: str, clean: str, noisy: str, args: argparse.Namespace) -> tuple[float, float]:
    from engine.evaluation import perplexity
    from engine.model.loading import load_model

    loaded = load_model(spec)
    return tuple(perplexity(loaded.model, loaded.tokenizer, text, tokens=args.eval_tokens,
                            window=args.window).ppl for text in (clean, noisy))  # type: ignore


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from engine.distill.augment import Augmenter
    from engine.textdata import read_text_file

    args = parse_args(argv)
    started = time.perf_counter()
    text = read_text_file(args.data)
    cut = int(len(text) * 0.9)
    cut = text.rfind("\n", 0, cut) + 1 or cut  # at a line break
    train_text, heldout = text[:cut], text[cut:]
    noisy = Augmenter(args.augment, seed=EVAL_SEED).augment(heldout, key="heldout")
    with tempfile.TemporaryDirectory(prefix="augment-") as root:
        runs = Path(root)
        train_file = runs / "train.txt"
        train_file.write_text(train_text, encoding="utf-8")
        figures: dict[str, tuple[float, float]] = {}
        figures["teacher"] = score(args.model, heldout, noisy, args)
        print(f"teacher: clean {figures['teacher'][0]:.3f}, noisy {figures['teacher'][1]:.3f}",
              flush=True)
        for name, augment in (("plain", ""), ("augmented", args.augment)):
            distill(args, train_file, runs / name, augment)
            figures[name] = score(str(runs / name / "student"), heldout, noisy, args)
            print(f"{name}: clean {figures[name][0]:.3f}, noisy {figures[name][1]:.3f}",
                  flush=True)
    result: dict[str, Any] = {
        "model": args.model, "layers": args.layers, "topk": args.topk, "steps": args.steps,
        "augment": args.augment, "eval_seed": EVAL_SEED, "data": args.data,
        "eval_tokens": args.eval_tokens, "window": args.window,
        "ppl_clean_plain": figures["plain"][0], "ppl_clean_augmented": figures["augmented"][0],
        "ppl_noisy_plain": figures["plain"][1], "ppl_noisy_augmented": figures["augmented"][1],
        "ppl_clean_teacher": figures["teacher"][0], "ppl_noisy_teacher": figures["teacher"][1],
        "noisy_augmented_over_plain": figures["augmented"][1] / figures["plain"][1],
        "clean_augmented_over_plain": figures["augmented"][0] / figures["plain"][0],
        "seconds": time.perf_counter() - started, "quick": args.quick,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"noisy: augmented/plain {result['noisy_augmented_over_plain']:.3f}; clean: "
          f"augmented/plain {result['clean_augmented_over_plain']:.3f}; wrote {output}")
    return result


if __name__ == "__main__":
    main()
