"""Sampling defaults for a local model: what its authors ship in its generation config, or
conservative settings for a small model that ships none.

A small model sampled at temperature 0.7-1.0 invents facts it knows greedily (SmolLM2-135M
answers "the capital of France" with a made-up city at 0.7, with Paris greedily); its model
card recommends temperature 0.2 with top-p 0.9, which is the fallback here. The chat, the
`complete` command and the server fill every sampling parameter a request leaves out from
these defaults.
"""

from __future__ import annotations

from typing import Any

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")
SMALL_MODEL_DEFAULTS: dict[str, float | int] = {"temperature": 0.2, "top_p": 0.9}
NEUTRAL: dict[str, float | int] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                   "repetition_penalty": 1.0}


def generation_defaults(model: Any) -> dict[str, float | int]:
    """The sampling parameters a model should be used with when a caller names none.

    Taken from ``model.generation_config`` when its authors asked for sampling there
    (``do_sample`` true); otherwise :data:`SMALL_MODEL_DEFAULTS`. Keys are
    :data:`SAMPLING_FIELDS`; missing ones mean the neutral value (:data:`NEUTRAL`)."""
    config = getattr(model, "generation_config", None)
    if config is not None and getattr(config, "do_sample", False):
        found: dict[str, float | int] = {}
        for name in SAMPLING_FIELDS:
            value = getattr(config, name, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                found[name] = value
        if found:
            return found
    return dict(SMALL_MODEL_DEFAULTS)


def filled(defaults: dict[str, float | int], **given: float | int | None) -> dict[str, Any]:
    """``given`` sampling parameters, each one left out (None) taken from ``defaults``,
    else neutral."""
    return {name: value if value is not None else defaults.get(name, NEUTRAL[name])
            for name, value in given.items()}
