"""The options of ``hguard probes build``: what to train on, how, and where to write it.

config = BuildConfig(dataset=Path("triviaqa.jsonl"), out=Path("probe"))
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.model import DEFAULT_MODEL_SPEC
from guard.prompts import PromptRecipe, default_recipe
from probes.scope import ScopeConfig
from probes.train import TrainConfig


class BuildConfig(BaseModel):
    """``hguard probes build`` options (issue 2's CLI contract) plus the training recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: Path
    out: Path
    model: str = DEFAULT_MODEL_SPEC
    limit: int | None = Field(default=None, ge=1)
    samples: int = Field(default=0, ge=0)
    batch_size: int = Field(default=32, ge=1)
    work_dir: Path | None = None  # default: OUT.parent / (OUT.name + "-work")
    name: str | None = None  # default: "<model>-<dataset stem>"
    # None: from the model (`guard.prompts.default_recipe`: chat template or few-shot)
    prompt: PromptRecipe | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    save_sklearn: bool = True  # probe.joblib (analysis only; the shipped probe omits it)
    scope: ScopeConfig | None = Field(default_factory=ScopeConfig)  # None: no scope gate
    sparsity_curve: bool = True

    def with_recipe(self, tokenizer: PreTrainedTokenizerBase) -> BuildConfig:
        """This config with its prompt recipe decided for the loaded model's tokenizer."""
        if self.prompt is not None:
            return self
        recipe = default_recipe(bool(getattr(tokenizer, "chat_template", None)))
        return self.model_copy(update={"prompt": recipe})

    @property
    def recipe(self) -> PromptRecipe:
        """The prompt recipe (after `with_recipe`)."""
        if self.prompt is None:
            raise ValueError("the prompt recipe is decided when the model is loaded")
        return self.prompt

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.out.parent / (self.out.name + "-work")
