"""``mindset eval``: perplexity, speed and peak memory of a model on a text file."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from mindset.commands.common import finite_float, positive_int
from mindset.commands.progress import progress


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "eval",
        help="perplexity, tokens/s and peak memory of a model on a text file",
        description="Perplexity over non-overlapping windows of W tokens of the first N tokens.",
    )
    parser.add_argument("--model", required=True,
                        help="default, tiny-gpt2, tiny-llama, or a model/student directory")
    parser.add_argument("--data", required=True, help="a UTF-8 text file")
    parser.add_argument("--tokens", type=positive_int, default=None,
                        help="evaluate the first N tokens (default: all)")
    parser.add_argument("--window", type=positive_int, default=512,
                        help="window length in tokens (default 512)")
    parser.add_argument("--learn", action="store_true",
                        help="reading mode: the student's associative memory reads each "
                        "window after scoring it (entries are not saved; use `mindset memory "
                        "read` to keep them)")
    parser.add_argument("--affect", type=affect_pair, default=None, metavar="A,V",
                        help="a constant arousal,valence (each -1..1) for every token, for a "
                        "model with an affect label channel")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def affect_pair(text: str) -> tuple[float, float]:
    """``A,V``: arousal and valence, each from -1 to 1."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not A,V (arousal,valence)")
    arousal, valence = (finite_float(part.strip()) for part in parts)
    if not (-1 <= arousal <= 1 and -1 <= valence <= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: arousal and valence must be from -1 to 1")
    return arousal, valence


def run(args: argparse.Namespace) -> int:
    from engine.evaluation import perplexity, validate_window
    from engine.model.loading import load_model
    from engine.model.model_files import check_model_spec
    from engine.process_memory import PeakMemory
    from engine.textdata import read_text_file

    validate_window(args.tokens, args.window, None)
    check_model_spec(args.model)  # from the files alone, before reading a large text
    if args.affect is not None:
        check_affect_channel(args.model)
    text = read_text_file(args.data)
    with PeakMemory() as memory:  # over the loading and the evaluation
        loaded = load_model(args.model)
        bar = progress(0, "eval", "tok", json_output=args.json)

        def advance(tokens: int, total: int) -> None:
            if bar.total != total:  # known once the text is tokenised
                bar.total = total
            bar.update(tokens)

        try:
            result = perplexity(loaded.model, loaded.tokenizer, text, tokens=args.tokens,
                                window=args.window, learn=args.learn, on_window=advance,
                                affect=args.affect)
        finally:
            bar.close()
    result = dataclasses.replace(result, peak_rss_mb=memory.peak_rss_mb,
                                 peak_anon_mb=memory.peak_anon_mb)
    if args.json:
        print(json.dumps({"model": args.model, **result.as_dict()}))
    else:
        print(
            f"{args.model}: perplexity {result.ppl:.4f} over {result.tokens} tokens "
            f"({result.windows} windows of {result.window}), {result.tok_per_s:.0f} tokens/s, "
            f"{memory.summary()}"
        )
        if result.entries_added is not None:
            print(f"reading mode: {result.entries_added} entries added "
                  f"({result.learn_seconds or 0:.1f} s of the run; not saved)")
    return 0


def check_affect_channel(spec: str) -> None:
    """``--affect`` needs an affect channel: known from the config, before loading."""
    from engine.errors import InputError
    from engine.model.architecture.record import record_of_config
    from engine.model.loading import model_config

    record = record_of_config(model_config(spec)) or {}
    if "affect" not in (record.get("channels") or []):
        raise InputError(f"{spec} has no affect channel; --affect needs a model with one "
                         "(add it with engine.model.label_channels.add_channels)")
