"""GuardSettings: every ``GUARD_*`` environment variable of the serving runtime.

Typed, validated, built only when asked (`get_settings()` or ``GuardSettings(**overrides)``),
never at import time.

    settings = GuardSettings(probe="default", api_keys="k1,k2")
    settings.api_keys  # ["k1", "k2"]
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_ABSTAIN_MESSAGE = (
    "I am not confident enough in the answer to give it reliably, so I will not answer."
)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class GuardSettings(BaseSettings):
    """Configuration of `hguard serve` (env prefix ``GUARD_``; see README.md, "Settings")."""

    model_config = SettingsConfigDict(
        env_prefix="GUARD_", extra="ignore", protected_namespaces=(), validate_default=True
    )

    model: str | None = Field(
        default=None, description="model spec; None = the model the probe was trained on"
    )
    served_model_name: str | None = Field(
        default=None, description="id listed by /v1/models; None = the loaded model's id"
    )
    probe: str | None = Field(
        default=None,
        description="shipped probe name (guard.shipped) or directory; None = the shipped "
        "probe of GUARD_MODEL, else 'default' (SmolLM2)",
    )
    probe_sha256: str | None = None
    flag_threshold: Probability | None = None
    abstain_threshold: Probability | None = None
    abort_threshold: Probability | None = None
    abort_min_tokens: int | None = Field(default=None, ge=1)
    abort_on_sentences: bool = Field(
        default=False,
        description="with an abort threshold: also stop a stream as soon as one of its "
        "sentences is final with a risk at that threshold (false: the running risk only)",
    )
    abstain_message: str = DEFAULT_ABSTAIN_MESSAGE
    knowledge_gate: bool = Field(
        default=False,
        description="act on the knowledge gate's prompt_risk (flag/abstain at its thresholds); "
        "false: report it only (see README, 'Long answers and made-up entities')",
    )
    prompt_flag_threshold: Probability | None = Field(
        default=None,
        description="with the knowledge gate acting: flag at this prompt_risk instead of the "
        "gate's own line",
    )
    prompt_abstain_threshold: Probability | None = Field(
        default=None,
        description="with the knowledge gate acting: abstain at this prompt_risk instead of "
        "the gate's own line",
    )
    abstain_before_generation: bool = Field(
        default=True,
        description="with the knowledge gate acting: abstain without generating when the "
        "prompt_risk reaches its abstain threshold (false: generate, then abstain)",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_prompt_tokens: int = Field(default=2048, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    max_batch: int = Field(default=32, ge=1)
    queue_size: int = Field(default=256, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0.0)
    request_timeout_s: float = Field(default=300.0, gt=0.0)
    shutdown_grace_s: float = Field(default=30.0, ge=0.0)
    audit_log: Path | None = None
    allow_unguarded: bool = False
    scope_gate: bool = Field(
        default=True,
        description="let the probe's scope gate pass prompts it does not judge (false: judge all)",
    )
    vllm_multiprocess: bool = Field(
        default=True,
        description="--engine vllm: vLLM's own process layout (engine core and worker in "
        "their processes, the capture's frames sent back on a channel); false: in process",
    )
    scope_threshold: Probability | None = Field(
        default=None, description="override the gate's threshold on p(short factual question)"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """Comma-separated in the environment (pydantic-settings would expect JSON)."""
        if value is None:
            return []
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator(
        "model", "served_model_name", "probe", "probe_sha256", "audit_log", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> GuardSettings:
        for prefix, flag, abstain in (
            ("", self.flag_threshold, self.abstain_threshold),
            ("PROMPT_", self.prompt_flag_threshold, self.prompt_abstain_threshold),
        ):
            if flag is not None and abstain is not None and abstain < flag:
                raise ValueError(
                    f"GUARD_{prefix}ABSTAIN_THRESHOLD ({abstain}) is below "
                    f"GUARD_{prefix}FLAG_THRESHOLD ({flag}): abstaining must need at least "
                    "the risk that flags"
                )
        return self


@lru_cache(maxsize=1)
def get_settings() -> GuardSettings:
    """The process-wide settings from the environment, built on first use."""
    return GuardSettings()
