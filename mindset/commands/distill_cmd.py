"""``mindset distill``: train a discrete-memory student from a teacher by distillation."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.distill.config import CHANNEL_TRAIN, MEMORY_KINDS, SCHEDULES, DistillConfig
from mindset.commands.common import (
    finite_float,
    non_negative_int,
    positive_float,
    positive_int,
)


def hparam(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as JSON when it parses (numbers, true/false), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def name_list(text: str) -> list[str]:
    """``content,affect`` -> ``["content", "affect"]`` (the names are checked with the run's
    settings, so an unknown one is refused in one line like every other setting)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def register(commands: Any) -> None:
    defaults = DistillConfig()  # the CLI's defaults are the run settings' own
    parser = commands.add_parser(
        "distill",
        help="train a memory student from a teacher by knowledge distillation",
        description="Clone the teacher, replace the MLPs of the chosen layers with memory "
        "layers, and train them to match the teacher (KL at temperature T, optionally "
        "layer-local matching first). Writes checkpoints, events, TensorBoard curves, the "
        "student and a run report into --out. Ctrl-C checkpoints and stops; --resume continues.",
    )
    parser.add_argument("--teacher", default=defaults.teacher,
                        help="default, tiny-gpt2, tiny-llama, or a model directory")
    parser.add_argument("--layers", default=None,
                        help="'all', an index, a list (1,4,7) or a range (8-10); required "
                        "unless --resume (which reads the run's own)")
    parser.add_argument("--memory", default=defaults.memory, choices=MEMORY_KINDS,
                        help="memory kind (dense = the compute-matched MLP control)")
    parser.add_argument("--data", action="append", default=[], metavar="PATH",
                        help="a UTF-8 text file or folder (repeatable); none = sample a corpus "
                        "from the teacher (data-free)")
    parser.add_argument("--data-free-blocks", type=positive_int,
                        default=defaults.data_free_blocks,
                        help="without --data: blocks of --block-size tokens the teacher writes "
                        "for training (kept in the data directory's cache for the next run)")
    parser.add_argument("--heldout-blocks", type=positive_int, default=defaults.heldout_blocks,
                        help="held-out blocks evaluated (without --data: also sampled)")
    parser.add_argument("--resample", action="store_true",
                        help="without --data: sample the training text again instead of "
                        "reusing the one this teacher wrote before with the same settings")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps,
                        help="end-to-end distillation steps")
    parser.add_argument("--router-steps", type=non_negative_int, default=defaults.router_steps,
                        help="routed memories: router fitting steps before the local stage")
    parser.add_argument("--router-lr", type=positive_float, default=defaults.router_lr,
                        help="learning rate of the router stage")
    parser.add_argument("--local-steps", type=non_negative_int, default=defaults.local_steps,
                        help="layer-local matching steps before the end-to-end stage")
    parser.add_argument("--local-tokens", type=non_negative_int, default=defaults.local_tokens,
                        help="capture the replaced MLPs' inputs/outputs on this many training "
                        "tokens once and sample the local steps from them (0 = a teacher pass "
                        "per local step)")
    parser.add_argument("--local-batch-tokens", type=positive_int,
                        default=defaults.local_batch_tokens,
                        help="token rows per local step when --local-tokens is set")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: a new one under the data directory)")
    parser.add_argument("--hparam", type=hparam, action="append", default=[],
                        metavar="KEY=VALUE", help="memory layer setting (repeatable), e.g. "
                        "num_subkeys=128, topk=16, init=mlp")
    parser.add_argument("--block-size", type=positive_int, default=defaults.block_size)
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--lr", type=positive_float, default=defaults.lr)
    parser.add_argument("--value-lr", type=positive_float, default=defaults.value_lr,
                        help="learning rate of memory values (default 10x --lr)")
    parser.add_argument("--temperature", type=positive_float, default=defaults.temperature)
    parser.add_argument("--ce-weight", type=float, default=defaults.ce_weight,
                        help="weight of the student's own cross-entropy (default 0)")
    parser.add_argument("--clip", type=positive_float, default=defaults.clip_norm,
                        help="gradient norm clip")
    parser.add_argument("--warmup", type=non_negative_int, default=defaults.warmup_steps,
                        help="warm-up steps")
    parser.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    parser.add_argument("--eval-every", type=positive_int, default=defaults.eval_every)
    parser.add_argument("--checkpoint-every", type=positive_int,
                        default=defaults.checkpoint_every)
    parser.add_argument("--seed", type=non_negative_int, default=defaults.seed)
    parser.add_argument("--threads", type=non_negative_int, default=defaults.threads,
                        help="CPU threads (default: torch's choice)")
    parser.add_argument("--augment", default=defaults.augment, metavar="SPEC",
                        help="noise on the training text (never the held-out text), e.g. "
                        "typo=0.02,homoglyph=0.01 (see `mindset augment --help`)")
    parser.add_argument("--augment-heldout", action="store_true",
                        help="noise the held-out text too")
    parser.add_argument("--forgetful-mask", type=finite_float, default=defaults.forgetful_mask,
                        metavar="RATE", help="forgetful causal masking: in end-to-end steps "
                        "the student attends to each earlier token with probability 1 - RATE "
                        "(RATE in [0, 1); the teacher and evaluation see everything)")
    parser.add_argument("--channels", type=name_list, default=[], metavar="NAMES",
                        help="label channels to add to the student and train after the main "
                        "stages: content, affect or content,affect")
    parser.add_argument("--channel-steps", type=non_negative_int,
                        default=defaults.channel_steps,
                        help="steps of the label-channel stage (with --channels)")
    parser.add_argument("--channel-pairs", type=positive_int, default=defaults.channel_pairs,
                        help="training pairs per channel, replies written by the teacher")
    parser.add_argument("--channel-lr", type=positive_float, default=defaults.channel_lr,
                        help="learning rate of the label-channel stage (default --lr)")
    parser.add_argument("--channel-train", choices=CHANNEL_TRAIN,
                        default=defaults.channel_train,
                        help="what the channel stage trains: the channels alone (the student "
                        "is unchanged on unlabelled text) or also the replaced layers")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--background", action="store_true",
                        help="start the run as a background job and print its id")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def build_config(args: argparse.Namespace) -> DistillConfig:
    config = DistillConfig(
        teacher=args.teacher, layers=args.layers, memory=args.memory,
        hparams=dict(args.hparam), data=[str(Path(p).expanduser().resolve()) for p in args.data],
        steps=args.steps, router_steps=args.router_steps, router_lr=args.router_lr,
        local_steps=args.local_steps, local_tokens=args.local_tokens,
        local_batch_tokens=args.local_batch_tokens, block_size=args.block_size,
        batch_size=args.batch_size, lr=args.lr, value_lr=args.value_lr,
        temperature=args.temperature, ce_weight=args.ce_weight, clip_norm=args.clip,
        warmup_steps=args.warmup, schedule=args.schedule, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, seed=args.seed, threads=args.threads,
        augment=args.augment, augment_heldout=args.augment_heldout,
        forgetful_mask=args.forgetful_mask, channels=args.channels,
        channel_steps=args.channel_steps, channel_pairs=args.channel_pairs,
        channel_lr=args.channel_lr, channel_train=args.channel_train,
        data_free_blocks=args.data_free_blocks, heldout_blocks=args.heldout_blocks,
        data_free_cache=not args.resample,
    )
    config.preflight()  # validate(), then the teacher's config: before --out is created
    return config


def check_out_dir(out: Path) -> None:
    """``--out`` names a directory this process can create or write in; checked before
    anything loads or is created (a probe file is made and removed), one line otherwise."""
    from engine.errors import InputError

    path = Path(os.path.abspath(out.expanduser()))
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            kind = "a file" if path.is_file() else "not a directory"
            raise InputError(f"--out {out} is {kind}; give a directory for the run")
        probe_writable(path, out)
        return
    ancestor = path.parent
    while not (ancestor.exists() or ancestor.is_symlink()):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"--out {out}: {ancestor} is a file, so no directory can be made "
                         "there; give another --out")
    probe_writable(ancestor, out)


def probe_writable(directory: Path, out: Path) -> None:
    from engine.errors import InputError

    try:
        handle, name = tempfile.mkstemp(prefix=".mindset-probe-", dir=directory)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create anything in {directory} "
                         f"({exc.strerror}); give a directory you can write to") from None
    os.close(handle)
    os.unlink(name)


def run(args: argparse.Namespace) -> int:
    from engine.distill.checkpoints import check_checkpoint, has_checkpoint
    from engine.distill.data import check_text_paths
    from engine.distill.events import SUMMARY_NAME, load_run_config
    from engine.errors import InputError

    if args.out is not None:
        check_out_dir(args.out)
    if args.resume:
        if args.out is None:
            raise InputError("--resume needs --out, the run directory to continue")
        config = load_run_config(args.out)
        check_checkpoint(args.out)  # a legacy pickle or a damaged pair: before any load
    else:
        if args.layers is None:
            raise InputError("the argument --layers is required: the layers to replace "
                             "('all', an index, a list 1,4,7 or a range 8-10)")
        config = build_config(args)
        if args.out is not None and has_checkpoint(args.out):
            raise InputError(f"{args.out} already holds a run; add --resume to continue it "
                             "or give another --out")
    if config.data:
        check_text_paths(config.data)

    if args.background:
        from engine.distill.jobs import JobRunner

        if args.resume:
            raise InputError("--background cannot resume a foreground run directory; "
                             "run it with --resume in the foreground")
        root = args.out.parent if args.out is not None else None
        name = args.out.name if args.out is not None else None
        job = JobRunner(root).start(config, name=name)
        print(f"started job {job.id} (pid {job.pid}) in {job.run_dir}")
        return 0

    if args.out is None:
        from engine.distill.jobs import job_name
        from engine.paths import runs_dir

        args.out = runs_dir() / job_name(config)
    report = train_with_progress(config, args.out, json_output=args.json)
    if not report:
        print(f"cancelled: checkpoint saved in {args.out}; continue with "
              f"`mindset distill --out {args.out} --resume`")
        return 130
    if args.json:
        print(json.dumps(report))
    else:
        print((args.out / SUMMARY_NAME).read_text(encoding="utf-8"), end="")
        print(f"run directory: {args.out}  (tensorboard --logdir {args.out / 'tensorboard'})")
    return 0


def train_with_progress(config: DistillConfig, run_dir: Path,
                        json_output: bool = False) -> dict[str, Any]:
    """Run in this process with a progress bar, shown once training starts (not on errors),
    on a terminal only (not piped, not with --json)."""
    from tqdm import tqdm

    from engine.distill.job_events import EvalEvent, JobEvent, PhaseEvent, StateEvent, StepEvent
    from engine.distill.loop import run_distillation
    from mindset.commands.progress import wanted, width

    bars: list[Any] = []
    phases: dict[str, Any] = {}  # a bar per counted phase before training (sampling text)

    def on_event(event: JobEvent) -> None:
        if isinstance(event, PhaseEvent):
            if not wanted(json_output):
                return
            if event.total and event.phase not in phases:
                phases[event.phase] = tqdm(total=event.total, unit=event.unit or "it",
                                           ncols=width(), desc=event.phase, leave=False)
            elif not event.total:
                print(f"{event.phase}…", file=sys.stderr, flush=True)
            bar = phases.get(event.phase)
            if bar is not None:
                bar.update(event.done - bar.n)
            return
        if isinstance(event, StateEvent) and event.state == "running" and not bars:
            bars.append(tqdm(total=config.total_steps, initial=event.step,
                             unit="step", ncols=width(), desc="distill",
                             disable=not wanted(json_output),
                             # One ETA: the run's own (from its step times), in the postfix.
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} "
                                        "[{elapsed}{postfix}]"))
        if not bars:
            return
        bar = bars[0]
        if isinstance(event, StepEvent):
            bar.update(event.step - bar.n)
            postfix: dict[str, Any] = {"stage": event.stage}
            for key, value in (("kl", event.kl), ("ce", event.ce), ("local", event.local),
                               ("recall", event.router_recall)):
                if value is not None:
                    postfix[key] = f"{value:.4f}"
            postfix["tok/s"] = f"{event.tokens_per_s:.0f}"
            postfix["eta"] = f"{event.eta_s:.0f}s"
            bar.set_postfix(postfix, refresh=False)
        elif isinstance(event, EvalEvent):
            bar.write(f"step {event.step}: held-out perplexity {event.heldout_ppl:.4f}")
        elif isinstance(event, StateEvent) and event.state == "paused":
            bar.write("paused")

    try:
        return run_distillation(config, run_dir, on_event=on_event)
    finally:
        for bar in [*phases.values(), *bars]:
            bar.close()
