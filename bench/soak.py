"""Soak: thousands of mixed requests against a real `hguard serve` subprocess.

Chat and text completions, streamed and not, and guard scoring, at concurrency that changes
every block of requests. Passes with zero errors and server RSS growth under 10% from
request 200 to the end. Writes a JSON report.

    python bench/soak.py --requests 2000 --out bench/results/soak.json
    .venv-vllm/bin/python bench/soak.py --engine vllm --requests 1000 --out ...soak_vllm.json
    python bench/soak.py --requests 300 --model ./tiny-model --probe ./tiny-probe --out /tmp/s.json

``--probe random`` writes a probe with random weights for the model (the serving path is
exercised exactly as with a trained probe; for soaking before a trained one exists).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from guard.model import DEFAULT_MODEL_SPEC

SERVED = "soak"
KINDS = ("chat", "chat-stream", "text", "text-stream", "chat", "chat-stream", "text", "score")
CONCURRENCY = (1, 8, 4, 16, 2, 12)
BLOCK = 100
RSS_FROM = 200
GROWTH_LIMIT = 0.10
QUESTIONS = (
    "What is the capital of France?", "Who wrote Hamlet?", "How many legs does a spider have?",
    "What is the boiling point of water in Fahrenheit?", "Which planet is known as the Red "
    "Planet?", "Who painted the Mona Lisa?", "What is the largest ocean on Earth?",
    "In which year did the Berlin Wall fall?", "What gas do plants absorb?",
    "Who discovered penicillin?",
)  # fmt: skip


def random_probe(model_spec: str, directory: Path) -> Path:
    """A probe with random weights on a few neurons of every layer of ``model_spec``."""
    import numpy as np

    from guard.model import load_model
    from guard.probe import (
        PlattCalibrator,
        ProbeManifest,
        ProbeWeights,
        ScoringRecipe,
        Thresholds,
        save_probe,
    )  # fmt: skip

    loaded = load_model(model_spec)
    fingerprint = loaded.fingerprint
    rng = np.random.default_rng(0)
    per_layer = 8
    layers = np.repeat(np.arange(fingerprint.num_layers), per_layer).astype(np.int64)
    neurons = rng.integers(0, fingerprint.mlp_width, size=layers.size).astype(np.int64)
    weights = ProbeWeights(layers, neurons, rng.normal(size=layers.size) * 20, 0.0)
    manifest = ProbeManifest(
        name="soak-random", model_id=loaded.model_id, fingerprint=fingerprint,
        scoring=ScoringRecipe(calibrator=PlattCalibrator(a=1.0, b=0.0)),
        thresholds=Thresholds(flag=0.5, abstain=0.8),
        validation_risk_quantiles={"0.5": 0.5}, training={"model_spec": model_spec},
    )  # fmt: skip
    save_probe(directory, manifest, weights)
    return directory


@dataclass
class Tally:
    """Outcomes, shared by the worker threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    done: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, seconds: float, decision: str | None, error: str | None) -> None:
        with self.lock:
            self.done += 1
            self.kinds[kind] += 1
            self.latencies.append(seconds)
            if error is not None:
                self.errors += 1
                if len(self.error_samples) < 10:
                    self.error_samples.append(f"{kind}: {error}")
            elif decision is not None:
                self.decisions[decision] += 1


def one_request(client: httpx.Client, i: int, max_tokens: int, tally: Tally) -> None:
    kind = KINDS[i % len(KINDS)]
    question = QUESTIONS[i % len(QUESTIONS)]
    started = time.perf_counter()
    decision, error = None, None
    try:
        decision = _send(client, kind, question, max_tokens, i)
    except Exception as exc:  # counted as an error of the soak, with a sample
        error = f"{type(exc).__name__}: {exc}"[:300]
    tally.record(kind, time.perf_counter() - started, decision, error)


def _send(client: httpx.Client, kind: str, question: str, max_tokens: int, i: int) -> str:
    common: dict[str, Any] = {"model": SERVED, "max_tokens": max_tokens,
                              "temperature": 0 if i % 2 else 0.8, "seed": i}  # fmt: skip
    if kind == "score":
        response = client.post("/v1/guard/score", json={"question": question, "answer": "Paris"})
        return _checked(response)["guard"]["decision"]
    path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
    if kind.startswith("chat"):
        body = {**common, "messages": [{"role": "user", "content": question}]}
    else:
        body = {**common, "prompt": f"Question: {question}\nAnswer:"}
    if not kind.endswith("stream"):
        return _checked(client.post(path, json=body))["guard"]["decision"]
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            response.read()
            _checked(response)
        final, done = None, False
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"error event: {chunk['error']}")
                if chunk.get("choices") and chunk["choices"][0]["finish_reason"]:
                    final = chunk
        if not done or final is None:
            raise RuntimeError("stream ended without a verdict and [DONE]")
        return str(final["guard"]["decision"])


def _checked(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    body: dict[str, Any] = response.json()
    return body


def start_server(
    args: argparse.Namespace, probe: str, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", GUARD_SERVED_MODEL_NAME=SERVED,
               GUARD_MAX_NEW_TOKENS=str(args.max_tokens), GUARD_QUEUE_SIZE="1024")  # fmt: skip
    command = [sys.executable, "-m", "guard.cli", "serve", "--model", args.model, "--probe", probe,
               "--engine", args.engine, "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"hguard serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"hguard serve not ready in {args.start_timeout} s")


def rss_by_process(proc: subprocess.Popen[bytes]) -> dict[str, float]:
    """Resident MiB of the server (``server``) and of each child by its name (vLLM's engine
    core and worker run in their own processes)."""
    server = psutil.Process(proc.pid)
    out: dict[str, float] = {}
    for process in [server, *server.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            name = "server" if process.pid == proc.pid else f"{process.name()}-{process.pid}"
            out[name] = round(process.memory_info().rss / 2**20, 1)
    return out


def rss_mb(proc: subprocess.Popen[bytes]) -> float:
    """Resident MiB of the server and all its children."""
    return round(sum(rss_by_process(proc).values()), 1)


def run_load(url: str, proc: subprocess.Popen[bytes], args: argparse.Namespace) -> dict[str, Any]:
    tally = Tally()
    rss_series: list[tuple[int, float]] = []
    by_process: list[tuple[int, dict[str, float]]] = []
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=args.request_timeout,
                      limits=httpx.Limits(max_connections=64)) as client:  # fmt: skip
        for block, first in enumerate(range(0, args.requests, BLOCK)):
            concurrency = CONCURRENCY[block % len(CONCURRENCY)]
            indices = range(first, min(first + BLOCK, args.requests))
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(lambda i: one_request(client, i, args.max_tokens, tally), indices))
            rss_series.append((tally.done, rss_mb(proc)))
            by_process.append((tally.done, rss_by_process(proc)))
            done, mb = rss_series[-1]
            print(f"{done}/{args.requests} requests, {tally.errors} errors, RSS {mb} MiB, "
                  f"concurrency {concurrency}", flush=True)  # fmt: skip
        metrics = client.get("/metrics").text
    elapsed = time.perf_counter() - started
    at_200 = next(mb for done, mb in rss_series if done >= min(RSS_FROM, args.requests))
    end = rss_series[-1][1]
    latencies = sorted(tally.latencies)
    return {
        "requests": tally.done, "errors": tally.errors, "error_samples": tally.error_samples,
        "rss_mb_at_200": at_200, "rss_mb_end": end, "rss_growth": round((end - at_200) / at_200, 4),
        "rss_mb_max": max(mb for _, mb in rss_series), "rss_series": rss_series,
        "rss_by_process": by_process,
        "duration_s": round(elapsed, 1), "requests_per_s": round(tally.done / elapsed, 2),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "kinds": dict(tally.kinds), "decisions": dict(tally.decisions),
        "decisions_in_metrics": _decisions(metrics),
    }  # fmt: skip


def _decisions(metrics: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        s.labels["decision"]: s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "hguard_decisions_total"
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL_SPEC, help="model spec for hguard serve")
    parser.add_argument("--probe", default="default", help="probe dir, 'default' or 'random'")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                        help="vllm: run in .venv-vllm")  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        probe = args.probe
        if probe == "random":
            probe = str(random_probe(args.model, Path(tmp) / "probe"))
        log = Path(tmp) / "serve.log"
        proc, url = start_server(args, probe, log)
        try:
            report = run_load(url, proc, args)
            proc.send_signal(signal.SIGTERM)
            report["exit_code"] = proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    answered = sum(report["decisions"].values())
    report.update(
        model=args.model, probe=args.probe, engine=args.engine, max_tokens=args.max_tokens,
        concurrency_levels=list(CONCURRENCY), block=BLOCK, cpus=os.cpu_count(),
        metrics_match=sum(report["decisions_in_metrics"].values()) == answered,
        passed=report["errors"] == 0 and report["rss_growth"] < GROWTH_LIMIT
        and report["exit_code"] == 0,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    series = ("rss_series", "rss_by_process")
    print(json.dumps({k: v for k, v in report.items() if k not in series}, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
