"""Every kind of LLM adapter, by the name its specs start with: ``<name>:<model>``.

Adding an adapter is one :class:`AdapterEntry` in :data:`ADAPTERS` (or one
:func:`register_adapter` call); spec parsing, :func:`engine.llm.build_adapter`, the
``[llm] adapter`` check and the CLI's help all read this table. Factories import their
adapter's module themselves, so heavy client libraries load only when one is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engine.errors import InputError
from engine.llm.types import DEFAULT_ADAPTER, LLMConfig

if TYPE_CHECKING:  # the CLI reads this table while it builds its parser: keep it light
    from engine.llm.adapter import BaseAdapter
    from engine.llm.log import InteractionLog


class AdapterFactory(Protocol):
    def __call__(self, model: str | None, *, config: LLMConfig, log: InteractionLog | None,
                 **options: Any) -> BaseAdapter:
        """An adapter for ``model`` (None: the spec named no model)."""


@dataclass(frozen=True)
class AdapterEntry:
    name: str  # the spec prefix and the value of ``[llm] adapter``
    description: str  # one line: the specs it takes and what they reach
    factory: AdapterFactory


def _local(model: str | None, *, config: LLMConfig, log: InteractionLog | None,
           **options: Any) -> BaseAdapter:
    from engine.llm.local import LocalAdapter

    return LocalAdapter.from_spec(model or "default", log=log)


def _openai(model: str | None, *, config: LLMConfig, log: InteractionLog | None,
            **options: Any) -> BaseAdapter:
    from engine.llm.openai_adapter import OpenAIAdapter

    if not model:
        raise InputError("no remote model named: give openai:<model> or set model under "
                         "[llm] in the config file")
    options.setdefault("base_url", config.base_url or os.environ.get("OPENAI_BASE_URL"))
    options.setdefault("api_key", os.environ.get("OPENAI_API_KEY") or config.api_key)
    return OpenAIAdapter(model, log=log, **options)


ADAPTERS: dict[str, AdapterEntry] = {
    entry.name: entry
    for entry in (
        AdapterEntry("local", "default, tiny-llama, tiny-gpt2, a model or student directory, "
                     "or local:<any of those>: a model run in this process", _local),
        AdapterEntry("openai", "openai:<model>, or openai for the [llm] model: an "
                     "OpenAI-compatible API (base_url, OPENAI_API_KEY)", _openai),
    )
}


def register_adapter(entry: AdapterEntry) -> None:
    """Make ``<entry.name>:<model>`` specs build with ``entry.factory``."""
    if not entry.name or ":" in entry.name:
        raise ValueError(f"adapter name {entry.name!r} must be non-empty and hold no ':'")
    ADAPTERS[entry.name] = entry


def adapter_names() -> tuple[str, ...]:
    return tuple(ADAPTERS)


def adapter_entry(name: str) -> AdapterEntry:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise InputError(
            f"no adapter {name!r}; use one of {', '.join(adapter_names())}"
        ) from None


def specs_help() -> str:
    """The spec forms of every adapter, for ``--model`` help."""
    return "; ".join(entry.description for entry in ADAPTERS.values())


def parse_spec(spec: str | None, config: LLMConfig) -> tuple[str, str | None]:
    """The adapter name and model a spec means; a bare ``<name>`` or an empty model part
    means the config's model when the config picks that adapter."""
    if spec is None or not spec.strip():
        return config.adapter, config.model
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ADAPTERS:
        fallback = config.model if prefix == config.adapter else None
        return prefix, rest or fallback
    if spec in ADAPTERS:
        return spec, config.model if spec == config.adapter else None
    return DEFAULT_ADAPTER, spec
