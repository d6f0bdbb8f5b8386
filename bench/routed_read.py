"""One memory layer's read against the dense MLP it replaces, at batch 1 and in prefill.

    .venv/bin/python bench/routed_read.py [--layers 30] [--threads 2] [--rounds 7]

SmolLM2-135M shapes (hidden 576, 1,536 SwiGLU neurons), random weights, ``--layers``
independent copies cycled so that every read comes from memory rather than cache, as in a
30-layer model. Dense = the three projections of a Llama MLP; routed = ``RoutedKeys.read``
at the recommended settings (groups of 64, 8 of 24 read, router rank 64). The two are timed
in alternating rounds in one process and the best round of each is kept; the speed ratio
(dense time / routed time) is printed. Whole-model figures are in ``student_pareto.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_time(functions: dict[str, Callable[[int], object]], layers: int, rounds: int,
              repeats: int) -> dict[str, float]:
    best = {name: float("inf") for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            for layer in range(layers):
                function(layer)
            started = time.perf_counter()
            for _ in range(repeats):
                for layer in range(layers):
                    function(layer)
            best[name] = min(best[name], (time.perf_counter() - started) / repeats / layers)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from engine.model.memory_layers.routed_keys import RoutedKeys

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, neurons, count = 576, 1536, args.layers
    gate = [torch.randn(neurons, hidden) * 0.04 for _ in range(count)]
    up = [torch.randn(neurons, hidden) * 0.04 for _ in range(count)]
    down = [torch.randn(hidden, neurons) * 0.04 for _ in range(count)]
    routed = [RoutedKeys(hidden, neurons, 64, 8, 64, "silu", True) for _ in range(count)]
    values = [torch.nn.Parameter(torch.randn(neurons, hidden) * 0.04) for _ in range(count)]
    bias = torch.zeros(hidden)
    print(f"{count} layers, {args.threads} threads, best of {args.rounds} rounds")
    for tokens, repeats in ((1, 50), (512, 3)):
        x = torch.randn(tokens, hidden)
        with torch.inference_mode():
            best = best_time({
                "dense": lambda i, x=x: F.linear(
                    F.silu(F.linear(x, gate[i])) * F.linear(x, up[i]), down[i]),
                "routed": lambda i, x=x: routed[i].read(x, values[i], bias),
            }, count, args.rounds, repeats)
        print(f"  {tokens:3d} token(s): dense {best['dense'] * 1e6:8.1f} us, routed "
              f"{best['routed'] * 1e6:8.1f} us per layer: routed is "
              f"{best['dense'] / best['routed']:.2f}x the dense speed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
