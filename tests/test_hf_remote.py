"""A saved student loads with plain transformers: AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True) gives the logits and the greedy generation of Mindset's own loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.model.loading import load_model, load_student
from engine.model.reading import read_chunk
from engine.model.student import save_student
from engine.model.surgery import convert


@pytest.mark.parametrize("kind, hparams", [
    ("featural", {"keys": "routed", "group_size": 16, "read_share": 0.5}),
    ("associative", {}),  # the recipe, with entries read before saving
])
def test_from_pretrained_with_remote_code_matches_mindsets_loader(
        tmp_path: Path, kind: str, hparams: dict[str, Any]) -> None:
    teacher = load_model("tiny-llama")
    calibration = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    student = convert(teacher, [1, 2], kind, calibration=calibration, **hparams)
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(1))
    if kind == "associative":
        read_chunk(student, teacher.tokenizer, ids[0].tolist())
    directory = save_student(student, tmp_path / "student", teacher.tokenizer)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("mindset_remote.")

    ours = load_student(directory).model
    theirs = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    with torch.inference_mode():
        assert torch.equal(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
        prompt = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
        generated = theirs.generate(prompt, max_new_tokens=8, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id or 0)
        expected = ours.generate(prompt, max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id or 0)
    assert generated.shape[1] == prompt.shape[1] + 8
    assert torch.equal(generated, expected)
