"""Does the knowledge gate's verdict survive how a prompt is worded around the question?

    python bench/knowledge_format.py [--out bench/results/knowledge_format.json]

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

Reported per set, kind and rendering: the share at or above the shipped gate's
``prompt_flag`` and ``prompt_abstain`` lines and the median ``prompt_risk``. Nothing here
is fitted or tuned: the three sets were all read before (README, "Long answers and made-up
entities"), so this is a diagnostic of the shipped gate, not a held-out measurement.
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
SYSTEM = "You are a helpful assistant."


def renderings(prompt: str) -> dict[str, list[dict[str, str]]]:
    """The four ways of asking one prompt (module docstring)."""
    from guard.probe import PromptRecipe
    from probes.longform import LONG_RECIPE

    return {
        "plain": [{"role": "user", "content": prompt}],
        "short_instruction": PromptRecipe().messages(prompt),
        "long_instruction": LONG_RECIPE.messages(prompt),
        "system": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
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
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from guard.knowledge import KnowledgeGate
    from guard.model import encode_chats, load_model
    from guard.probe import load_probe
    from probes.knowledge import residual_states

    started = time.time()
    probe = load_probe("default")
    loaded = load_model()  # the embedded SmolLM2, the shipped probe's model
    gate = KnowledgeGate.from_probe(probe, int(loaded.model.config.hidden_size))
    recipe = probe.manifest.knowledge
    if gate is None or recipe is None:
        raise SystemExit("the shipped probe has no knowledge gate")
    results: dict[str, Any] = {}
    for name, path in SETS.items():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        per_kind: dict[str, dict[str, Any]] = {}
        for style in ("plain", "short_instruction", "long_instruction", "system"):
            conversations = [renderings(row["prompt"])[style] for row in rows]
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
        "system_message": SYSTEM,
        "sets": results,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores",
        "wall_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results["set3"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
