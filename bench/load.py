"""Server load: single-client vs concurrent streaming throughput of `hguard serve`, and the
engine's own batch limit on the same work.

Starts the server (real model, probe: ``--probe``, else the shipped one, else a synthetic
stand-in), sends the requests one at a time from one client (single-client tokens/s), then
the same requests (total, not per client) from ``--clients`` concurrent streaming clients
on loopback, same prompts and ``max_tokens``, greedy. The engine also decodes the same
prompts unguarded, in fixed batches of ``--clients`` (in order), in this process, before
the server starts and after it stops (the mean counts: a shared machine's speed drifts):
``batch_limit_tps``, what the engine does at that batch size with no HTTP, no guard and
no one arriving late (each batch prefilled in one pass, the shared prompt prefix kept as
the server keeps it); ``batch_limit_ratio`` = aggregate / that.
``batch_limit_plain_tps``: the same with every batch on its own (as ``model.generate``).

    python bench/load.py --clients 16 --requests 64 --out bench/results/load.json
    .venv-vllm/bin/python bench/load.py --engine vllm --out bench/results/load_vllm.json

``--engine vllm`` serves through vLLM (``hguard serve --engine vllm``) in vLLM's own process
layout and, in the same run, with vLLM in the server's process (``"in_process"``) and
through the transformers engine for comparison (``"transformers"``).

Writes ``{"single_client_tps", "aggregate_tps", "speedup", "batch_limit_tps",
"batch_limit_ratio", "batch_limit_plain_tps", "errors", "ttft_p50_s", "ttft_p99_s",
"batch_limit_burst_ttft_s", ...}`` (TTFT percentiles of the concurrent phase; the burst
figure: how long the engine alone, unguarded, takes to give ``--clients`` prompts added
together their first tokens, the floor of the opening burst's TTFT) and the load average
before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from overhead import questions, synthetic_probe  # bench/ is on sys.path as the script's dir

from guard.decoding import GenerationRequest, SamplingParams, TokenEvent
from guard.generation import CollectingSink, GuardedModel
from guard.model import DEFAULT_MODEL_SPEC, load_model

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    ok: bool
    tokens: int
    ttft_s: float | None
    seconds: float
    first: bool = False  # a client's first request: all clients send theirs at once


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_probe(spec: str | None, model: str, work: Path) -> str:
    """A probe directory the server will accept for ``model``."""
    if spec is not None:
        return spec
    from guard.errors import ProbeError
    from guard.model import load_model
    from guard.probe import load_probe

    try:
        load_probe("default")
        return "default"
    except ProbeError:
        loaded = load_model(model)
        synthetic_probe(loaded, work / "synthetic_probe")
        return str(work / "synthetic_probe")


def start_server(
    port: int, model: str, probe: str, env: dict[str, str], engine: str = "transformers"
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "guard.cli", "serve", "--port", str(port),
               "--model", model, "--probe", probe, "--engine", engine]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})


def wait_ready(base: str, process: subprocess.Popen[bytes], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready in time")


async def one_request(
    client: httpx.AsyncClient, model: str, question: str, max_tokens: int
) -> Outcome:
    """One streamed chat completion; tokens counted from the usage chunk."""
    body = {
        "model": model, "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    started = time.perf_counter()
    ttft, tokens, done, failed = None, 0, False, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Outcome(False, 0, None, time.perf_counter() - started)
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                # The clients share the server's cores: parse only the chunks that matter
                # (the first with a scored token, errors, the usage chunk).
                if ttft is None and '"tokens":[{' in data:
                    ttft = time.perf_counter() - started
                if '"usage":{' in data or '"error"' in data:
                    chunk = json.loads(data)
                    failed |= "error" in chunk
                    if chunk.get("usage"):
                        tokens = int(chunk["usage"]["completion_tokens"])
    except httpx.HTTPError:
        failed = True
    return Outcome(done and not failed, tokens, ttft, time.perf_counter() - started)


async def run_phase(
    base: str, model: str, prompts: list[str], max_tokens: int, clients: int
) -> tuple[float, list[Outcome]]:
    """Wall seconds and outcomes of all ``prompts`` spread over ``clients`` workers."""
    pending: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        pending.put_nowait(prompt)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients + 4)
    timeout = httpx.Timeout(900.0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            first = True
            while not pending.empty():
                prompt = pending.get_nowait()
                outcome = await one_request(client, model, prompt, max_tokens)
                outcome.first, first = first, False
                outcomes.append(outcome)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - started, outcomes


def batch_limit(model: str, questions: list[str], max_tokens: int, batch: int) -> dict[str, Any]:
    """Unguarded fixed-batch decoding of the same chat prompts, ``batch`` at a time, in this
    process (after a warm-up batch). ``tps``: one running batch kept across the batches,
    prefilled as the server does (an idle batch prefills all of a batch in its first step,
    grouped by length, the shared prefix's keys and values reused); ``plain_tps``: every
    batch on its own in one padded pass (``generate_batch``, like ``model.generate``).

    ``kept.burst_ttft_s``: per batch, the seconds from adding its ``batch`` prompts to an
    idle running batch until the last of them has its first token: the opening burst of the
    load phase with no HTTP and no guard, the engine's own floor for that burst's TTFT (its
    prompt tokens are compute-bound; every token, unguarded too, is sent once the next pass
    has fed it)."""
    guarded = GuardedModel(load_model(model), None)
    prompts = [guarded.encode_chat([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    kept = guarded.live_batch()
    bursts: list[float] = []

    def run(group: list[list[int]], keep: bool) -> int:
        started, firsts = time.perf_counter(), [0.0] * len(group)  # 0: no token (at once EOS)

        def first(i: int) -> Callable[[TokenEvent], None]:
            def on_event(event: TokenEvent) -> None:
                if event.index == 0:
                    firsts[i] = time.perf_counter() - started

            return on_event

        sinks = [CollectingSink(first(i)) for i in range(len(group))]
        requests = [GenerationRequest(p, params, s) for p, s in zip(group, sinks, strict=True)]
        if keep:
            kept.add(requests)
            while kept:
                kept.step()
            bursts.append(round(max(firsts), 4))
        else:
            guarded.generate_batch(requests)
        return sum(s.result.completion_tokens for s in sinks if s.result is not None)

    out: dict[str, Any] = {}
    for keep, name in ((False, "plain"), (True, "kept")):
        run(prompts[:batch], keep)  # warm-up (and, kept, the prefix)
        bursts.clear()
        started = time.perf_counter()
        tokens = sum(run(prompts[i : i + batch], keep) for i in range(0, len(prompts), batch))
        seconds = time.perf_counter() - started
        tps = round(tokens / seconds, 3)
        out[name] = {"tokens": tokens, "seconds": round(seconds, 3), "tps": tps}
    out["kept"]["burst_ttft_s"] = list(bursts)
    return out


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


Phase = tuple[float, list[Outcome]]  # wall seconds, outcomes


def mean_tps(limits: list[dict[str, Any]], side: str) -> float:
    """The mean of a batch-limit side's tokens/s over its runs (before and after the server)."""
    return round(float(np.mean([limit[side]["tps"] for limit in limits])), 3)


def summarise(
    args: argparse.Namespace, single: Phase, concurrent: Phase, limits: list[dict[str, Any]]
) -> dict[str, Any]:
    single_s, single_out = single
    many_s, many_out = concurrent
    single_tps = sum(o.tokens for o in single_out) / single_s
    aggregate_tps = sum(o.tokens for o in many_out) / many_s
    ttfts = [o.ttft_s for o in many_out if o.ttft_s is not None]
    later = [o.ttft_s for o in many_out if o.ttft_s is not None and not o.first]
    return {
        "single_client_tps": round(single_tps, 3),
        "aggregate_tps": round(aggregate_tps, 3),
        "speedup": round(aggregate_tps / single_tps, 3) if single_tps else 0.0,
        "batch_limit_tps": (kept := mean_tps(limits, "kept")),
        "batch_limit_ratio": round(aggregate_tps / kept, 4),
        "batch_limit_plain_tps": (plain := mean_tps(limits, "plain")),
        "batch_limit_plain_ratio": round(aggregate_tps / plain, 4),
        "batch_limit": {"runs": limits, "batch": args.clients, "guarded": False},
        "errors": sum(not o.ok for o in single_out + many_out),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_max_s": round(max(ttfts), 4) if ttfts else None,
        # the opening burst's floor: the engine alone, unguarded, no HTTP (`batch_limit`)
        "batch_limit_burst_ttft_s": (floor := round(float(np.median(
            [t for limit in limits for t in limit["kept"]["burst_ttft_s"]])), 4)),
        "ttft_max_over_burst_floor": round(max(ttfts) / floor, 3) if ttfts else None,
        "ttft_after_first_p50_s": percentile(later, 50),  # without the opening burst
        "ttft_after_first_p99_s": percentile(later, 99),
        "single_client_ttft_p50_s": round(float(np.median(
            [o.ttft_s for o in single_out if o.ttft_s is not None] or [0.0])), 4),
        "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
        "tokens": {"single": sum(o.tokens for o in single_out),
                   "concurrent": sum(o.tokens for o in many_out)},
        "seconds": {"single": round(single_s, 3), "concurrent": round(many_s, 3)},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0], "load_avg_before": args.load_before,
                    "load_avg": os.getloadavg()},
    }  # fmt: skip


def serve_and_load(
    args: argparse.Namespace, probe: str, engine: str, layout: dict[str, str] | None = None
) -> dict[str, Any]:
    """Start ``hguard serve --engine ENGINE`` (``layout``: more of its environment), run
    both phases, stop it: the phases and the server's exit code."""
    prompts = [f"{q} Answer in a few words." for q in questions(args.requests)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"GUARD_MAX_BATCH": str(args.clients), "GUARD_SERVED_MODEL_NAME": "bench",
           "GUARD_QUEUE_SIZE": str(max(256, args.requests)), **(layout or {})}  # fmt: skip
    server = start_server(port, args.model, probe, env, engine)
    try:
        wait_ready(base, server)
        asyncio.run(run_phase(base, "bench", prompts[:2], args.max_tokens, 1))  # warm-up
        single = asyncio.run(run_phase(base, "bench", prompts, args.max_tokens, 1))
        concurrent = asyncio.run(run_phase(base, "bench", prompts, args.max_tokens, args.clients))
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(60)
    return {"phases": (single, concurrent), "engine": engine, "server_exit_code": exit_code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=DEFAULT_MODEL_SPEC)
    parser.add_argument("--probe", help="probe directory (default: shipped, else synthetic)")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.load_before = os.getloadavg()
    prompts = [f"{q} Answer in a few words." for q in questions(args.requests)]
    # The batch limit is measured before and after the servers run (their mean counts):
    # a shared machine's speed drifts over the minutes between the phases.
    limits = [batch_limit(args.model, prompts, args.max_tokens, args.clients)]
    # vLLM: its own process layout, then in process, then the transformers engine
    engines: list[tuple[str, dict[str, str]]] = [("transformers", {})]
    if args.engine == "vllm":
        engines[:0] = [("vllm", {"GUARD_VLLM_MULTIPROCESS": "true"}),
                       ("vllm", {"GUARD_VLLM_MULTIPROCESS": "false"})]  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        probe = prepare_probe(args.probe, args.model, Path(work))
        runs = [serve_and_load(args, probe, *engine) for engine in engines]
    limits.append(batch_limit(args.model, prompts, args.max_tokens, args.clients))
    summaries = []
    for run in runs:
        summary = summarise(args, *run["phases"], limits)
        summary.update(engine=run["engine"], server_exit_code=run["server_exit_code"])
        summaries.append(summary)
    result = summaries[0]
    if len(summaries) > 1:  # vLLM: in process and the transformers engine, same run
        result["layout"] = "multiprocess"
        result["in_process"], result["transformers"] = summaries[1], summaries[2]
        result["errors"] += summaries[1]["errors"] + summaries[2]["errors"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
