"""Which routed recipe can the quick start afford? Read shares and training stages, side by
side, on the quick start's own data-free corpus and held-out text.

Every variant distils the same layer ("middle") of the same teacher on the same corpus: the
teacher samples it once, with the quick start's settings (``QUICK_START_OPTIONS``: 16
training and 8 held-out blocks of 128 tokens), into the data directory's corpus cache, and
every variant after the first reuses it. Variants differ only in the share of groups each
token reads and in the training after the closed-form start:

- ``closed form``: the k-means slots and ridge router as built (one step at lr 1e-12, so
  nothing moves);
- ``router+local+e2e``: the quick start's earlier recipe, 40 router steps, 120 layer-local
  steps on 2,048 captured tokens, 20 end-to-end steps at lr 3e-4;
- ``quick start``: the current one, 20 gentle end-to-end steps at lr 5e-5.

Prints one row per variant (perplexity ratio on the held-out blocks, KL, top-1 agreement,
wall seconds) and writes ``bench/results/quick_start_recipes.json`` (``--out`` elsewhere;
``--quick`` on tiny-llama writes to a temp file unless ``--out`` is given).

    .venv/bin/python bench/quick_start_recipes.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "quick_start_recipes.json"
SHARES = {"8/24": 8 / 24, "16/24": 16 / 24, "20/24": 20 / 24, "24/24": 1.0}
STILL = dict(steps=1, lr=1e-12, value_lr=1e-12)
EARLIER = dict(router_steps=40, local_steps=120, local_tokens=2048, local_batch_tokens=512,
               steps=20, lr=3e-4, value_lr=3e-4)


def variants(quick_lr: float, quick_steps: int) -> list[tuple[str, str, dict[str, Any]]]:
    current = dict(steps=quick_steps, lr=quick_lr, value_lr=quick_lr)
    rows = []
    for share in ("8/24", "16/24", "20/24"):
        rows.append((share, "closed form", STILL))
        rows.append((share, "router+local+e2e", EARLIER))
    rows.append(("20/24", "quick start", current))
    rows.append(("24/24", "closed form", STILL))  # the MLP exactly: the control
    return rows


def run_variant(teacher: Any, model: str, share: float, training: dict[str, Any],
                run_dir: Path, group_size: int | None) -> dict[str, Any]:
    from engine.distill.config import DistillConfig
    from engine.distill.loop import run_distillation
    from engine.services.jobs import QUICK_START_OPTIONS

    options: dict[str, Any] = dict(QUICK_START_OPTIONS)
    hparams = {**options.pop("hparams"), "read_share": share}
    if group_size:
        hparams["group_size"] = group_size
    options.update(training)
    steps, lr = options.pop("steps"), options.pop("lr")
    config = DistillConfig(teacher=model, layers="middle", memory="featural", hparams=hparams,
                           steps=steps, lr=lr, eval_every=1000, checkpoint_every=1000,
                           **options)
    started = time.perf_counter()
    report = run_distillation(config, run_dir, teacher=teacher, resume=False)
    return {"wall_s": round(time.perf_counter() - started, 1),
            **{key: report.get(key) for key in ("ppl_teacher", "ppl_student", "ppl_ratio",
                                                "gap_closed", "kl_per_token",
                                                "top1_agreement", "heldout_tokens")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--quick", action="store_true", help="tiny-llama: checks, not figures")
    parser.add_argument("--seed", type=int, default=0,
                        help="another seed samples another corpus and held-out text")
    parser.add_argument("--read", action="append", default=[], choices=sorted(SHARES),
                        help="only these read shares (repeatable; default all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from engine.model.loading import load_model
    from engine.services.jobs import QUICK_START_LR, QUICK_START_STEPS

    model = "tiny-llama" if args.quick else args.model
    out_path = args.out or (Path(tempfile.mkdtemp()) / "quick_start_recipes.json"
                            if args.quick else RESULTS)
    from mindset.commands.progress import progress

    teacher = load_model(model)
    rows = []
    chosen = [(index, variant) for index, variant in
              enumerate(variants(QUICK_START_LR, QUICK_START_STEPS))
              if not args.read or variant[0] in args.read]
    bar = progress(len(chosen), "recipes", "variant")  # on a terminal only
    with tempfile.TemporaryDirectory(prefix="mindset-recipes-") as scratch:
        for index, (share, training, settings) in chosen:
            result = run_variant(teacher, model, SHARES[share], {**settings, "seed": args.seed},
                                 Path(scratch) / f"run{index}", 8 if args.quick else None)
            rows.append({"read": share, "training": training, **result})
            bar.write(f"{share:>6} {training:<18} ratio {result['ppl_ratio']:.4f}  "
                      f"KL {result['kl_per_token']:.4f}  top-1 "
                      f"{result['top1_agreement']:.3f}  {result['wall_s']:.0f} s")
            bar.update()
    bar.close()
    result_doc = {"model": model, "layer": "middle", "seed": args.seed,
                  "quick_start_lr": QUICK_START_LR,
                  "quick_start_steps": QUICK_START_STEPS, "rows": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result_doc, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
