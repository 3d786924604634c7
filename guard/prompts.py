"""The prompt recipe: how questions are put to the model, stored in the probe manifest.

Two styles, one recipe object used identically by collection, evaluation and serving:

- ``chat`` (the default, every probe before format 2's recipe fields): the question plus
  the instruction as one user message, rendered by the tokenizer's chat template;
- ``completion`` (base models without a chat template): a few-shot transcript

      {instruction}

      Q: {shot question}
      A: {shot answer}

      Q: {question}
      A:

  and the answer ends at the first of the recipe's ``stop`` strings (or an end token).

Chat messages render through a completion recipe as the same transcript: a system message
replaces the instruction, each user message is a ``Q:`` line and each assistant message
its ``A:`` answer, and the prompt ends with ``A:`` (`PromptRecipe.completion_text`). So a
one-question chat request is exactly the prompt the probe was trained on.

    recipe = PromptRecipe(style="completion", shots=(Shot(question="...", answer="..."),),
                          stop=("\\n",))
    recipe.completion_text(recipe.messages("Who wrote Hamlet?"))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Shot(BaseModel):
    """One worked example of a few-shot completion prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str
    answer: str


class PromptRecipe(BaseModel):
    """How training questions were put to the model; evaluation and serving reuse it exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction: str = "Answer in a few words."
    system: str | None = None  # chat: None = the chat template's default system prompt
    max_new_tokens: int = Field(default=20, ge=1)
    style: Literal["chat", "completion"] = "chat"
    shots: tuple[Shot, ...] = ()  # completion only
    stop: tuple[str, ...] = ()  # strings that end an answer (besides end tokens)

    @model_validator(mode="after")
    def _consistent(self) -> PromptRecipe:
        if self.style == "chat" and self.shots:
            raise ValueError("few-shot examples need style='completion'")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self

    def identity(self) -> dict[str, Any]:
        """The recipe as JSON values, for set-up checks of resumable files; a chat recipe
        without stop strings dumps as before the completion fields existed."""
        dump = self.model_dump(mode="json")
        if self.style == "chat" and not self.stop:
            for key in ("style", "shots", "stop"):
                dump.pop(key)
        return dump

    @property
    def turn_stop(self) -> tuple[str, ...]:
        """Stop strings that end an assistant turn as rendered (a completion recipe's, e.g.
        ``"\\n"``; none for chat templates, whose turns end with an end token)."""
        return self.stop if self.style == "completion" else ()

    def messages(self, question: str) -> list[dict[str, str]]:
        """The chat messages for one question (completion style: the bare question; the
        instruction and shots are part of the rendering)."""
        if self.style == "completion":
            return [{"role": "user", "content": question.strip()}]
        content = f"{question.strip()} {self.instruction}".strip()
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*head, {"role": "user", "content": content}]

    def completion_text(self, messages: Sequence[dict[str, str]]) -> str:
        """A conversation as the few-shot transcript (module docstring), ending in ``A:``."""
        instruction = self.instruction
        text = "".join(f"Q: {s.question}\nA: {s.answer}\n\n" for s in self.shots)
        for message in messages:
            role, content = message["role"], message["content"].strip()
            if role == "system":
                instruction = content
            elif role == "assistant":
                text += f" {content}\n\n" if text.endswith("A:") else f"A: {content}\n\n"
            else:  # a user turn; one left unanswered gets an empty answer
                text += ("\n\n" if text.endswith("A:") else "") + f"Q: {content}\nA:"
        if not text.endswith("A:"):
            text += "A:"
        return (f"{instruction}\n\n" if instruction else "") + text

    def answer_text(self, answer: str) -> str:
        """An answer as the model would continue the prompt (completion: after ``A:``)."""
        if self.style == "completion" and answer and not answer[0].isspace():
            return " " + answer
        return answer


# The recipe for models without a chat template (base models), unless a build gives one.
# Shot questions are not in the shared TriviaQA or NQ-open files (checked by grep).
FEW_SHOT_RECIPE = PromptRecipe(
    style="completion",
    instruction="Answer each question in a few words.",
    shots=(
        Shot(question="What is the capital of France?", answer="Paris"),
        Shot(question="How many legs does a spider have?", answer="Eight"),
    ),
    stop=("\n",),
    max_new_tokens=16,
)


def default_recipe(has_chat_template: bool) -> PromptRecipe:
    """The build's recipe when none is given: the chat recipe for chat models, else the
    few-shot completion recipe."""
    return PromptRecipe() if has_chat_template else FEW_SHOT_RECIPE
