"""Property-based requests against the real server: never a 5xx.

Two sources: the server's own OpenAPI schema (schemathesis, valid and invalid bodies), and
hand-made bodies with the values a schema cannot rule out: subnormal temperatures and
penalties, NaN and infinities (Python's JSON reads them), and text with lone surrogates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from engine.llm.local import LocalAdapter
from engine.llm.log import InteractionLog
from engine.llm.server import BackgroundServer, create_app
from engine.model.loading import LoadedModel
from engine.model.tiny import byte_level_tokenizer, tiny_model

API_KEY = "schema-test-key-77aa-0123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # A 32-token context keeps every generated request short.
    loaded = LoadedModel(tiny_model("llama", max_position_embeddings=32),
                         byte_level_tokenizer(), "tiny", "llama")
    log = InteractionLog(tmp_path_factory.mktemp("schema") / "log.sqlite")
    # Short names, so generated model ids sometimes hit a real model. A small body limit,
    # so that generated bodies can pass it too.
    app = create_app({"a": LocalAdapter(loaded, name="a", log=log)}, api_key=API_KEY,
                     max_body_bytes=64 * 1024)
    with BackgroundServer(app) as server:
        yield server.base_url.removesuffix("/v1")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> schemathesis.BaseSchema:
    # The schema is behind the key too.
    loaded = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=AUTH)
    loaded.config.generation.update(modes=list(schemathesis.GenerationMode))
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, headers=AUTH, checks=[not_a_server_error])


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                    st.floats(min_value=0, max_value=1e-30), st.integers(-3, 12))
# Letters, digits, punctuation, spaces and surrogates (which JSON can escape, and UTF-8 not).
texts = st.text(st.characters(categories=["L", "N", "P", "Zs", "Cs"]), max_size=6)


@given(endpoint=st.sampled_from(["chat/completions", "completions"]), text=texts,
       temperature=numbers, top_p=numbers, penalty=numbers)
@example(endpoint="completions", text="x", temperature=1e-45, top_p=1, penalty=1)
@example(endpoint="completions", text="x", temperature=1, top_p=1, penalty=1e-40)
@example(endpoint="chat/completions", text="a\ud800b", temperature=1, top_p=1, penalty=1)
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_odd_sampling_values_and_text_are_never_a_server_error(
        base_url: str, endpoint: str, text: str, temperature: float, top_p: float,
        penalty: float) -> None:
    body: dict[str, Any] = {"model": "a", "max_tokens": 2, "temperature": temperature,
                            "top_p": top_p, "repetition_penalty": penalty}
    body.update({"messages": [{"role": "user", "content": text}]} if endpoint.startswith("chat")
                else {"prompt": text})
    # json.dumps escapes surrogates and writes NaN / Infinity, as a careless client would.
    response = httpx.post(f"{base_url}/v1/{endpoint}", content=json.dumps(body).encode(),
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
