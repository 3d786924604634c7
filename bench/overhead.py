"""Guard overhead: tokens/s of guarded generation vs plain transformers ``generate``.

Same model, same prompts, greedy, the same number of new tokens forced on both (end
tokens suppressed), side by side in one run, at batch 1 and 32. Guarded = hooks on the
probe's neurons, per-token risk, abort off. Plain = ``model.generate`` with no hooks.
Runs alternate (plain, guarded, plain, ...) and each side's *median* over ``--repeats``
counts (robust to the odd slow or fast run of a shared machine; the best-of ratio and
every run's seconds are in the JSON too).

    python bench/overhead.py [--quick] [--probe DIR] --out bench/results/overhead.json
    .venv-vllm/bin/python bench/overhead.py --engine vllm [--quick] --out ...overhead_vllm.json

``--engine vllm``: guarded = the vLLM engine (hooks, per-token risk, our rows); plain = the
same vLLM engine with the hooks removed, driven directly (`bench/overhead_vllm.py`), in vLLM's
own process layout (``GUARD_VLLM_MULTIPROCESS=false``: vLLM in this process).

Writes ``{"batch_1": {"plain_tps", "guarded_tps", "ratio"}, "batch_32": {...}, ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from guard.decoding import GenerationRequest, SamplingParams  # noqa: E402
from guard.errors import ProbeError  # noqa: E402
from guard.generation import CollectingSink, GuardedModel  # noqa: E402
from guard.model import (  # noqa: E402
    DEFAULT_MODEL_SPEC,
    LoadedModel,
    left_pad,
    load_model,
    pad_token_id,
)
from guard.probe import (  # noqa: E402
    PlattCalibrator,
    Probe,
    ProbeManifest,
    ProbeWeights,
    ScoringRecipe,
    Thresholds,
    load_probe,
    save_probe,
)
from guard.scoring import RiskScorer  # noqa: E402
from guard.settings import GuardSettings  # noqa: E402

TRIVIAQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "triviaqa" / "triviaqa.jsonl"


def questions(count: int) -> list[str]:
    """The first ``count`` TriviaQA questions (or fixed ones when the data is absent)."""
    if TRIVIAQA.is_file():
        with TRIVIAQA.open(encoding="utf-8") as handle:
            lines = [next(handle, "") for _ in range(count)]
        rows = [json.loads(line)["question"] for line in lines if line.strip()]
        if len(rows) == count:
            return rows
    return [f"Question number {i}: what is the capital of country {i}?" for i in range(count)]


def synthetic_probe(loaded: LoadedModel, directory: Path, per_layer: int = 20) -> Probe:
    """A stand-in probe hooking every layer (the costliest shape) when none is given."""
    rng = np.random.default_rng(0)
    fp = loaded.fingerprint
    layers = np.repeat(np.arange(fp.num_layers), per_layer)
    neurons = np.concatenate(
        [rng.choice(fp.mlp_width, per_layer, replace=False) for _ in range(fp.num_layers)]
    )
    weights = rng.normal(0, 0.1, layers.size)
    manifest = ProbeManifest(
        name="overhead-bench-synthetic", model_id=loaded.model_id, fingerprint=fp,
        scoring=ScoringRecipe(calibrator=PlattCalibrator(a=1.0, b=0.0)),
        thresholds=Thresholds(flag=0.6, abstain=0.9),
    )  # fmt: skip
    save_probe(directory, manifest, ProbeWeights(layers, neurons, weights, 0.0))
    return load_probe(directory)


def resolve_probe(spec: str | None, loaded: LoadedModel, work: Path) -> Probe:
    if spec is not None:
        return load_probe(spec)
    try:
        probe = load_probe("default")
        probe.verify_model(loaded.fingerprint)
        return probe
    except ProbeError:
        return synthetic_probe(loaded, work / "synthetic_probe")


Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process and its children)


def _cpu_seconds() -> float:
    """CPU time of this process and every live child (vLLM's engine core and worker run in
    their own processes: this process's time alone would leave out the model)."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _clock() -> Timing:
    return time.perf_counter(), _cpu_seconds()


def _since(start: Timing) -> Timing:
    return time.perf_counter() - start[0], _cpu_seconds() - start[1]


def plain_run(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int) -> Timing:
    """Wall and CPU seconds of ``model.generate`` on one batch of prompts."""
    tokenizer = loaded.tokenizer
    input_ids, mask = left_pad(prompts, pad_token_id(tokenizer))
    started = _clock()
    with torch.inference_mode():
        loaded.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    return _since(started)


def guarded_run(guarded: GuardedModel, prompts: list[list[int]], new_tokens: int) -> Timing:
    """Wall and CPU seconds of guarded generation of one batch (abort off); checks lengths."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    sinks = [CollectingSink() for _ in prompts]
    requests = [GenerationRequest(p, params, s) for p, s in zip(prompts, sinks, strict=True)]
    started = _clock()
    guarded.generate_batch(requests)
    elapsed = _since(started)
    for sink in sinks:
        if sink.result is None or sink.result.completion_tokens != new_tokens:
            raise RuntimeError("guarded generation did not produce the forced token count")
    return elapsed


Run = Callable[[list[list[int]], int], Timing]  # (prompts, new tokens) -> timing


def measure(
    plain_side: Run,
    guarded_side: Run,
    batches: list[list[list[int]]],
    new_tokens: int,
    repeats: int,
) -> dict[str, float]:
    """Median tokens/s of each side over ``repeats`` alternating runs of the same batches."""
    tokens = sum(len(batch) for batch in batches) * new_tokens
    plain: list[Timing] = []
    guarded_t: list[Timing] = []
    plain_side(batches[0][:1], 2)  # warm-up both paths
    guarded_side(batches[0][:1], 2)
    for _ in range(repeats):
        plain.append(_total(plain_side(b, new_tokens) for b in batches))
        guarded_t.append(_total(guarded_side(b, new_tokens) for b in batches))
    plain_tps = tokens / float(np.median([t[0] for t in plain]))
    guarded_tps = tokens / float(np.median([t[0] for t in guarded_t]))
    plain_cpu_tps = tokens / float(np.median([t[1] for t in plain]))
    guarded_cpu_tps = tokens / float(np.median([t[1] for t in guarded_t]))
    best_ratio = min(t[0] for t in plain) / min(t[0] for t in guarded_t)
    return {
        "plain_tps": round(plain_tps, 3),
        "guarded_tps": round(guarded_tps, 3),
        "ratio": round(guarded_tps / plain_tps, 4),
        "best_of_ratio": round(best_ratio, 4),
        "plain_cpu_tps": round(plain_cpu_tps, 3),
        "guarded_cpu_tps": round(guarded_cpu_tps, 3),
        "cpu_ratio": round(guarded_cpu_tps / plain_cpu_tps, 4),
        "new_tokens": new_tokens,
        "prompts": sum(len(b) for b in batches),
        "repeats": repeats,
        "plain_seconds": [round(t[0], 3) for t in plain],
        "guarded_seconds": [round(t[0], 3) for t in guarded_t],
    }


def _total(timings: Iterable[Timing]) -> Timing:
    wall = cpu = 0.0
    for w, c in timings:
        wall, cpu = wall + w, cpu + c
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts, tokens, repeats")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL_SPEC)
    parser.add_argument("--probe", help="probe directory (default: shipped, else synthetic)")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--prompts", type=int, help="batch-1 prompts (default 4, quick 2)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 5)
    single_prompts = args.prompts or (2 if args.quick else 4)
    if args.engine == "vllm":
        from overhead_vllm import vllm_sides  # bench/ is on sys.path as the script's dir

        plain_side, guarded_side, encode, probe, model_id, close, hook_cost = vllm_sides(args)
    else:
        loaded = load_model(args.model)
        probe = resolve_probe(args.probe, loaded, args.out.parent)
        guarded = GuardedModel(loaded, probe)
        plain_side, guarded_side = partial(plain_run, loaded), partial(guarded_run, guarded)
        encode, model_id, close, hook_cost = guarded.encode_chat, loaded.model_id, None, None
    ask = probe.manifest.prompt.messages
    batch_1 = [[encode(ask(q))] for q in questions(single_prompts)]
    batch_32 = [[encode(ask(q)) for q in questions(32)]]
    try:
        sides = (plain_side, guarded_side)
        batches = {}
        for name, batch in (("batch_1", batch_1), ("batch_32", batch_32)):
            batches[name] = measure(*sides, batch, new_tokens, repeats)
            if hook_cost is not None:  # vLLM: the worker's hook time per guarded step
                batches[name].update(hook_cost())
    finally:
        if close is not None:
            close()
    result: dict[str, Any] = {
        **batches,
        "engine": args.engine,
        **(
            {"vllm_multiprocess": GuardSettings().vllm_multiprocess}
            if args.engine == "vllm"
            else {}
        ),
        "probe": {
            "name": probe.name,
            "layers": len(RiskScorer(probe).neuron_selection()),
            "neurons": int(np.count_nonzero(probe.weights.weights)),
        },
        "model": model_id,
        "quick": args.quick,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "load_avg": os.getloadavg(),
        },  # fmt: skip
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("batch_1", "batch_32")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
