"""The vLLM engine's tests run only where vLLM is installed (``.venv-vllm``:
``make test-vllm``); elsewhere the whole directory is skipped at collection."""

from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]
