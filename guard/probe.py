"""The probe artifact: manifest schema, save/load, and verification against a model.

A probe is a directory::

    manifest.json   ProbeManifest (pydantic): recipe, thresholds, metrics, sha256 of every file
    weights.npz     selected (layer, neuron) indices, weights and bias: no pickle, ever
    scope.npz       the scope gate's weights (optional: see `guard.scope`)
    knowledge.npz   the knowledge gate's weights (optional: see `guard.knowledge`)
    report.json     evaluation report (optional)
    probe.joblib    fitted scikit-learn objects, for analysis only (optional, never loaded
                    by the runtime: see `load_sklearn_objects`)

Loading verifies every file's sha256 against the manifest and, when asked, the
manifest's own sha256 against a pin; `verify_model` checks the model fingerprint.

    probe = load_probe("default")
    probe.verify_model(loaded.fingerprint)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from guard.errors import ProbeError, ProbeIntegrityError, ProbeModelMismatchError
from guard.fingerprint import ModelFingerprint
from guard.prompts import PromptRecipe
from guard.shipped import DEFAULT_PROBE_NAME, SHIPPED_PROBES, shipped_probe

# 2 added the optional scope gate (`scope` in the manifest, scope.npz); 3 the optional
# knowledge gate (`knowledge`, knowledge.npz); 4 its max-pooled feature
# (``residual_max_prompt_token``). Older formats still load.
FORMAT_VERSION = 4
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.npz"
SCOPE_FILE = "scope.npz"
KNOWLEDGE_FILE = "knowledge.npz"
SKLEARN_FILE = "probe.joblib"
# The shipped default probe and its pinned manifest sha256 (`guard.shipped`: every shipped
# probe by name). `hguard probes build` prints a sha256; `probes.build.export_probe` ships.
DEFAULT_PROBE_DIR = SHIPPED_PROBES[DEFAULT_PROBE_NAME].directory
DEFAULT_PROBE_SHA256 = SHIPPED_PROBES[DEFAULT_PROBE_NAME].sha256

StatName = Literal["length", "mean_logprob", "min_logprob", "mean_entropy", "max_entropy"]
STAT_NAMES: tuple[StatName, ...] = (
    "length",
    "mean_logprob",
    "min_logprob",
    "mean_entropy",
    "max_entropy",
)


def _abstain_not_below_flag(cls: type, abstain: float, info: Any) -> float:
    """A pydantic validator: an abstain threshold may not lie below the flag threshold."""
    flag = info.data.get("flag")
    if flag is not None and abstain < flag:
        raise ValueError(f"abstain threshold {abstain} is below the flag threshold {flag}")
    return abstain


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlattCalibrator(_Strict):
    """``risk = sigmoid(a * z + b)``."""

    kind: Literal["platt"] = "platt"
    a: float
    b: float

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * np.asarray(z, dtype=np.float64) + self.b)))


class IsotonicCalibrator(_Strict):
    """Piecewise-linear monotone map through ``(x, y)``, constant beyond the ends."""

    kind: Literal["isotonic"] = "isotonic"
    x: list[float]
    y: list[float]

    @field_validator("y")
    @classmethod
    def _same_length(cls, y: list[float], info: Any) -> list[float]:
        x = info.data.get("x", [])
        if len(x) != len(y) or len(x) < 2:
            raise ValueError("isotonic x and y need the same length, at least 2")
        return y

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(z, dtype=np.float64), self.x, self.y)


Calibrator = Annotated[PlattCalibrator | IsotonicCalibrator, Field(discriminator="kind")]


class Stacker(_Strict):
    """Second stage on the probe logit and free logit statistics (scaling folded in).

    ``z = intercept + probe_coef * probe_logit + sum(coef[name] * stat[name])``
    """

    probe_coef: float
    coef: dict[StatName, float]
    intercept: float


class ScoringRecipe(_Strict):
    """How captured neurons and logit statistics become the served answer risk.

    token logit ``s_t = bias + sum_{(l,j)} w_lj * CETT_{l,j,t}``; answer probe logit =
    mean of ``s_t`` over response tokens (exact, streamable); ``z`` = stacker of it and the
    logit statistics (or the probe logit itself); risk = calibrator(z).
    """

    pooling: Literal["mean"] = "mean"
    stacker: Stacker | None = None
    calibrator: Calibrator


class Thresholds(_Strict):
    """Decision thresholds on the calibrated risk, and how they were chosen."""

    flag: float = Field(ge=0.0, le=1.0)
    abstain: float = Field(ge=0.0, le=1.0)
    abort: float | None = Field(default=None, ge=0.0, le=1.0)
    abort_min_tokens: int = Field(default=8, ge=1)
    goals: dict[str, Any] = Field(default_factory=dict)

    _ordered = field_validator("abstain")(_abstain_not_below_flag)


class ScopeRecipe(_Strict):
    """The scope gate: ``p(in scope) = sigmoid(w . x + b)`` on the model's final hidden
    state ``x`` (the LM head's input) at the last prompt token; in scope when
    ``p >= threshold``. Weights live in ``scope.npz``; ``training``/``evaluation`` say how
    it was fitted and what it measured."""

    feature: Literal["final_hidden_last_prompt_token"] = "final_hidden_last_prompt_token"
    hidden_size: int = Field(ge=1)
    threshold: float = Field(ge=0.0, le=1.0)
    training: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)


KnowledgeFeature = Literal["residual_last_prompt_token", "residual_max_prompt_token"]


class KnowledgeRecipe(_Strict):
    """The knowledge gate: ``prompt_risk``, the probability that the prompt asks about
    something the model does not know (an entity it has never seen), from the residual
    stream ``x`` after decoder layer ``layer`` (0-based): known before the first answer
    token. ``feature`` says where it is read: ``residual_last_prompt_token``,
    ``sigmoid(w . x + b)`` at the last prompt token; ``residual_max_prompt_token``,
    ``sigmoid(max over every prompt token t of w . x_t + b)`` (a token-level probe, so an
    unknown name anywhere in the prompt counts whatever wording follows it).
    ``flag``/``abstain`` are thresholds on it, applied like the answer's (only to prompts the
    scope gate judges). Weights live in ``knowledge.npz``."""

    feature: KnowledgeFeature = "residual_last_prompt_token"
    layer: int = Field(ge=0)
    hidden_size: int = Field(ge=1)
    flag: float = Field(ge=0.0, le=1.0)
    abstain: float = Field(ge=0.0, le=1.0)
    training: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)

    _ordered = field_validator("abstain")(_abstain_not_below_flag)


class ProbeManifest(BaseModel):
    """``manifest.json``: everything needed to trust, reproduce and serve a probe."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    name: str
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    model_id: str
    fingerprint: ModelFingerprint
    prompt: PromptRecipe = Field(default_factory=PromptRecipe)
    scoring: ScoringRecipe
    thresholds: Thresholds
    scope: ScopeRecipe | None = None  # None: every prompt is in scope (format 1 artifacts)
    knowledge: KnowledgeRecipe | None = None  # None: no prompt-level risk (before format 3)
    validation_risk_quantiles: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)  # file name -> sha256

    @field_validator("format_version")
    @classmethod
    def _supported(cls, version: int) -> int:
        if version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {version} is newer than this guard supports ({FORMAT_VERSION}); "
                "upgrade hallucination-guard"
            )
        return version


@dataclass(frozen=True)
class ProbeWeights:
    """The linear probe on CETT, in raw feature units (any scaling folded in).

    ``layers``, ``neurons``: ``[k]`` int64; ``weights``: ``[k]`` float64.
    """

    layers: np.ndarray
    neurons: np.ndarray
    weights: np.ndarray
    bias: float

    def __post_init__(self) -> None:
        k = self.weights.shape
        if self.layers.shape != k or self.neurons.shape != k or len(k) != 1:
            raise ProbeError(
                f"weights file shapes disagree: layers {self.layers.shape}, "
                f"neurons {self.neurons.shape}, weights {self.weights.shape}"
            )
        if not np.all(np.isfinite(self.weights)) or not math.isfinite(self.bias):
            raise ProbeError("weights file holds non-finite weights or bias")

    def by_layer(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``{layer: (neuron indices, weights)}`` for the layers with non-zero weight."""
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for layer in np.unique(self.layers[self.weights != 0]):
            keep = (self.layers == layer) & (self.weights != 0)
            out[int(layer)] = (self.neurons[keep], self.weights[keep])
        return out

    def to_npz(self, path: Path) -> None:
        np.savez(
            path,
            layers=self.layers.astype(np.int64),
            neurons=self.neurons.astype(np.int64),
            weights=self.weights.astype(np.float64),
            bias=np.float64(self.bias),
        )

    @classmethod
    def from_npz(cls, path: Path) -> ProbeWeights:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    layers=data["layers"].astype(np.int64),
                    neurons=data["neurons"].astype(np.int64),
                    weights=data["weights"].astype(np.float64),
                    bias=float(data["bias"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ProbeError(f"cannot read probe weights {path}: {exc}") from exc


@dataclass(frozen=True)
class GateWeights:
    """A prompt gate's logistic regression (the scope or the knowledge gate) in raw
    feature units: ``w`` ``[hidden]``, ``b``."""

    weights: np.ndarray
    bias: float

    def __post_init__(self) -> None:
        if self.weights.ndim != 1 or self.weights.size == 0:
            raise ProbeError(f"gate weights must be one vector, got shape {self.weights.shape}")
        if not np.all(np.isfinite(self.weights)) or not math.isfinite(self.bias):
            raise ProbeError("gate file holds non-finite weights or bias")

    def to_npz(self, path: Path) -> None:
        np.savez(path, weights=self.weights.astype(np.float64), bias=np.float64(self.bias))

    @classmethod
    def from_npz(cls, path: Path) -> GateWeights:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(weights=data["weights"].astype(np.float64), bias=float(data["bias"]))
        except (OSError, KeyError, ValueError) as exc:
            raise ProbeError(f"cannot read gate weights {path}: {exc}") from exc


@dataclass(frozen=True)
class Probe:
    """A verified probe artifact: manifest, weights, and where it came from."""

    manifest: ProbeManifest
    weights: ProbeWeights
    path: Path
    manifest_sha256: str
    scope: GateWeights | None = None  # present exactly when ``manifest.scope`` is
    knowledge: GateWeights | None = None  # present exactly when ``manifest.knowledge`` is

    @property
    def name(self) -> str:
        return self.manifest.name

    def verify_model(self, fingerprint: ModelFingerprint) -> None:
        """Refuse a model other than the one the probe was trained on."""
        expected = self.manifest.fingerprint
        if fingerprint != expected:
            diffs = [
                f"{key}: probe {getattr(expected, key)!r} vs model {getattr(fingerprint, key)!r}"
                for key in type(expected).model_fields
                if getattr(expected, key) != getattr(fingerprint, key)
            ]
            raise ProbeModelMismatchError(
                f"probe '{self.name}' ({self.path}) was trained on another model: "
                + "; ".join(diffs)
            )
        width, layers = fingerprint.mlp_width, fingerprint.num_layers
        w = self.weights
        if w.layers.size and (w.layers.max() >= layers or w.neurons.max() >= width):
            raise ProbeModelMismatchError(
                f"probe '{self.name}' indexes neurons beyond the model's {layers} x {width} MLP"
            )


def check_gate_width(probe: Probe, what: str, reads: int, hidden_size: int) -> None:
    """Refuse a gate that reads ``reads`` hidden units on a model of ``hidden_size``."""
    if hidden_size != reads:
        raise ProbeModelMismatchError(
            f"probe '{probe.name}': its {what} gate reads {reads} hidden units, the model has "
            f"{hidden_size}"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_probe(
    directory: str | Path,
    manifest: ProbeManifest,
    weights: ProbeWeights,
    extra_files: Mapping[str, bytes] | None = None,
    scope: GateWeights | None = None,
    knowledge: GateWeights | None = None,
) -> str:
    """Write the artifact; fills ``manifest.files`` with sha256s. Returns the manifest sha256.

    ``extra_files`` maps file names (e.g. ``report.json``, ``probe.joblib``, plots) to bytes.
    ``scope`` and ``knowledge`` (the gates' weights) go with ``manifest.scope`` and
    ``manifest.knowledge``: both or neither.
    """
    gates = {
        SCOPE_FILE: _checked_gate("scope", scope, manifest.scope),
        KNOWLEDGE_FILE: _checked_gate("knowledge", knowledge, manifest.knowledge),
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights.to_npz(out / WEIGHTS_FILE)
    reserved = (MANIFEST_FILE, WEIGHTS_FILE, *gates)
    for name, payload in (extra_files or {}).items():
        if "/" in name or name in reserved:
            raise ProbeError(f"invalid extra file name for a probe artifact: {name!r}")
        (out / name).write_bytes(payload)
    names = [WEIGHTS_FILE, *sorted(extra_files or {})]
    for name, gate in gates.items():
        if gate is not None:
            gate.to_npz(out / name)
            names.append(name)
    files = {name: sha256_file(out / name) for name in names}
    final = manifest.model_copy(update={"files": files})
    text = json.dumps(final.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    (out / MANIFEST_FILE).write_text(text, encoding="utf-8")
    return sha256_file(out / MANIFEST_FILE)


GateRecipe = ScopeRecipe | KnowledgeRecipe


def _checked_gate(
    what: str, gate: GateWeights | None, recipe: GateRecipe | None
) -> GateWeights | None:
    """A gate's weights go with its manifest recipe, as many as it reads."""
    if (gate is None) != (recipe is None):
        raise ProbeError(f"the {what} gate needs both its weights and the manifest's recipe")
    if gate is not None and recipe is not None and gate.weights.size != recipe.hidden_size:
        raise ProbeError(
            f"{what} weights have {gate.weights.size} values, the recipe says {recipe.hidden_size}"
        )
    return gate


def _load_gate(
    directory: Path, manifest: ProbeManifest, name: str, recipe: GateRecipe | None
) -> GateWeights | None:
    """A gate's verified weights when the manifest has its recipe."""
    if recipe is None:
        return None
    if name not in manifest.files:
        raise ProbeError(f"{directory / MANIFEST_FILE} has a gate recipe but does not list {name}")
    gate = GateWeights.from_npz(directory / name)
    if gate.weights.size != recipe.hidden_size:
        raise ProbeError(
            f"{directory / name} has {gate.weights.size} weights, the manifest's recipe says "
            f"{recipe.hidden_size}"
        )
    return gate


def resolve_probe_dir(spec: str | Path) -> Path:
    """A shipped probe's name (``default``, `guard.shipped`) is its directory inside the
    package; anything else is a directory."""
    shipped = shipped_probe(spec)
    return shipped.directory if shipped is not None else Path(spec).expanduser()


def load_probe(spec: str | Path = "default", *, expected_sha256: str | None = None) -> Probe:
    """Load and verify a probe: a shipped one by name (pinned in code) or a directory.

    Verifies the manifest against ``expected_sha256`` (or the shipped pin), every listed
    file against its sha256, and the weights' shapes. Never unpickles anything.
    """
    directory = resolve_probe_dir(spec)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ProbeError(
            f"no probe at {directory}: {MANIFEST_FILE} is missing "
            f"(train one with `hguard probes build`, or name a shipped probe: "
            f"{', '.join(SHIPPED_PROBES)})"
        )
    shipped = shipped_probe(spec)
    pin = expected_sha256 or (shipped.sha256 if shipped is not None else None)
    if shipped is not None and not pin:
        raise ProbeError(f"shipped probe '{spec}' has no pinned sha256: it is not shipped yet")
    manifest_sha = sha256_file(manifest_path)
    if pin and manifest_sha != pin.lower():
        raise ProbeIntegrityError(
            f"{manifest_path} has sha256 {manifest_sha}, expected {pin}: the manifest was "
            "edited or replaced; restore the original or update the pin"
        )
    try:
        manifest = ProbeManifest.model_validate_json(manifest_path.read_bytes())
    except ValidationError as exc:
        raise ProbeError(f"{manifest_path} is not a valid probe manifest: {exc}") from exc
    if WEIGHTS_FILE not in manifest.files:
        raise ProbeError(f"{manifest_path} does not list {WEIGHTS_FILE}")
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ProbeIntegrityError(f"probe file {path} listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ProbeIntegrityError(
                f"probe file {path} has sha256 {actual}, the manifest says {expected}: "
                "it was modified or truncated"
            )
    weights = ProbeWeights.from_npz(directory / WEIGHTS_FILE)
    scope = _load_gate(directory, manifest, SCOPE_FILE, manifest.scope)
    knowledge = _load_gate(directory, manifest, KNOWLEDGE_FILE, manifest.knowledge)
    return Probe(manifest, weights, directory, manifest_sha, scope, knowledge)


def load_sklearn_objects(spec: str | Path) -> Any:
    """Open ``probe.joblib`` for offline analysis. Unpickles: never call on untrusted input.

    The file is hash-verified through `load_probe` first; the runtime never calls this.
    """
    probe = load_probe(spec)
    if SKLEARN_FILE not in probe.manifest.files:
        raise ProbeError(f"probe {probe.path} ships no {SKLEARN_FILE}")
    import joblib  # local: only analysis code needs it

    return joblib.load(probe.path / SKLEARN_FILE)
