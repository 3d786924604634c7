"""The soak bench, short: 300 mixed requests against an `hguard serve` subprocess on the tiny
model; zero errors, flat memory, decisions in the metrics match the answers, clean exit.

The full run (`bench/soak.py --requests 2000`, the real model) writes bench/results/soak.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fixtures.servers import REPO, server_env


def test_short_soak(tiny_model_dir: Path, disk_probe: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    command = [sys.executable, str(REPO / "bench" / "soak.py"), "--requests", "300",
               "--model", str(tiny_model_dir), "--probe", str(disk_probe), "--max-tokens", "6",
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, env=server_env(), cwd=REPO, capture_output=True, timeout=900)
    assert out.exists(), done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    report = json.loads(out.read_text())
    assert report["requests"] == 300 and report["errors"] == 0, report["error_samples"]
    assert report["rss_growth"] < 0.10, report["rss_series"]
    assert report["metrics_match"] and report["exit_code"] == 0
    assert set(report["kinds"]) == {"chat", "chat-stream", "text", "text-stream", "score"}
    assert done.returncode == 0 and report["passed"]
