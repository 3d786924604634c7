"""deploy/Dockerfile, linted by hadolint and checked structurally (no Docker engine here,
so the image is not built)."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

from tests.deploy.helpers import DEPLOY, REPO, run, tool

DOCKERFILE = DEPLOY / "Dockerfile"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            joined.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    start = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[start:]


def makefile_pin(variable: str) -> str:
    match = re.search(rf"^{variable}\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert match, f"Makefile defines no {variable}"
    return match.group(1)


def test_hadolint_finds_nothing() -> None:
    run([tool("hadolint"), "--no-color", str(DOCKERFILE)])


def test_runtime_image_is_python_slim_and_runs_as_a_non_root_user() -> None:
    stage = final_stage()
    assert stage[0] == ("FROM", "python:3.11-slim")
    users = [args for op, args in stage if op == "USER"]
    assert users, "the runtime stage never switches away from root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_torch_comes_from_the_cpu_index_at_the_makefile_pin() -> None:
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    torch_pin = makefile_pin("TORCH")
    assert re.search(rf"--index-url {re.escape(CPU_INDEX)} {re.escape(torch_pin)}\b", runs)
    for op, args in instructions():
        assert "cuda" not in args.lower() and "nvidia" not in args.lower(), f"{op} {args}"
        if op == "RUN" and "torch" in args:
            assert CPU_INDEX in args, f"torch installed from another index: {args}"


def test_model_package_is_baked_in_without_its_dependencies() -> None:
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    assert f"--no-deps {makefile_pin('SMOLLM')}" in runs


def test_healthcheck_probes_healthz_on_the_served_port() -> None:
    stage = dict(final_stage())
    assert "/healthz" in stage["HEALTHCHECK"]
    command = shlex.split(stage["CMD"].replace("[", "").replace("]", "").replace(",", " "))
    assert command[:2] == ["hguard", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    port = command[command.index("--port") + 1]
    assert f"127.0.0.1:{port}/healthz" in stage["HEALTHCHECK"]
    assert stage["EXPOSE"] == port


def test_everything_copied_exists_and_is_not_ignored() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p for p in ignore if p and not p.startswith("#")]
    for op, args in instructions():
        if op != "COPY" or args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repo"
            included = False
            for pattern in patterns:  # last match wins, as in .dockerignore
                negated = pattern.startswith("!")
                if fnmatch.fnmatch(source, pattern.lstrip("!").rstrip("/")):
                    included = negated
            assert included, f"COPY {source} is excluded by Dockerfile.dockerignore"


def test_the_lock_file_the_image_installs_with_cannot_bring_cuda() -> None:
    # `pip install -c requirements.lock .` runs after torch+cpu is in place: the lock must
    # not pin torch (or its CUDA wheels) again, or pip would replace the CPU build.
    pins = (REPO / "requirements.lock").read_text().lower().splitlines()
    offending = [p for p in pins if re.match(r"(torch|triton|nvidia-)", p)]
    assert offending == []
