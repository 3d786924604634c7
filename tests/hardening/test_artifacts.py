"""Probe artifacts: `hguard serve` refuses a missing, truncated, tampered or wrong-model probe
with a clear message and a non-zero exit, within seconds; unguarded serving happens only when
GUARD_ALLOW_UNGUARDED=true, and then /readyz, every response and the metrics say so."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from guard.probe import MANIFEST_FILE, WEIGHTS_FILE
from tests.fixtures.models import save_tiny_model
from tests.fixtures.probes import write_probe
from tests.fixtures.servers import hguard_serve, running, sse_events
from tests.hardening.conftest import ProbeFactory
from tests.hardening.helpers import sample

SERVED = "tiny"
START_LIMIT_S = 180.0  # generous: CI machines share 2 cores; unloaded it takes ~5-10 s


def _missing(probe: Path) -> Path:
    return probe.parent / "no-such-probe"


def _manifest_deleted(probe: Path) -> Path:
    (probe / MANIFEST_FILE).unlink()
    return probe


def _manifest_truncated(probe: Path) -> Path:
    manifest = probe / MANIFEST_FILE
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    return probe


def _weights_truncated(probe: Path) -> Path:
    weights = probe / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    return probe


def _weights_tampered(probe: Path) -> Path:
    weights = probe / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return probe


def _weights_missing(probe: Path) -> Path:
    (probe / WEIGHTS_FILE).unlink()
    return probe


def _threshold_edited(probe: Path) -> Path:
    """An edited manifest is still self-consistent; only the pin (GUARD_PROBE_SHA256) sees it."""
    manifest = probe / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    data["thresholds"]["abstain"] = 1.0
    manifest.write_text(json.dumps(data))
    return probe


Breakage = Callable[[Path], Path]
BREAKAGES: dict[str, tuple[Breakage, tuple[str, ...]]] = {
    "missing": (_missing, ("no probe at", "manifest.json is missing")),
    "manifest deleted": (_manifest_deleted, ("manifest.json is missing",)),
    "manifest truncated": (_manifest_truncated, ("not a valid probe manifest",)),
    "weights truncated": (_weights_truncated, ("sha256", "modified or truncated")),
    "weights tampered": (_weights_tampered, ("sha256", "modified or truncated")),
    "weights missing": (_weights_missing, ("is missing",)),
    "manifest edited, pinned": (_threshold_edited, ("expected", "edited or replaced")),
}


def _refusal(model_dir: Path, probe: Path, tmp_path: Path, **settings: str) -> str:
    """Run `hguard serve`; assert it exits non-zero within the limit; its output."""
    server = hguard_serve(model_dir, probe, tmp_path / "serve.log", served_model_name=SERVED,
                          **settings)  # fmt: skip
    with running(server):
        started = time.monotonic()
        code = server.proc.wait(START_LIMIT_S)
        elapsed = time.monotonic() - started
        output = server.log_text()
        assert code != 0, output
        assert elapsed < START_LIMIT_S
        assert "refusing to serve without a valid probe" in output
        assert "GUARD_ALLOW_UNGUARDED" in output  # says how to override
        assert "Traceback" not in output  # a clear message, not a crash
        with pytest.raises(httpx.TransportError):  # it never listened
            httpx.get(f"{server.base_url}/healthz", timeout=1)
    return output


@pytest.mark.parametrize("breakage", list(BREAKAGES), ids=list(BREAKAGES))
def test_broken_probe_refuses_to_start(
    breakage: str, tiny_model_dir: Path, probe_for: ProbeFactory, tmp_path: Path
) -> None:
    probe = probe_for()
    pin = {}
    if breakage == "manifest edited, pinned":
        from guard.probe import sha256_file

        pin = {"probe_sha256": sha256_file(probe / MANIFEST_FILE)}
    damage, words = BREAKAGES[breakage]
    output = _refusal(tiny_model_dir, damage(probe), tmp_path, **pin)
    for word in words:
        assert word in output, f"{word!r} not in:\n{output}"


def test_probe_of_another_model_refuses_to_start(tiny_model_dir: Path, tmp_path: Path) -> None:
    from guard.model import load_model

    other = load_model(str(save_tiny_model(tmp_path / "other-model", seed=1)))
    probe = write_probe(tmp_path / "other-probe", other)
    output = _refusal(tiny_model_dir, probe, tmp_path)
    assert "fingerprint" in output.lower() or "another model" in output.lower(), output


def test_unguarded_only_when_allowed_and_then_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-probe"
    server = hguard_serve(
        tiny_model_dir, missing, tmp_path / "serve.log", served_model_name=SERVED,
        allow_unguarded="true", max_new_tokens=4,
    )  # fmt: skip
    with running(server):
        server.wait_ready()
        url = server.base_url
        ready = httpx.get(f"{url}/readyz", timeout=10).json()
        assert ready["guarded"] is False and ready["probe"] is None
        chat = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        response = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30)
        guard = response.json()["guard"]
        assert response.status_code == 200 and guard["guarded"] is False and guard["risk"] is None
        assert guard["decision"] == "pass" and response.headers["x-guard-risk"] == "none"
        text = {"model": SERVED, "prompt": "hi", "max_tokens": 3}
        assert (
            httpx.post(f"{url}/v1/completions", json=text, timeout=30).json()["guard"]["guarded"]
            is False
        )
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}, timeout=30
        ) as stream:
            chunks = list(sse_events(stream.iter_lines()))
        assert chunks and all(c["guard"]["guarded"] is False for c in chunks)
        score = httpx.post(
            f"{url}/v1/guard/score", json={"question": "q", "answer": "a"}, timeout=30
        ).json()
        assert score["guard"]["guarded"] is False
        metrics = server.metrics()
        assert sample(metrics, "hguard_build_info", {"guarded": "false"}) == 1.0
        assert sample(metrics, "hguard_build_info", {"guarded": "true"}) is None
        assert "UNGUARDED" in server.log_text()


def test_valid_probe_serves_guarded(tiny_model_dir: Path, disk_probe: Path, tmp_path: Path) -> None:
    """The control: the same command with an intact probe starts and says guarded."""
    server = hguard_serve(tiny_model_dir, disk_probe, tmp_path / "serve.log",
                          served_model_name=SERVED)  # fmt: skip
    with running(server):
        server.wait_ready()
        assert httpx.get(f"{server.base_url}/readyz", timeout=10).json()["guarded"] is True
        assert sample(server.metrics(), "hguard_build_info", {"guarded": "true"}) == 1.0


def test_cli_copy_of_probe_is_fine(tiny_model_dir: Path, disk_probe: Path, tmp_path: Path) -> None:
    """Copying an artifact (e.g. into an image) keeps it valid: hashes, not paths."""
    copy = Path(shutil.copytree(disk_probe, tmp_path / "copied"))
    from guard.probe import load_probe

    assert load_probe(copy).manifest_sha256 == load_probe(disk_probe).manifest_sha256
