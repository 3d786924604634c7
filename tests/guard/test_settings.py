"""GuardSettings: GUARD_ environment variables, comma-separated keys, validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from guard.settings import GuardSettings, get_settings


def test_environment_is_read_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARD_API_KEYS", "alpha, beta,,gamma")
    monkeypatch.setenv("GUARD_MAX_BATCH", "8")
    monkeypatch.setenv("GUARD_BATCH_WAIT_MS", "2.5")
    monkeypatch.setenv("GUARD_AUDIT_LOG", "/tmp/audit.jsonl")
    monkeypatch.setenv("GUARD_ALLOW_UNGUARDED", "true")
    monkeypatch.setenv("GUARD_SERVED_MODEL_NAME", "smol")
    settings = GuardSettings()
    assert settings.api_keys == ["alpha", "beta", "gamma"]
    assert settings.max_batch == 8
    assert settings.batch_wait_ms == 2.5
    assert settings.audit_log == Path("/tmp/audit.jsonl")
    assert settings.allow_unguarded is True
    assert settings.served_model_name == "smol"


def test_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GUARD_API_KEYS", "GUARD_MODEL", "GUARD_PROBE"):
        monkeypatch.delenv(name, raising=False)
    settings = GuardSettings(model="smollm2", probe="/probes/x")
    assert (settings.model, settings.probe, settings.api_keys) == ("smollm2", "/probes/x", [])
    assert GuardSettings().model is None  # the probe's own model
    assert GuardSettings(api_keys="").api_keys == []


def test_every_documented_variable_exists() -> None:
    """Each variable in the README's settings table is a setting, and each setting is there."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Settings (`GUARD_*` environment variables)", 1)[1].split("\n## ", 1)[0]
    documented = {name.lower() for name in re.findall(r"`GUARD_([A-Z0-9_]+)`", table)}
    assert documented == set(GuardSettings.model_fields)


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        GuardSettings(flag_threshold=1.5)
    with pytest.raises(ValidationError, match="GUARD_ABSTAIN_THRESHOLD"):
        GuardSettings(flag_threshold=0.8, abstain_threshold=0.5)
    with pytest.raises(ValidationError, match="GUARD_PROMPT_ABSTAIN_THRESHOLD"):
        GuardSettings(prompt_flag_threshold=0.8, prompt_abstain_threshold=0.5)
    monkeypatch.setenv("GUARD_MAX_BATCH", "0")
    with pytest.raises(ValidationError):
        GuardSettings()


def test_get_settings_is_built_lazily_once(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    monkeypatch.setenv("GUARD_QUEUE_SIZE", "7")
    try:
        assert get_settings().queue_size == 7
        assert get_settings() is get_settings()
    finally:
        get_settings.cache_clear()
