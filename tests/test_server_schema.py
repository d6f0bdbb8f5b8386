"""Property-based requests from the server's own OpenAPI schema: never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from engine.llm.local import LocalAdapter
from engine.llm.log import InteractionLog
from engine.llm.server import BackgroundServer, create_app
from engine.model.loading import LoadedModel
from engine.model.tiny import byte_level_tokenizer, tiny_model

API_KEY = "schema-test-key-77aa"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # A 32-token context keeps every generated request short.
    loaded = LoadedModel(tiny_model("llama", max_position_embeddings=32),
                         byte_level_tokenizer(), "tiny", "llama")
    log = InteractionLog(tmp_path_factory.mktemp("schema") / "log.sqlite")
    # Short names, so generated model ids sometimes hit a real model.
    app = create_app({"a": LocalAdapter(loaded, name="a", log=log)}, api_key=API_KEY)
    with BackgroundServer(app) as server:
        yield server.base_url.removesuffix("/v1")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                           checks=[not_a_server_error])
