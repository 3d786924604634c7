"""The HTTP protocol's requests: OpenAI-compatible completions, plus the guard's score.

Requests accept what OpenAI's API accepts for these endpoints and ignore fields the guard
does not implement (as vLLM does), except those whose silent dropping would change the
answer's meaning: ``n > 1``, ``best_of > 1`` and ``echo`` are refused with a clear 400.
Each limit is a constraint of the schema, so ``/openapi.json`` says what is accepted
(`guard.api.openapi` adds the limits that depend on the server's settings); the
``mode="before"`` validators only give the commonest refusals a message that says what
to do. Response bodies are in `guard.api.responses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

MAX_STOP_STRINGS = 4
# Seeds are JSON's safe integers: every parser reads them exactly, so a client's schema
# check and the server agree at the bounds (torch takes any of them).
SAFE_INT = 2**53 - 1

# Tags of the score request's two forms; they prefix validation error locations
# (`guard.api.errors` drops them so messages name the field, not the form).
QUESTION_FORM = "question-and-answer"
MESSAGES_FORM = "conversation"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    """One part of a multi-part message content; only text parts are supported."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | Sequence[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_template(self) -> dict[str, str]:
        """The ``{"role", "content"}`` dict a chat template expects."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


def _at_most_one(name: str, value: Any, advice: str) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        raise ValueError(f"{name} > 1 is not supported{advice}")
    return value


StopList = Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)]


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1, description="at most GUARD_MAX_NEW_TOKENS")
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="default 1.0 (OpenAI's); 0 is greedy"
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | StopList | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-SAFE_INT, le=SAFE_INT)
    user: str | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="one choice per request")

    @field_validator("n", mode="before")
    @classmethod
    def _single_choice(cls, n: Any) -> Any:
        return _at_most_one("n", n, ": send one request per choice")

    @field_validator("stop", mode="before")
    @classmethod
    def _few_stops(cls, stop: Any) -> Any:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="at most GUARD_MAX_NEW_TOKENS; wins over max_tokens"
    )

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


PromptText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)] | TokenIds
    best_of: int | None = Field(default=None, ge=1, le=1)
    echo: Literal[False] | None = Field(default=False, description="echoing is not supported")

    @field_validator("best_of", mode="before")
    @classmethod
    def _no_best_of(cls, best_of: Any) -> Any:
        return _at_most_one("best_of", best_of, "")

    @field_validator("echo", mode="before")
    @classmethod
    def _no_echo(cls, echo: Any) -> Any:
        if echo is True:
            raise ValueError("echo is not supported: prepend the prompt yourself")
        return echo

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if prompt == "" or prompt == [] or prompt == [""]:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str):
            raise ValueError("one prompt per request: send a request per prompt")
        return prompt


class QuestionAnswer(_Request):
    """A question and the answer to score, asked with the probe's prompt recipe."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["messages"]}})

    model: str | None = None
    question: str
    answer: str = Field(min_length=1)

    @field_validator("answer", mode="before")
    @classmethod
    def _some_answer(cls, answer: Any) -> Any:
        if answer == "":
            raise ValueError("the answer is empty: give the text to score")
        return answer


class ScoredPart(TextPart):
    text: str = Field(min_length=1)


class ScoredMessage(ChatMessage):
    """A message of a scored conversation: never empty (the last one is the answer)."""

    content: Annotated[str, Field(min_length=1)] | Annotated[list[ScoredPart], Field(min_length=1)]


class Conversation(_Request):
    """Chat messages ending with the answer to score: the last message is scored as the
    assistant's reply to the ones before it."""

    model_config = ConfigDict(
        json_schema_extra={"not": {"anyOf": [{"required": ["question"]}, {"required": ["answer"]}]}}
    )

    model: str | None = None
    messages: list[ScoredMessage] = Field(min_length=2)

    @field_validator("messages", mode="before")
    @classmethod
    def _a_conversation(cls, messages: Any) -> Any:
        if isinstance(messages, list) and len(messages) < 2:
            raise ValueError("give the conversation and, last, the answer to score")
        return messages


def _score_form(body: Any) -> str | None:
    """Which form a score request takes; None (a 400) for neither or both."""
    if isinstance(body, QuestionAnswer | Conversation):
        return QUESTION_FORM if isinstance(body, QuestionAnswer) else MESSAGES_FORM
    if not isinstance(body, dict):
        return None
    has_messages, has_pair = "messages" in body, "question" in body or "answer" in body
    if has_messages == has_pair:
        return None
    return MESSAGES_FORM if has_messages else QUESTION_FORM


ScoreRequest = Annotated[
    Annotated[QuestionAnswer, Tag(QUESTION_FORM)] | Annotated[Conversation, Tag(MESSAGES_FORM)],
    Discriminator(
        _score_form,
        custom_error_type="score_form",
        custom_error_message="give either 'question' and 'answer', or 'messages' (not both)",
    ),
]
"""``/v1/guard/score``: one of two forms, `QuestionAnswer` or `Conversation`."""
