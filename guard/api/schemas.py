"""The HTTP protocol: OpenAI-compatible request and response bodies, plus the guard's own.

Requests accept what OpenAI's API accepts for these endpoints and ignore fields the guard
does not implement (as vLLM does), except those whose silent dropping would change the
answer's meaning: ``n > 1`` and ``best_of > 1`` are refused with a clear 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4


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
    content: str | list[TextPart] | None = None

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


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # torch's seed range
    user: str | None = None
    n: int | None = Field(default=None, ge=1)

    @field_validator("n")
    @classmethod
    def _single_choice(cls, n: int | None) -> int | None:
        if n is not None and n > 1:
            raise ValueError("n > 1 is not supported: send one request per choice")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
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
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    best_of: int | None = Field(default=None, ge=1)
    echo: bool = False

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of is not None and best_of > 1:
            raise ValueError("best_of > 1 is not supported")
        return best_of

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if isinstance(prompt[0], str) and len(prompt) > 1:
                raise ValueError("one prompt per request: send a request per prompt")
        return prompt


class ScoreRequest(_Request):
    """``/v1/guard/score``: a question and answer, or chat messages ending in the answer."""

    model: str | None = None
    question: str | None = None
    answer: str | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ScoreRequest:
        if self.messages is not None:
            if self.question is not None or self.answer is not None:
                raise ValueError("give either 'messages' or 'question' and 'answer', not both")
            if len(self.messages) < 2 or self.messages[-1].role != "assistant":
                raise ValueError(
                    "'messages' must hold the conversation and end with the assistant's answer"
                )
        elif self.question is None or self.answer is None:
            raise ValueError("give 'question' and 'answer', or 'messages'")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hallucination-guard"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    ).model_dump()
