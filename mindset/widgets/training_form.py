"""The launch form's training options: augmentation, forgetful masking, label channels.

They sit in a collapsed section under the main fields (most jobs leave them alone). The
pane's form composes :func:`option_fields` and reads them with :func:`read_options`: the
values become ``JobRequest.options`` (``DistillConfig`` fields), checked by the job service
like every other setting, so a bad spec or rate is marked beside its field and nothing
starts. Each field's error line has the id ``form-<setting>-error``, the name the service
reports the problem under.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import HorizontalGroup
from textual.dom import DOMNode
from textual.widgets import Checkbox, Collapsible, Input, Label, Static

CHANNELS = ("content", "affect")
DEFAULT_CHANNEL_STEPS = "200"
FIELDS = ("augment", "forgetful_mask", "channels", "channel_steps")


def option_fields() -> ComposeResult:
    with Collapsible(title="training options", collapsed=True, id="form-options"):
        yield Label("augment training text (e.g. typo=0.02,homoglyph=0.01; empty: off)")
        yield Input("", id="form-augment", placeholder="typo=0.02")
        yield Static("", id="form-augment-error", classes="field-error")
        yield Label("forgetful mask rate (0 = off, below 1)")
        yield Input("0", id="form-forgetful_mask", type="number")
        yield Static("", id="form-forgetful_mask-error", classes="field-error")
        yield Label("label channels (trained after the main steps)")
        with HorizontalGroup(id="form-channels"):
            for name in CHANNELS:
                yield Checkbox(name, id=f"form-channel-{name}", compact=True)
        yield Static("", id="form-channels-error", classes="field-error")
        yield Label("channel steps")
        yield Input(DEFAULT_CHANNEL_STEPS, id="form-channel_steps", type="integer")
        yield Static("", id="form-channel_steps-error", classes="field-error")


def read_options(form: DOMNode) -> tuple[dict[str, Any], dict[str, str]]:
    """``(options, problems)``: the settings the fields give (only those set), and what
    cannot be read as a number, by field."""
    def value(name: str) -> str:
        return form.query_one(f"#form-{name}", Input).value.strip()

    options: dict[str, Any] = {}
    problems: dict[str, str] = {}
    if value("augment"):
        options["augment"] = value("augment")
    rate = value("forgetful_mask") or "0"
    try:
        if float(rate):
            options["forgetful_mask"] = float(rate)
    except ValueError:
        problems["forgetful_mask"] = "give the rate as a number in [0, 1), such as 0.15"
    channels = [name for name in CHANNELS
                if form.query_one(f"#form-channel-{name}", Checkbox).value]
    if channels:
        options["channels"] = channels
        try:
            options["channel_steps"] = int(value("channel_steps") or DEFAULT_CHANNEL_STEPS)
        except ValueError:
            problems["channel_steps"] = "give a whole number of steps"
    return options, problems


def reveal_problems(form: DOMNode, problems: dict[str, str]) -> None:
    """Open the options section when one of its fields has a problem (else it is unseen)."""
    if any(field in problems for field in FIELDS):
        form.query_one("#form-options", Collapsible).collapsed = False
