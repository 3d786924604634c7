"""Does the knowledge gate's verdict survive how a prompt is worded around the question?

    python bench/knowledge_format.py [--out bench/results/knowledge_format.json]
    python bench/knowledge_format.py --probe DIR --set set4=bench/data/madeup_heldout4.jsonl \\
        --out bench/results/knowledge_format_set4_v3.json

The gate (`guard.knowledge`) was fitted with every made-up prompt asked as users type it
(no instruction), while the TriviaQA and NQ questions it learned as real came with the
shipped recipe's instruction ("... Answer in a few words."). This measures whether the
instruction itself moves ``prompt_risk``: the three held-out made-up-entity sets
(`bench/data/madeup_heldout*.jsonl`: made-up and real entities, short and long), each
prompt in four renderings through the model's chat template:

- ``plain``: the prompt as typed, one user message (how the held-out sets were measured);
- ``short_instruction`` / ``long_instruction``: the shipped recipe's instruction, or the
  long-form one ("Answer in two or three sentences."), appended as the recipe does;
- ``system``: a generic system message before the plain prompt.

Reported per set, kind and rendering: the share at or above the probe's ``prompt_flag``
and ``prompt_abstain`` lines (``--probe``, default the shipped one) and the median
``prompt_risk``. Nothing here is fitted or tuned. On the three default sets, all read
before (README, "Long answers and made-up entities"), it is a diagnostic; ``--set`` measures
others (set 4, for the v3 gate's ship rule: `bench/results/knowledge_frozen_v3.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETS = {
    "set1": ROOT / "bench" / "data" / "madeup_heldout.jsonl",
    "set2": ROOT / "bench" / "data" / "madeup_heldout2.jsonl",
    "set3": ROOT / "bench" / "data" / "madeup_heldout3.jsonl",
}


def summary(risks: np.ndarray, flag: float, abstain: float) -> dict[str, Any]:
    return {
        "n": int(risks.size),
        "at_or_above_flag": round(float(np.mean(risks >= flag)), 4),
        "at_or_above_abstain": round(float(np.mean(risks >= abstain)), 4),
        "median_prompt_risk": round(float(np.median(risks)), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/knowledge_format.json")
    parser.add_argument("--probe", default="default", help="shipped probe name or directory")
    parser.add_argument(
        "--set", dest="sets", action="append", metavar="NAME=PATH",
        help="a set of held-out prompts (default: the three read ones)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    sets = dict(s.split("=", 1) for s in args.sets) if args.sets else SETS
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from guard.knowledge import KnowledgeGate
    from guard.model import encode_chats, load_model
    from guard.probe import load_probe
    from probes.knowledge import RENDERINGS, SYSTEM_MESSAGE, render, residual_states

    started = time.time()
    probe = load_probe(args.probe)
    loaded = load_model()  # the embedded SmolLM2, the shipped probe's model
    gate = KnowledgeGate.from_probe(probe, int(loaded.model.config.hidden_size))
    recipe = probe.manifest.knowledge
    if gate is None or recipe is None:
        raise SystemExit("the shipped probe has no knowledge gate")
    results: dict[str, Any] = {}
    for name, path in sets.items():
        text = Path(path).read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        per_kind: dict[str, dict[str, Any]] = {}
        for style in RENDERINGS:
            conversations = [render(row["prompt"], style) for row in rows]
            ids = encode_chats(loaded.tokenizer, conversations, None)[0]
            states = residual_states(loaded, ids, gate.layer)
            risks = np.asarray(gate.risks(torch.from_numpy(states)))
            for kind in sorted({row["kind"] for row in rows}):
                mask = np.asarray([row["kind"] == kind for row in rows])
                per_kind.setdefault(kind, {})[style] = summary(
                    risks[mask], recipe.flag, recipe.abstain
                )
        results[name] = per_kind
    report = {
        "what": "shipped knowledge gate's prompt_risk on the held-out made-up-entity sets, "
        "per rendering of the same prompts (bench/knowledge_format.py docstring)",
        "probe_sha256": probe.manifest_sha256,
        "prompt_flag": recipe.flag,
        "prompt_abstain": recipe.abstain,
        "system_message": SYSTEM_MESSAGE,
        "sets": results,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores",
        "wall_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
