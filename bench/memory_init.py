"""Which initialisation starts a memory layer closest to the MLP it replaces?

For one layer of a teacher, build memory layers with each initialisation and measure the
layer-local output-matching error right after init (no training): the fraction of the MLP
output's variance left unexplained on held-out tokens, with the teacher's own MLP inputs
(teacher-forced). 0 is a perfect copy, 1 is as good as predicting the mean output.

    python bench/memory_init.py --model default --layer 15 --data ../shared/data/wikitext2-valid.txt
    python bench/memory_init.py --model tiny-llama --layer 1

Writes bench/results/memory_init.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.student_speed import FAST_FEATURAL  # noqa: E402

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "memory_init.json"


def token_windows(tokenizer: Any, data: Path | None, vocab: int, tokens: int,
                  window: int) -> Any:
    import torch

    if data is not None and data.is_file():
        text = data.read_text(encoding="utf-8")
        ids = tokenizer(text[: tokens * 12], add_special_tokens=False)["input_ids"][:tokens]
        ids_t = torch.tensor(ids, dtype=torch.long)
    else:
        ids_t = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0))
    usable = (len(ids_t) // window) * window
    return ids_t[:usable].view(-1, window)


def candidates(neurons: int) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(label, kind, init, hparams)."""
    quarter = max(1, neurons // 4)
    rows: list[tuple[str, str, str, dict[str, Any]]] = []
    for init in ("random", "mlp", "data"):
        rows.append((f"featural product (bench config), init={init}", "featural", init,
                     dict(FAST_FEATURAL)))
    rows.append(("featural product 4 heads x 128^2, top-16, init=data", "featural", "data",
                 dict(keys="product", heads=4, query_dim=64, num_subkeys=128, topk=16)))
    rows.append((f"featural flat, top-{quarter} of {neurons} neurons (oracle reference)",
                 "featural", "mlp", dict(keys="flat", topk=quarter)))
    for init in ("random", "mlp", "data"):
        rows.append((f"associative original form (attention only) 4 heads, init={init}",
                     "associative", init, dict(base="none", heads=4, key_dim=32, value_dim=64,
                                               topk=16, capacity=65536)))
    rows.append(("associative original form 4 heads x 64-dim keys, top-64, init=data",
                 "associative", "data",
                 dict(base="none", heads=4, key_dim=64, value_dim=144, topk=64,
                      capacity=65536)))
    rows.append(("associative recipe: teacher entries + read entries (the default)",
                 "associative", "mlp", {}))
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    from engine.model.anatomy import mlp_io, mlp_size
    from engine.model.loading import load_model
    from engine.model.memory_layers.init_featural import unexplained_variance
    from engine.model.surgery import convert, memory_layers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" /
                        "wikitext2-valid.txt")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--heldout-tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    teacher = load_model(args.model)
    window = min(args.window, args.calibration_tokens, args.heldout_tokens)
    vocab = int(teacher.model.config.vocab_size)
    ids = token_windows(teacher.tokenizer, args.data, vocab,
                        args.calibration_tokens + args.heldout_tokens, window)
    split = args.calibration_tokens // window
    calibration, heldout = ids[:split], ids[split:]
    x, y = mlp_io(teacher.model, heldout, [args.layer])[args.layer]
    neurons = mlp_size(teacher.model)

    results = []
    for label, kind, init, hparams in candidates(neurons):
        start = time.perf_counter()
        student = convert(teacher, [args.layer], kind, init=init, calibration=calibration,
                          **hparams)
        seconds = time.perf_counter() - start
        memory = memory_layers(student)[args.layer]
        memory.eval()
        with torch.inference_mode():
            error = unexplained_variance(memory(x), y)
        results.append({"label": label, "kind": kind, "init": init, "hparams": hparams,
                        "unexplained_variance": error, "init_seconds": seconds})
        print(f"{error:10.4f}  {label}  ({seconds:.1f} s)", flush=True)
        del student
    report = {
        "model": args.model, "layer": args.layer,
        "data": str(args.data) if args.data.is_file() else "random tokens",
        "calibration_tokens": int(calibration.numel()), "heldout_tokens": int(heldout.numel()),
        "metric": "unexplained variance of the MLP output on held-out tokens (0 = exact)",
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
