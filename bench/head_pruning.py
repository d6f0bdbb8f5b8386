"""Head pruning: held-out perplexity as attention heads are removed, by importance or at random,
and after a short heal.

One model (``--model``, the default SmolLM2-135M-Instruct: 30 layers x 9 heads over 3
key/value heads). Head importance is Michel, Levy & Neubig (2019): E|dL/d xi_h| of a mask on
each head's output, on calibration text, normalised per layer, ranked globally. For each
fraction (10% .. 50% of all heads) the least important heads are pruned (their weights
removed; every layer keeps at least one head), and, against that, heads chosen at random
(``--random-seeds`` draws, averaged). The importance-pruned model at each fraction is then
healed: ``--heal-steps`` steps of distillation from the unpruned model (``--heal-train``:
the attention weights by default, the part pruning changed; lr ``--heal-lr``) on the training
part of the text, at the fractions ``--heal-at`` names (20% by default: a heal costs minutes
on a CPU; ``--heal-at all`` heals at every fraction).

Text: ``--data`` (WikiText-2 validation by default) split by tokens: the first part trains
the heal and calibrates importance, the last ``--heldout-blocks`` blocks are held out and
only ever evaluated.

    python bench/head_pruning.py                 # default model (about 15 minutes, 2 cores)
    python bench/head_pruning.py --quick         # tiny-llama, smoke test (seconds)

Writes bench/results/head_pruning.json: top level ppl_rise_20pct_importance,
ppl_rise_20pct_random, ppl_rise_20pct_healed (relative rises, 0.1 = +10%) beside the curves.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "head_pruning.json"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a UTF-8 text file")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--heldout-blocks", type=int, default=32)
    parser.add_argument("--calibration-blocks", type=int, default=32)
    parser.add_argument("--heal-steps", type=int, default=80)
    parser.add_argument("--heal-train", default="attention",
                        choices=("all", "attention", "all-but-embeddings"))
    parser.add_argument("--heal-at", default="0.2", help="fractions to heal at, or 'all'")
    parser.add_argument("--heal-lr", type=float, default=5e-4)
    parser.add_argument("--heal-batch", type=int, default=4)
    parser.add_argument("--random-seeds", type=int, default=2)
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    parser.add_argument("--quick", action="store_true", help="tiny-llama, few steps: a smoke "
                        "test of the benchmark itself")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.block_size, args.heldout_blocks = "tiny-llama", 32, 4
        args.calibration_blocks, args.heal_steps, args.random_seeds = 4, 4, 1
    return args


def token_blocks(tokenizer: Any, path: str, block_size: int) -> Any:
    from engine.distill.heal import heal_blocks

    return heal_blocks(tokenizer, [path], block_size)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from engine.distill.heal import HealConfig, heal, held_out_perplexity
    from engine.model.architecture.counts import parameter_counts
    from engine.model.architecture.heads import prune_heads
    from engine.model.architecture.importance import (
        choose_heads,
        head_importance,
        random_head_order,
    )
    from engine.model.loading import load_model

    args = parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    loaded = load_model(args.model)
    model = loaded.model
    blocks = token_blocks(loaded.tokenizer, args.data, args.block_size)
    if len(blocks) < args.heldout_blocks + args.calibration_blocks + 1:
        raise SystemExit(f"{args.data} is too short for {args.heldout_blocks} held-out and "
                         f"{args.calibration_blocks} calibration blocks")
    heldout = blocks[-args.heldout_blocks:]
    train = blocks[: -args.heldout_blocks]
    calibration = train[: args.calibration_blocks]
    fractions = [float(f) for f in args.fractions.split(",")]

    base_ppl = held_out_perplexity(model, heldout)
    base_params = parameter_counts(model).total
    importance = head_importance(model, calibration)
    ranked = importance.ranked()
    total_heads = len(ranked)
    print(f"{args.model}: {total_heads} heads, {base_params:,} parameters, held-out "
          f"perplexity {base_ppl:.3f} on {heldout.numel()} tokens", flush=True)

    def rise(ppl: float) -> float:
        return ppl / base_ppl - 1.0

    curve: list[dict[str, Any]] = []
    heal_at = fractions if args.heal_at == "all" else [float(f) for f in args.heal_at.split(",")]
    heal_config = HealConfig(steps=args.heal_steps, lr=args.heal_lr, train=args.heal_train,
                             batch_size=args.heal_batch, block_size=args.block_size,
                             warmup=min(10, args.heal_steps // 5))
    for fraction in fractions:
        chosen = choose_heads(ranked, fraction)
        pruned = prune_heads(model, chosen)
        ppl_importance = held_out_perplexity(pruned, heldout)
        random_ppls = []
        for seed in range(args.random_seeds):
            order = [(layer, head, 0.0) for layer, head in random_head_order(model, seed)]
            random_ppls.append(held_out_perplexity(
                prune_heads(model, choose_heads(order, fraction)), heldout))
        row = {
            "fraction": fraction, "heads_pruned": sum(len(v) for v in chosen.values()),
            "parameters": parameter_counts(pruned).total,
            "ppl_importance": ppl_importance, "ppl_random": statistics.mean(random_ppls),
            "ppl_random_each": random_ppls, "rise_importance": rise(ppl_importance),
            "rise_random": rise(statistics.mean(random_ppls)),
            "random_over_importance": statistics.mean(random_ppls) / ppl_importance,
            "ppl_healed": None, "rise_healed": None, "heal_seconds": None,
        }
        curve.append(row)
        print(f"  {fraction:>4.0%} pruned ({row['heads_pruned']} heads): importance "
              f"{ppl_importance:8.3f} ({row['rise_importance']:+.1%})  random "
              f"{row['ppl_random']:8.3f} ({row['rise_random']:+.1%}, "
              f"{row['random_over_importance']:.2f}x)", flush=True)
        if any(abs(fraction - f) < 1e-9 for f in heal_at):
            healed = copy.deepcopy(pruned)
            report = heal(healed, model, train, heal_config)
            row["ppl_healed"] = held_out_perplexity(healed, heldout)
            row["rise_healed"] = rise(row["ppl_healed"])
            row["heal_seconds"] = report.seconds
            print(f"        healed ({args.heal_steps} steps, {args.heal_train}): "
                  f"{row['ppl_healed']:8.3f} ({row['rise_healed']:+.1%}, "
                  f"{report.seconds:.0f} s)", flush=True)
            del healed
        del pruned

    at_20 = next((row for row in curve if abs(row["fraction"] - 0.2) < 1e-9), None)
    result: dict[str, Any] = {
        "model": args.model, "data": str(args.data), "heads": total_heads,
        "parameters": base_params, "ppl_base": base_ppl,
        "heldout_tokens": int(heldout.numel()), "calibration_tokens": int(calibration.numel()),
        "heal": {"steps": args.heal_steps, "lr": args.heal_lr, "batch": args.heal_batch,
                 "block_size": args.block_size, "train": args.heal_train,
                 "at": heal_at,
                 "train_tokens": int(train.numel())},
        "random_seeds": args.random_seeds,
        "ppl_rise_20pct_importance": at_20["rise_importance"] if at_20 else None,
        "ppl_rise_20pct_random": at_20["rise_random"] if at_20 else None,
        "ppl_rise_20pct_healed": at_20["rise_healed"] if at_20 else None,
        "importance_ahead_everywhere": all(r["ppl_importance"] < r["ppl_random"]
                                           for r in curve),
        "curve": curve, "seconds": time.perf_counter() - started, "quick": args.quick,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
