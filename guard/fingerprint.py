"""What identifies a model to a probe: its architecture, shape and down-projection weights.

Kept apart from `guard.model` so that the artifact schema (`guard.probe`) and the plain
result types import no deep-learning framework.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ModelFingerprint(BaseModel):
    """What a probe must agree with: architecture, shape and the down-projection weights."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    num_layers: int
    mlp_width: int
    down_proj_sha256: str
