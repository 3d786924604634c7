"""Probe artifacts: round trip, and every kind of tampering or mismatch is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from guard.errors import ProbeError, ProbeIntegrityError, ProbeModelMismatchError
from guard.model import fingerprint_model
from guard.probe import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    IsotonicCalibrator,
    PromptRecipe,
    Thresholds,
    load_probe,
    sha256_file,
)
from tests.fixtures.models import tiny_model
from tests.fixtures.probes import write_probe


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    return write_probe(tmp_path / "probe", tiny_model("llama"), seed=0)


def test_round_trip_and_fingerprint(probe_dir: Path) -> None:
    sha = sha256_file(probe_dir / MANIFEST_FILE)
    probe = load_probe(probe_dir, expected_sha256=sha)
    assert probe.manifest_sha256 == sha
    assert set(probe.weights.by_layer()) == {0, 1}
    probe.verify_model(fingerprint_model(tiny_model("llama")))


def test_other_model_is_refused(probe_dir: Path) -> None:
    probe = load_probe(probe_dir)
    with pytest.raises(ProbeModelMismatchError, match="down_proj_sha256"):
        probe.verify_model(fingerprint_model(tiny_model("llama", seed=1)))
    with pytest.raises(ProbeModelMismatchError, match="architecture"):
        probe.verify_model(fingerprint_model(tiny_model("gpt2")))


def test_tampered_weights_are_refused(probe_dir: Path) -> None:
    path = probe_dir / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-7] + b"\x00" * 7)
    with pytest.raises(ProbeIntegrityError, match="modified or truncated"):
        load_probe(probe_dir)


def test_truncated_or_missing_files_are_refused(probe_dir: Path) -> None:
    (probe_dir / "report.json").unlink()
    with pytest.raises(ProbeIntegrityError, match="missing"):
        load_probe(probe_dir)
    (probe_dir / MANIFEST_FILE).write_text('{"name": ', encoding="utf-8")
    with pytest.raises(ProbeError, match="not a valid probe manifest"):
        load_probe(probe_dir)
    with pytest.raises(ProbeError, match="manifest.json is missing"):
        load_probe(probe_dir.parent / "nowhere")


def test_edited_manifest_fails_the_pin(probe_dir: Path) -> None:
    sha = sha256_file(probe_dir / MANIFEST_FILE)
    manifest = json.loads((probe_dir / MANIFEST_FILE).read_text())
    manifest["thresholds"]["abstain"] = 0.99
    (probe_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ProbeIntegrityError, match="edited or replaced"):
        load_probe(probe_dir, expected_sha256=sha)
    assert load_probe(probe_dir).manifest.thresholds.abstain == 0.99  # no pin: loads


def test_schema_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="below the flag"):
        Thresholds(flag=0.9, abstain=0.5)
    with pytest.raises(ValueError, match="same length"):
        IsotonicCalibrator(x=[0.0, 1.0], y=[0.5])
    calibrator = IsotonicCalibrator(x=[0.0, 1.0], y=[0.2, 0.6])
    np.testing.assert_allclose(calibrator(np.array([-1.0, 0.5, 2.0])), [0.2, 0.4, 0.6])
    messages = PromptRecipe().messages(" Who wrote Hamlet? ")
    assert messages == [{"role": "user", "content": "Who wrote Hamlet? Answer in a few words."}]
