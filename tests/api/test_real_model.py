"""The real SmolLM2 behind the server, through the official `openai` client (slow)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from guard.errors import ProbeError
from guard.generation import GuardedModel
from guard.model import LoadedModel
from guard.probe import load_probe
from tests.fixtures.probes import write_probe
from tests.fixtures.servers import LiveServer


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two generations on a shared CPU
def test_openai_client_against_smollm2(
    smollm2: LoadedModel, live_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    try:
        probe = load_probe("default")
        probe.verify_model(smollm2.fingerprint)
    except ProbeError:
        probe = load_probe(write_probe(tmp_path, smollm2))
    server = live_server(guarded=GuardedModel(smollm2, probe), served_model_name="smollm2")
    client = openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=1500
    )
    question = [
        {"role": "user", "content": "What is the capital of France? Answer in a few words."}
    ]
    completion = client.chat.completions.create(
        model="smollm2",
        messages=question,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    guard = (completion.model_extra or {})["guard"]
    assert guard["probe"]["name"] == probe.name and 0.0 <= guard["risk"] <= 1.0
    if guard["decision"] != "abstain":
        assert "paris" in (completion.choices[0].message.content or "").lower()
    stream = client.chat.completions.create(
        model="smollm2",
        messages=question,
        max_tokens=8,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = list(stream)
    final = (chunks[-1].model_extra or {})["guard"]
    assert final["risk"] == pytest.approx(guard["risk"], abs=1e-4)
    assert final["decision"] in ("pass", "flag", "abstain")
