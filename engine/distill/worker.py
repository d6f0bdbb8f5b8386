"""Entry point of a background distillation process: ``python -m engine.distill.worker RUN_DIR``.

It reads ``RUN_DIR/config.json``, resumes from the run's checkpoint if there is one, and
trains to the end (or until cancelled). The same entry point runs under
``torchrun --nproc-per-node N -m engine.distill.worker RUN_DIR`` for data-parallel training.
Exit status: 0 completed or cancelled, 2 a clear error (in ``state.json``), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def lower_own_priority() -> None:
    """Apply the niceness the job runner asks for (``MINDSET_WORKER_NICENESS``) before the
    training threads start, so that they inherit it."""
    raw = os.environ.get("MINDSET_WORKER_NICENESS", "").strip()
    if not raw:
        return
    try:
        wanted = int(raw)
    except ValueError:
        return
    from engine.distill.jobs import lower_priority

    lower_priority(os.getpid(), wanted)


def main(argv: list[str] | None = None) -> int:
    lower_own_priority()
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
    parser = argparse.ArgumentParser(prog="python -m engine.distill.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    args = parser.parse_args(argv)

    from engine.distill.events import load_run_config
    from engine.distill.loop import run_distillation
    from engine.errors import MindsetError

    try:
        config = load_run_config(args.run_dir)
        run_distillation(config, args.run_dir, resume=not args.fresh)
    except MindsetError as exc:
        print(f"mindset: error: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
