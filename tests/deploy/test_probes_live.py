"""The health checks the image and the Deployment declare, run against a running guard."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.deploy.helpers import K8S_DIR, load_yaml_all
from tests.deploy.live import tiny_app
from tests.deploy.test_dockerfile import final_stage
from tests.fixtures.servers import serve_in_thread

pytestmark = pytest.mark.timeout(120)


def test_image_healthcheck_and_pod_probes_pass_on_a_running_guard(tmp_path: Path) -> None:
    healthcheck = dict(final_stage())["HEALTHCHECK"]
    command = json.loads(re.search(r"CMD (\[.*\])", healthcheck).group(1))  # type: ignore[union-attr]
    (deployment,) = load_yaml_all(K8S_DIR / "deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    with serve_in_thread(tiny_app(tmp_path / "probe")) as base:
        port = base.rsplit(":", 1)[1]
        assert command[0] == "python"
        exec_form = [sys.executable, *command[1:]]
        exec_form[-1] = exec_form[-1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        done = subprocess.run(exec_form, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert httpx.get(base + path, timeout=5).status_code == 200, probe
    # and the healthcheck fails once nothing listens there
    done = subprocess.run(exec_form, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
