"""Shared fixtures: the real SmolLM2 model (loaded once per session) and tiny random models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from guard.model import LoadedModel, load_model  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
TRIVIAQA = os.path.abspath(os.path.join(SHARED_DATA, "triviaqa", "triviaqa.jsonl"))
NQ_OPEN = os.path.abspath(os.path.join(SHARED_DATA, "nq_open", "nq_open_dev.jsonl"))


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, de-quantised to float32 once per test session."""
    torch.manual_seed(0)
    return load_model("smollm2")
