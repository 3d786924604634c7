"""Scope check: how often does the guard flag or abstain on prompts that are not factual
questions (chit-chat, creative writing, code, instructions) and on long answers, and how
many factual questions does its scope gate keep judging?

The probe is trained on short factual answers; a guard that abstains on "write a haiku
about autumn" is broken. Target (issue 6): at most 10% of these answers flagged or
abstained. Prompts (`bench/data/scope_prompts.jsonl`, held out: never used to fit the
gate) are sent as a user would send them (chat template, no "answer in a few words"
instruction), greedy, as the server would generate them. The other side of the gate:
the share of TriviaQA test and NQ-open dev questions it keeps in scope (as users type
them), since a factual question the gate lets through is not judged.

    python bench/scope.py --out bench/results/scope.json [--probe default] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guard.decoding import GenerationRequest, SamplingParams, TokenEvent
from guard.generation import GuardedModel
from guard.loading import load_guarded
from guard.results import GenerationResult
from guard.settings import GuardSettings

PROMPTS = Path(__file__).parent / "data" / "scope_prompts.jsonl"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FACTUAL = {
    "triviaqa_test": DATA / "triviaqa" / "triviaqa.jsonl",
    "nq_open_dev": DATA / "nq_open" / "nq_open_dev.jsonl",
}
TARGET_FLAGGED = 0.10


@dataclass
class _Sink:
    result: GenerationResult | None = None
    events: list[TokenEvent] = field(default_factory=list)

    def on_token(self, event: TokenEvent) -> None:
        self.events.append(event)

    def on_finish(self, result: GenerationResult) -> None:
        self.result = result

    def cancelled(self) -> bool:
        return False


def run(guarded: GuardedModel, rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict]:
    """Generate every prompt (batched) and return one verdict per prompt."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        sinks = [_Sink() for _ in batch]
        requests = []
        for row, sink in zip(batch, sinks, strict=True):
            max_tokens = args.long_max_tokens if row["long"] else args.max_tokens
            prompt = guarded.encode_chat([{"role": "user", "content": row["prompt"]}])
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
            requests.append(GenerationRequest(prompt, params, sink))
        guarded.generate_batch(requests)
        for row, sink in zip(batch, sinks, strict=True):
            result = sink.result
            if result is None:
                raise RuntimeError(f"no result for {row['id']}")
            out.append(
                {
                    "id": row["id"],
                    "category": row["category"],
                    "risk": result.risk,
                    "decision": result.decision.value,
                    "in_scope": result.in_scope,
                    "scope_score": result.scope.score if result.scope is not None else None,
                    "tokens": len(result.tokens),
                    "answer": result.text[:200],
                }
            )
    return out


def summarise(verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Flag/abstain rates and risk quantiles per category and over all prompts."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for verdict in verdicts:
        groups[verdict["category"]].append(verdict)
    groups["all"] = list(verdicts)
    summary = {}
    for name, members in groups.items():
        risks = np.array([m["risk"] for m in members], dtype=np.float64)
        decisions = [m["decision"] for m in members]
        summary[name] = {
            "n": len(members),
            "flag_rate": decisions.count("flag") / len(members),
            "abstain_rate": decisions.count("abstain") / len(members),
            "flagged_or_abstained_rate": sum(d != "pass" for d in decisions) / len(members),
            "out_of_scope_rate": sum(not m["in_scope"] for m in members) / len(members),
            "mean_risk": float(risks.mean()),
            "p90_risk": float(np.quantile(risks, 0.9)),
            "mean_tokens": float(np.mean([m["tokens"] for m in members])),
        }
    return summary


def factual_in_scope(guarded: GuardedModel, limit: int, batch_size: int) -> dict[str, Any]:
    """Share of factual questions (as users type them) the gate keeps in scope."""
    from probes.datasets import load_questions, split_of
    from probes.scope import hidden_states

    gate = guarded.scope_gate
    if gate is None:
        return {"gate": None}
    out: dict[str, Any] = {}
    for name, path in FACTUAL.items():
        if not path.is_file():
            out[name] = {"missing": str(path)}
            continue
        items = load_questions(path)
        if name == "triviaqa_test":
            items = [item for item in items if split_of(item.id) == "test"]
        items = items[:limit]
        conversations = [[{"role": "user", "content": i.question}] for i in items]
        hidden = torch.as_tensor(
            hidden_states(guarded.loaded, conversations, batch_size, guarded.prompt_recipe)
        )
        scores = gate.probabilities(hidden).numpy()
        out[name] = {"n": len(items), "in_scope_rate": float(np.mean(scores >= gate.threshold))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--probe", default="default")
    parser.add_argument("--model", default=None, help="default: the probe's model")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long-max-tokens", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--factual-limit", type=int, default=2000, help="questions per set")
    args = parser.parse_args()

    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines()]
    guarded = load_guarded(GuardSettings(model=args.model, probe=args.probe))
    started = time.perf_counter()
    verdicts = run(guarded, rows, args)
    summary = summarise(verdicts)
    factual = factual_in_scope(guarded, args.factual_limit, 32)
    flagged = summary["all"]["flagged_or_abstained_rate"]
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "model": guarded.model_id,
        "probe": {
            "name": guarded.info.probe_name,
            "sha256": guarded.info.probe_sha256,
            "thresholds": guarded.policy.thresholds(),
        },
        "max_tokens": args.max_tokens,
        "long_max_tokens": args.long_max_tokens,
        "seconds": round(time.perf_counter() - started, 1),
        "target_flagged_or_abstained_at_most": TARGET_FLAGGED,
        "target_met": flagged <= TARGET_FLAGGED,
        "summary": summary,
        "factual_questions_in_scope": factual,
        "verdicts": verdicts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name, row in summary.items():
        print(
            f"{name:14s} n={row['n']:3d} flagged+abstained={row['flagged_or_abstained_rate']:.2f}"
            f" out of scope={row['out_of_scope_rate']:.2f} mean risk={row['mean_risk']:.3f}"
        )
    print("factual questions kept in scope:", json.dumps(factual))


if __name__ == "__main__":
    main()
