"""A probe with a completion recipe (a base model): chat messages render through the recipe
and the answer ends at its stop string; /v1/completions sends the raw text."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from guard.decoding import SamplingParams
from guard.generation import GuardedModel
from guard.model import LoadedModel, encode_chats
from guard.probe import load_probe
from guard.prompts import PromptRecipe, Shot
from tests.fixtures.models import TINY_MODEL_ID as MODEL
from tests.fixtures.probes import write_probe
from tests.fixtures.servers import AppFactory

QUESTION = [{"role": "user", "content": "Who wrote Hamlet?"}]


def _recipe(stop: tuple[str, ...]) -> PromptRecipe:
    shot = Shot(question="Capital of France?", answer="Paris")
    return PromptRecipe(style="completion", instruction="", shots=(shot,), stop=stop)


def test_chat_renders_through_the_recipe_and_stops(
    tiny_model: LoadedModel, make_app: AppFactory, tmp_path: Path
) -> None:
    free = GuardedModel(tiny_model, load_probe(write_probe(tmp_path / "a", tiny_model,
                                                           prompt=_recipe(()))))  # fmt: skip
    prompt = free.encode_chat(QUESTION)
    assert prompt == encode_chats(tiny_model.tokenizer, [QUESTION], _recipe(()))[0][0]
    text = free.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0)).text
    assert len(text) >= 4, "the tiny model should produce a few characters"
    stop = text[2:4]
    recipe = _recipe((stop,))
    guarded = GuardedModel(tiny_model, load_probe(write_probe(tmp_path / "b", tiny_model,
                                                              prompt=recipe)))  # fmt: skip
    assert guarded.chat_stop == (stop,)
    chat = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    with TestClient(make_app(guarded)) as client:
        response = client.post("/v1/chat/completions", json=chat)
        assert response.status_code == 200, response.text
        body = response.json()
        raw = client.post(
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": recipe.completion_text(QUESTION),
                "max_tokens": 12,
                "temperature": 0,
            },  # fmt: skip
        ).json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == text[: text.find(stop)]
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert raw["choices"][0]["text"] == text  # raw text: no recipe stop added
