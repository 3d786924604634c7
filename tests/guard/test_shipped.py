"""Shipped probes by name: each pinned, `default` stays SmolLM2, a model picks its own."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from guard.cli import _model_and_probe, build_parser
from guard.errors import ProbeError, ProbeIntegrityError
from guard.loading import probe_spec
from guard.model import DEFAULT_MODEL_SPEC, GEMMA3_SPEC
from guard.probe import DEFAULT_PROBE_SHA256, MANIFEST_FILE, load_probe
from guard.settings import GuardSettings
from guard.shipped import SHIPPED_PROBES, probe_for_model, shipped_probe

GEMMA_PROBE = SHIPPED_PROBES["gemma3-270m-triviaqa"]


def test_every_shipped_probe_is_pinned_and_names_its_model() -> None:
    for name, shipped in SHIPPED_PROBES.items():
        if not shipped.sha256:  # registered, not shipped yet: refused by name
            with pytest.raises(ProbeError, match="not shipped yet|manifest.json is missing"):
                load_probe(name)
            continue
        probe = load_probe(name)
        assert probe.manifest_sha256 == shipped.sha256, name
        assert probe.path == shipped.directory
        assert probe.manifest.training["model_spec"] == shipped.model_spec()
        # the model's probe is this one (SmolLM2's under its alias, `default`)
        assert SHIPPED_PROBES[probe_for_model(shipped.model_spec())] == shipped
    assert load_probe("smollm2-135m-triviaqa").manifest_sha256 == DEFAULT_PROBE_SHA256


def test_a_model_picks_its_probe_and_default_stays_smollm2() -> None:
    assert probe_for_model(None) == probe_for_model(DEFAULT_MODEL_SPEC) == "default"
    assert probe_for_model("/models/elsewhere") == "default"
    assert probe_spec(GuardSettings()) == "default"
    assert probe_spec(GuardSettings(model=GEMMA3_SPEC, probe="default")) == "default"
    assert GuardSettings(probe=" ").probe is None
    args = build_parser().parse_args(["score", "--question", "q", "--answer", "a"])
    assert probe_spec(GuardSettings(**_model_and_probe(args))) == "default"
    args = build_parser().parse_args(["probes", "evaluate", "--probe", "gemma3-270m-triviaqa",
                                      "--dataset", "x.jsonl", "--out", "r.json"])  # fmt: skip
    assert shipped_probe(args.probe) is SHIPPED_PROBES["gemma3-270m-triviaqa"]


def test_gemma_gets_its_shipped_probe() -> None:
    """`serve --model gemma3-270m` picks the Gemma probe (its manifest names the spec), the
    name loads it, and `default` stays SmolLM2's."""
    assert GEMMA_PROBE.sha256 and GEMMA_PROBE.model_spec() == GEMMA3_SPEC
    assert probe_for_model(GEMMA3_SPEC) == GEMMA_PROBE.name
    args = build_parser().parse_args(["serve", "--model", GEMMA3_SPEC])
    assert probe_spec(GuardSettings(**_model_and_probe(args))) == GEMMA_PROBE.name
    probe = load_probe(GEMMA_PROBE.name)
    assert probe.manifest_sha256 == GEMMA_PROBE.sha256
    assert probe.manifest.prompt.style == "completion"
    assert load_probe("default").manifest_sha256 == DEFAULT_PROBE_SHA256


def test_an_edited_shipped_manifest_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = SHIPPED_PROBES["default"]
    copy = tmp_path / "probe"
    shutil.copytree(shipped.directory, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["thresholds"]["flag"] = 0.0
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    monkeypatch.setitem(SHIPPED_PROBES, "smollm2-135m-triviaqa", replace(shipped, directory=copy))
    with pytest.raises(ProbeIntegrityError, match="edited or replaced"):
        load_probe("smollm2-135m-triviaqa")
