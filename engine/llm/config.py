"""Which model to talk to: the ``[llm]`` table of the config file, and adapter specs.

The config file (``engine.paths.config_path()``, TOML)::

    [llm]
    adapter = "openai"          # or "local" (the default)
    model = "gpt-4o-mini"       # a local model spec for adapter = "local"
    base_url = "http://127.0.0.1:8000/v1"   # any OpenAI-compatible server
    api_key = "..."             # OPENAI_API_KEY takes precedence

Adapter specs, as given to ``--model`` or :func:`build_adapter`, are ``<adapter>:<model>``
for any adapter in :mod:`engine.llm.registry`; anything else is a local model spec:

* ``default``, ``tiny-llama``, ``tiny-gpt2``, a model or student directory, or
  ``local:<any of those>``: the local adapter;
* ``openai`` (the model from the config file) or ``openai:<model>``: the OpenAI-compatible
  adapter, with ``base_url`` and the key from the environment or the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config_file import read_config_file
from engine.errors import InputError
from engine.llm.adapter import BaseAdapter
from engine.llm.log import InteractionLog
from engine.llm.registry import adapter_entry, adapter_names, parse_spec
from engine.llm.secrets import check_key
from engine.llm.types import LLMConfig


def read_llm_config(path: Path | None = None) -> LLMConfig:
    """The ``[llm]`` table of the config file; defaults where the file or table is missing."""
    if path is None:
        from engine.paths import config_path

        path = config_path()
    table = read_config_file(path).get("llm", {})
    if not isinstance(table, dict):
        raise InputError(f"{path}: [llm] must be a table")
    config = LLMConfig()
    for key in ("adapter", "model", "base_url", "api_key"):
        value = table.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InputError(f"{path}: llm.{key} must be a string")
        setattr(config, key, value)
    if config.api_key is not None:  # "" is refused too: a key that is set must be a key
        check_key(config.api_key, f"{path}: llm.api_key",
                  hint="leave it out for a server that needs no key")
    if config.adapter not in adapter_names():
        raise InputError(
            f"{path}: llm.adapter is {config.adapter!r}; use one of {', '.join(adapter_names())}"
        )
    return config


def build_adapter(spec: str | None = None, *, config: LLMConfig | None = None,
                  log: InteractionLog | bool = True, **options: Any) -> BaseAdapter:
    """An adapter for ``spec`` (see the module docstring); ``None`` means the config's choice.

    ``log``: True for the interaction log in the data directory, False for none, or a log.
    Loading a local model blocks for seconds: call this from a worker thread in a UI.
    ``options`` go to the adapter (``api_key``, ``base_url``, ``max_retries``...).
    """
    config = config or read_llm_config()
    name, model = parse_spec(spec, config)
    given_log = None if log is True else (log or None)
    adapter = adapter_entry(name).factory(model, config=config, log=given_log, **options)
    if log is True:
        # Opened only once the adapter exists: a spec that fails to load leaves no new file.
        adapter.log = InteractionLog()
    return adapter
