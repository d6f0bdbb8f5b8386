"""Shared pieces of the distillation and job tests (no tests of its own).

The tiny teacher here is the tiny Llama with larger initial weights, so its predictions are
far from uniform and removing an MLP costs a clear KL (about 1 nat/token) to win back.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

SAMPLE_TEXT = (
    "The river rose in the spring and the mill turned faster. Farmers carried grain to the "
    "mill, and the miller weighed every sack twice before he wrote the number in his book. "
) * 30

TINY_FEATURAL = {"num_subkeys": 16, "topk": 4, "query_dim": 16, "heads": 2}


@functools.cache
def teacher_dir() -> Path:
    """A tiny Llama teacher saved as a Hugging Face directory (loadable by spec in workers)."""
    from engine.model.tiny import byte_level_tokenizer, tiny_model

    directory = Path(tempfile.mkdtemp(prefix="mindset-distill-teacher-"))
    tiny_model("llama", initializer_range=0.2).save_pretrained(str(directory))
    byte_level_tokenizer().save_pretrained(str(directory))
    return directory


@functools.cache
def text_file() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mindset-distill-text-")) / "mill.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


def tiny_config(**overrides: Any) -> Any:
    from engine.distill.config import DistillConfig

    settings: dict[str, Any] = dict(
        teacher=str(teacher_dir()), layers="1,2", memory="featural",
        hparams=dict(TINY_FEATURAL), data=[str(text_file())], steps=8, block_size=32,
        batch_size=4, heldout_blocks=4, lr=3e-3, eval_every=4, checkpoint_every=3,
        threads=1, seed=0,
    )
    settings.update(overrides)
    return DistillConfig(**settings)
