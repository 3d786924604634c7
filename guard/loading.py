"""The one loader: settings to a verified, configured `GuardedModel`.

Every entry point that serves or scores (``hguard serve``, ``hguard score``, the benches)
comes through here, so the model spec default, the probe checks and the settings'
overrides are applied in one place, once.

    guarded = load_guarded(GuardSettings(probe="default"))
    guarded = configured(loaded, probe, settings)   # pieces already loaded (tests)
"""

from __future__ import annotations

import logging

from guard.errors import ProbeError
from guard.fingerprint import ModelFingerprint
from guard.generation import GuardedModel
from guard.model import DEFAULT_MODEL_SPEC, LoadedModel, load_model
from guard.probe import Probe, load_probe
from guard.settings import GuardSettings
from guard.shipped import probe_for_model

log = logging.getLogger(__name__)


def model_spec_of(probe: Probe | None) -> str:
    """The model spec a probe was trained on (the embedded model without a probe)."""
    training = probe.manifest.training if probe is not None else {}
    return str(training.get("model_spec", DEFAULT_MODEL_SPEC))


def probe_spec(settings: GuardSettings) -> str:
    """The probe to load: the one named, else the shipped probe of the named model."""
    return settings.probe or probe_for_model(settings.model)


def load_guarded(settings: GuardSettings) -> GuardedModel:
    """Model and verified probe from settings; unguarded only when explicitly allowed."""
    probe = settings_probe(settings)
    spec = settings.model or model_spec_of(probe)
    log.info("loading model %s", spec)
    loaded = load_model(spec)
    try:
        return configured(loaded, probe, settings)
    except ProbeError as exc:
        _refuse_or_warn(settings, exc)
        return GuardedModel(loaded, None)


def settings_probe(settings: GuardSettings) -> Probe | None:
    """The settings' probe, hashes verified; None (unguarded) only when explicitly allowed."""
    try:
        return load_probe(probe_spec(settings), expected_sha256=settings.probe_sha256)
    except ProbeError as exc:
        _refuse_or_warn(settings, exc)
        return None


def verified_probe(
    settings: GuardSettings, probe: Probe | None, fingerprint: ModelFingerprint
) -> Probe | None:
    """``probe`` if it was trained on the model with ``fingerprint`` (engines that hold no
    transformers model: vLLM); else refuse, or warn and serve unguarded when allowed."""
    if probe is None:
        return None
    try:
        probe.verify_model(fingerprint)
    except ProbeError as exc:
        _refuse_or_warn(settings, exc)
        return None
    return probe


def configured(loaded: LoadedModel, probe: Probe | None, settings: GuardSettings) -> GuardedModel:
    """The guarded model with the settings' threshold and scope-gate overrides."""
    return GuardedModel(
        loaded, probe, overrides=settings, scope_gate=settings.scope_gate,
        scope_threshold=settings.scope_threshold,
    )  # fmt: skip


def _refuse_or_warn(settings: GuardSettings, exc: ProbeError) -> None:
    if not settings.allow_unguarded:
        raise type(exc)(
            f"{exc} -- refusing to serve without a valid probe: fix GUARD_PROBE "
            "(or --probe), or set GUARD_ALLOW_UNGUARDED=true to serve unguarded"
        ) from exc
    log.warning("serving UNGUARDED (GUARD_ALLOW_UNGUARDED): %s", exc)
