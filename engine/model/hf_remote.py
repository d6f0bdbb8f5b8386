"""Students that plain Hugging Face tooling loads: ``from_pretrained(DIR, trust_remote_code=True)``.

Every saved student directory gets a small module (``mindset_remote.py``) and an
``auto_map`` entry in its ``config.json`` that names it, so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

returns the student, memory layers and all, ready for ``generate``, lm-evaluation-harness or
a notebook. The module only hands over to Mindset's own loader (which reads safetensors and
JSON, never a pickle), so Mindset must be installed where it runs; its error says so.
"""

from __future__ import annotations

import json
from pathlib import Path

REMOTE_MODULE = "mindset_remote"
REMOTE_CLASS = "MindsetStudentForCausalLM"
AUTO_MAP = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.{REMOTE_CLASS}"}

REMOTE_SOURCE = '''"""A Mindset student for Hugging Face transformers (written by Mindset).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(STUDENT_DIR, trust_remote_code=True)

Loading hands over to Mindset's own loader, so Mindset must be installed.
"""

from transformers import PreTrainedModel


class MindsetStudentForCausalLM(PreTrainedModel):
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        try:
            from engine.model.loading import load_student
        except ImportError as exc:
            raise ImportError(
                "this is a Mindset student: install Mindset in this environment to load it "
                "(its memory layers are Mindset's)") from exc
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype == "auto":
            dtype = None
        model = load_student(str(pretrained_model_name_or_path), dtype=dtype).model
        device = kwargs.get("device_map")
        if isinstance(device, str) and device not in ("auto", "cpu"):
            model = model.to(device)
        return model
'''


def write_remote_code(directory: Path) -> None:
    """Add the loader module and its ``auto_map`` to a student directory being saved."""
    (directory / f"{REMOTE_MODULE}.py").write_text(REMOTE_SOURCE, encoding="utf-8")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = {**config.get("auto_map", {}), **AUTO_MAP}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
