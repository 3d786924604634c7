"""Prompt recipes: the chat default is unchanged, completion recipes render few-shot
transcripts, and collection and the decode loop end answers at the same stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.decoding import SamplingParams
from guard.generation import GuardedModel
from guard.model import encode_chats, end_token_ids
from guard.probe import load_probe
from guard.prompts import FEW_SHOT_RECIPE, PromptRecipe, Shot, default_recipe
from probes.collect import collect_answers
from probes.datasets import QAItem
from tests.fixtures.models import byte_tokenizer, tiny_loaded

RECIPE = PromptRecipe(
    style="completion",
    instruction="Answer briefly.",
    shots=(Shot(question="Capital of France?", answer="Paris"),),
    stop=("\nQ:",),
    max_new_tokens=12,
)


def test_chat_recipe_is_unchanged() -> None:
    recipe = PromptRecipe()
    assert recipe.messages(" Who wrote Hamlet? ") == [
        {"role": "user", "content": "Who wrote Hamlet? Answer in a few words."}
    ]
    assert recipe.identity() == {
        "instruction": "Answer in a few words.", "system": None, "max_new_tokens": 20,
    }  # fmt: skip
    assert default_recipe(True) == recipe and default_recipe(False) == FEW_SHOT_RECIPE
    shipped = load_probe("default").manifest.prompt  # an old manifest loads as chat
    assert shipped.style == "chat" and shipped.stop == () and shipped.shots == ()


def test_completion_transcript() -> None:
    one = RECIPE.completion_text(RECIPE.messages(" Who wrote Hamlet? "))
    assert one == "Answer briefly.\n\nQ: Capital of France?\nA: Paris\n\nQ: Who wrote Hamlet?\nA:"
    chat = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "Shakespeare"},
        {"role": "user", "content": "And Faust?"},
    ]
    assert RECIPE.completion_text(chat) == (
        "Be terse.\n\nQ: Capital of France?\nA: Paris\n\n"
        "Q: Who wrote Hamlet?\nA: Shakespeare\n\nQ: And Faust?\nA:"
    )
    assert RECIPE.answer_text("Paris") == " Paris" and PromptRecipe().answer_text("x") == "x"
    with pytest.raises(ValueError, match="completion"):
        PromptRecipe(shots=(Shot(question="q", answer="a"),))
    tokenizer = byte_tokenizer()
    prompts, _, _ = encode_chats(tokenizer, [chat], RECIPE)
    assert prompts[0] == tokenizer(RECIPE.completion_text(chat))["input_ids"]


def test_collection_and_serving_stop_alike(tmp_path: Path) -> None:
    """A stop string cuts the collected answer exactly where the decode loop stops."""
    loaded = tiny_loaded(0)
    plain = GuardedModel(loaded, None)
    question = "Who wrote Hamlet?"
    probe_recipe = RECIPE.model_copy(update={"stop": ()})
    prompt = encode_chats(loaded.tokenizer, [RECIPE.messages(question)], RECIPE)[0][0]
    greedy = SamplingParams(max_tokens=RECIPE.max_new_tokens, temperature=0.0)
    free = plain.generate(prompt, greedy)
    text = free.text
    assert len(text) >= 4, "the tiny model should produce a few characters"
    stop = text[2:4]  # a stop string the greedy answer contains
    recipe = probe_recipe.model_copy(update={"stop": (stop,)})
    served = plain.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,)))
    item = QAItem(id="q1", question=question, answers=["Shakespeare"])
    record = collect_answers(loaded, [item], tmp_path / "a.jsonl", recipe, batch_size=1)[0]
    assert record.prompt_ids == prompt
    assert record.response_ids == [t.token_id for t in served.tokens]
    assert record.response == served.text == text[: text.find(stop)]
    assert record.stopped and served.finish_reason == "stop"
    assert end_token_ids(loaded.model, loaded.tokenizer)  # the end tokens come from the model
