"""``mindset model``: inspect a model's parts, and change its shape.

Every changing action reads SPEC, writes the result to ``--out DIR`` (SPEC is never
modified), and prints what changed and the parameter counts before and after. The result
loads like any model: ``mindset eval --model DIR``, ``mindset serve --model DIR``, or as a
teacher in ``mindset distill``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mindset.commands.common import finite_float, non_negative_int, positive_float, positive_int

CALIBRATION_ROWS, CALIBRATION_BLOCK = 8, 128


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "model", help="inspect a model, or change its shape: gates, heads, MLPs, layers, "
        "feedback, healing",
        description="Architecture surgery. Each action writes a new model to --out and leaves "
        "SPEC untouched.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str, *, changes: bool = True) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("spec", metavar="SPEC",
                         help="default, tiny-gpt2, tiny-llama, or a model/student directory")
        if changes:
            sub.add_argument("--out", required=True, metavar="DIR",
                             help="where to write the new model (a new or empty directory)")
        sub.add_argument("--calibration", metavar="FILE", default=None,
                         help="a UTF-8 text to measure importance and usage on (default: "
                         "text sampled from the model itself)")
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        sub.set_defaults(handler=run)
        return sub

    action("inspect", "parameter counts per part, head importance and gates, MLP and memory "
           "usage", changes=False)
    gates = action("add-gates", "a learned gate per head (function unchanged)")
    gates.add_argument("--layers", default="all", help="layer spec (default all)")
    gates.add_argument("--init", type=finite_float, default=0.0,
                       help="starting contribution; the gate is sigmoid of it (default 0)")
    grow = action("grow-heads", "add heads to a layer (function unchanged)")
    grow.add_argument("--layer", type=non_negative_int, required=True)
    grow.add_argument("--count", type=positive_int, required=True)
    grow.add_argument("--new-kv", action="store_true",
                      help="grouped-query models: add whole groups with their own key/value "
                      "heads")
    prune = action("prune-heads", "remove heads: named ones, or a fraction by importance")
    prune.add_argument("--heads", default=None, help="layer:head pairs, e.g. 3:0,3:5,7:2")
    prune.add_argument("--fraction", type=finite_float, default=None,
                       help="share of all heads to remove, least important first")
    prune.add_argument("--by", choices=("importance", "random", "gates"), default="importance")
    prune.add_argument("--seed", type=non_negative_int, default=0)
    resize = action("resize", "grow or prune a layer's MLP, or resize its memory layer")
    resize.add_argument("--layer", type=non_negative_int, required=True)
    resize.add_argument("--mlp", type=positive_int, default=None, help="new MLP width")
    resize.add_argument("--memory", type=positive_int, default=None,
                        help="new memory size in slots (students)")
    drop = action("drop-layer", "remove a decoder layer")
    drop.add_argument("--layer", type=non_negative_int, required=True)
    add = action("add-layer", "insert an identity-initialised decoder layer")
    add.add_argument("--position", type=non_negative_int, required=True,
                     help="index the new layer takes (0 = first, the layer count = last)")
    feedback = action("add-feedback", "layerwise feedback: layer i+1's output at step t-1 "
                      "joins layer i's input at step t")
    feedback.add_argument("--rank", type=positive_int, default=32)
    feedback.add_argument("--layers", default="all")
    heal = action("heal", "a short distillation from the original model into the changed one")
    heal.add_argument("--teacher", required=True, help="the unchanged model (spec or dir)")
    heal.add_argument("--data", required=True, action="append",
                      help="UTF-8 training text (repeatable)")
    heal.add_argument("--steps", type=positive_int, default=100)
    heal.add_argument("--lr", type=positive_float, default=None,
                      help="learning rate (default: the heal default, above distillation's)")
    heal.add_argument("--train", default="all",
                      choices=("all", "attention", "gates", "feedback", "all-but-embeddings"))
    heal.add_argument("--gate-sparsity", type=finite_float, default=0.0,
                      help="penalty weight on the mean gate value (pushes gates to close)")
    heal.add_argument("--block-size", type=positive_int, default=128)
    heal.add_argument("--batch-size", type=positive_int, default=4)


def calibration_ids(loaded: Any, path: str | None) -> tuple[Any, str]:
    """Calibration token ids [rows, tokens] from a file, or sampled from the model."""
    import torch

    if path is None:
        from engine.distill.data import sample_corpus

        ids = sample_corpus(loaded.model, loaded.tokenizer, blocks=CALIBRATION_ROWS,
                            block_size=CALIBRATION_BLOCK, seed=0)
        return ids, f"{ids.numel()} tokens sampled from the model"
    from engine.errors import InputError
    from engine.textdata import read_text_file

    tokens = loaded.tokenizer(read_text_file(path))["input_ids"]
    block = min(CALIBRATION_BLOCK, len(tokens))
    if block < 8:
        raise InputError(f"{path} holds only {len(tokens)} tokens; give a longer text")
    rows = min(CALIBRATION_ROWS * 4, len(tokens) // block)
    ids = torch.tensor(tokens[: rows * block], dtype=torch.long).view(rows, block)
    return ids, f"{ids.numel()} tokens of {path}"


def run(args: argparse.Namespace) -> int:
    from engine.model.loading import load_model
    from engine.model.model_files import check_model_spec

    check_model_spec(args.spec, "SPEC")
    if args.action == "heal":
        check_model_spec(args.teacher, "--teacher")
    loaded = load_model(args.spec)
    if args.action == "inspect":
        return inspect(loaded, args)
    if args.action == "heal":
        return heal(loaded, args)
    from engine.model.architecture.operations import run_operation
    from engine.model.shaped_files import check_target

    out = _out_path(args.out)
    check_target(out)
    params = {key: value for key, value in vars(args).items()
              if key not in {"spec", "out", "calibration", "json", "action", "handler"}}
    needs = (args.action == "prune-heads" and args.heads is None and args.by == "importance") \
        or args.action == "resize"
    ids, source = calibration_ids(loaded, args.calibration) if needs else (None, "")
    outcome = run_operation(loaded.model, args.action, params, calibration_ids=ids)
    return _save(outcome.model, loaded.tokenizer, out, outcome.lines(), source, args,
                 {"changes": outcome.changes, "before": outcome.before.as_dict(),
                  "after": outcome.after.as_dict()})


def _out_path(text: str) -> Any:
    from pathlib import Path

    from engine.errors import InputError

    if not text.strip():
        raise InputError("--out is empty; give a directory for the new model")
    return Path(text).expanduser()


def _save(model: Any, tokenizer: Any, out: Any, lines: list[str], source: str,
          args: argparse.Namespace, payload: dict[str, Any]) -> int:
    from engine.model.shaped_files import save_model

    saved = save_model(model, out, tokenizer)
    if args.json:
        print(json.dumps({"action": args.action, "out": str(saved), **payload,
                          "calibration": source or None}))
        return 0
    if source:
        print(f"calibration: {source}")
    for line in lines:
        print(line)
    print(f"saved to {saved}")
    return 0


def inspect(loaded: Any, args: argparse.Namespace) -> int:
    from engine.model.architecture.counts import parameter_counts
    from engine.model.architecture.importance import head_importance, memory_usage, mlp_usage
    from engine.model.architecture.summary import count_lines, layer_table, usage_lines

    counts = parameter_counts(loaded.model)
    ids, source = calibration_ids(loaded, args.calibration)
    importance = head_importance(loaded.model, ids)
    neurons, slots = usage(loaded.model, ids, mlp_usage, memory_usage)
    if args.json:
        print(json.dumps({"spec": args.spec, "counts": counts.as_dict(),
                          "layers": layer_table(loaded.model, importance),
                          "mlp_usage": {k: v.as_dict() for k, v in neurons.items()},
                          "memory_usage": {k: v.as_dict() for k, v in slots.items()},
                          "calibration": source}))
        return 0
    print(f"{args.spec}: {counts.total:,} parameters")
    for line in count_lines(counts):
        print(f"  {line}")
    print(f"calibration: {source}")
    for line in usage_lines(loaded.model, importance, neurons, slots):
        print(line)
    return 0


def usage(model: Any, ids: Any, mlp_usage: Any, memory_usage: Any) -> tuple[Any, Any]:
    """MLP neuron usage (layers with a dense MLP) and memory slot usage (memory layers)."""
    from engine.model.anatomy import decoder_layers, mlp_of
    from engine.model.architecture.record import is_dense_mlp
    from engine.model.surgery import memory_layers

    dense = any(is_dense_mlp(mlp_of(model, i)) for i in range(len(decoder_layers(model))))
    return (mlp_usage(model, ids) if dense else {},
            memory_usage(model, ids) if memory_layers(model) else {})


def heal(loaded: Any, args: argparse.Namespace) -> int:
    import copy

    from engine.distill.heal import HealConfig, heal_blocks, held_out_perplexity
    from engine.distill.heal import heal as run_heal
    from engine.model.architecture.counts import format_counts, parameter_counts
    from engine.model.loading import load_model
    from engine.model.shaped_files import check_target

    out = _out_path(args.out)
    check_target(out)
    config = HealConfig(steps=args.steps, train=args.train, gate_sparsity=args.gate_sparsity,
                        block_size=args.block_size, batch_size=args.batch_size,
                        warmup=min(10, args.steps // 5))
    if args.lr is not None:
        config.lr = args.lr
    config.validate()
    teacher = load_model(args.teacher)
    blocks = heal_blocks(loaded.tokenizer, list(args.data), args.block_size)
    held = max(1, len(blocks) // 10)
    train, heldout = blocks[held:], blocks[:held]
    student = copy.deepcopy(loaded.model)
    before_ppl = held_out_perplexity(student, heldout)
    report = run_heal(student, teacher.model, train, config)
    after_ppl = held_out_perplexity(student, heldout)
    counts = parameter_counts(student)
    lines = [f"healed {report.steps} steps ({config.train}, lr {config.lr:g}): held-out "
             f"perplexity {before_ppl:.3f} -> {after_ppl:.3f} (teacher "
             f"{held_out_perplexity(teacher.model, heldout):.3f})",
             *format_counts(counts, counts)]
    return _save(student, loaded.tokenizer, out, lines, f"{len(heldout)} held-out blocks of "
                 f"{', '.join(args.data)}", args,
                 {"report": report.as_dict(), "ppl_before": before_ppl, "ppl_after": after_ppl})
