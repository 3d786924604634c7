"""The probes shipped inside the package, by name, each pinned by its manifest's sha256.

``--probe NAME`` (``GUARD_PROBE``) selects one of these by name; anything else is a probe
directory. ``default`` is the SmolLM2 probe; a model spec with a shipped probe gets it when
no probe is named (``hguard serve --model gemma3-270m``).

    shipped = SHIPPED_PROBES["gemma3-270m-triviaqa"]
    shipped.directory, shipped.sha256
    probe_for_model("gemma3-270m")  # "gemma3-270m-triviaqa" (from its manifest's model spec)

Ship a new artifact with `probes.build.export_probe` into its directory and put the sha256
it prints here: an edited manifest is then refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
DEFAULT_PROBE_NAME = "default"


@dataclass(frozen=True)
class ShippedProbe:
    """One shipped artifact: where it lies and its pinned manifest sha256."""

    name: str
    directory: Path
    sha256: str

    def model_spec(self) -> str | None:
        """The model spec its manifest says it was trained on (None: not shipped yet)."""
        path = self.directory / "manifest.json"
        if not path.is_file():
            return None
        spec = json.loads(path.read_text(encoding="utf-8")).get("training", {}).get("model_spec")
        return str(spec) if spec is not None else None


_SMOLLM2 = ShippedProbe(
    name="smollm2-135m-triviaqa",
    directory=PACKAGE_DIR / "default_probe",
    sha256="567229b6b4f156017a225d49bcabbb295819ac2fbefdd65593e5b333a748d1a0",
)
_GEMMA3 = ShippedProbe(
    name="gemma3-270m-triviaqa",
    directory=PACKAGE_DIR / "shipped_probes" / "gemma3-270m-triviaqa",
    sha256="40c601b53f81c542a19275849fd62b19d94d5aacfedcd71e12df63525154b10b",
)
SHIPPED_PROBES: dict[str, ShippedProbe] = {
    DEFAULT_PROBE_NAME: _SMOLLM2,
    _SMOLLM2.name: _SMOLLM2,
    _GEMMA3.name: _GEMMA3,
}


def shipped_probe(spec: str | Path) -> ShippedProbe | None:
    """The shipped probe a ``--probe`` value names, or None (a directory)."""
    return SHIPPED_PROBES.get(str(spec))


def probe_for_model(model_spec: str | None) -> str:
    """The shipped probe to serve a model spec with when no probe is named: the one
    trained on it, else ``default``."""
    if model_spec is not None:
        for name, shipped in SHIPPED_PROBES.items():
            if shipped.sha256 and shipped.model_spec() == model_spec:
                return name
    return DEFAULT_PROBE_NAME
