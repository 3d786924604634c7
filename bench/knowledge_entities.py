"""Issue 11 experiment (v6): a token probe that also fires at the end of an unknown name made
of ordinary words.

v4 fires on coined words. On set 6 it missed 65 of the 180 made-up prompts as typed, and
about half of those names are built from real words ("A Grammar of Small Rains", "Coastal
Commons Act"): no single word is new, so nothing v4 learned can fire. The generator coins a
word for every name and cannot teach this. Sets 5 and 6 were written by independent helpers,
name their entity in every row, and have both been read (they are no longer held out), so
here they are fit and choice data:

- Fit: v4's fit prompts (coined-word labels, `bench/knowledge_tokens.py`) and set 5's 360
  prompts in all four renderings, label 1 = the last token of each occurrence of a made-up
  entity's name, 0 = every other token (the real entities' names included).
- Choice on set 6 (every rendering): the layer (9, 12, 15, 18, 21), C, and whether v4's
  rows are kept; the line flags at most 10% of the real prompts in every rendering of set 6
  and of v4's real validation prompts; the design that flags the most made-up prompts of
  set 6 at its line wins. v4 is scored the same way. Frozen (`knowledge_v6_frozen.json`)
  before held-out set 7 (`bench/data/madeup_heldout7.jsonl`: a helper that saw none of the
  project, about half its made-up names from ordinary words) is read once.

    python bench/knowledge_tokens.py --stage heldout --set bench/data/madeup_heldout6.jsonl \\
        --out bench/results/knowledge_v4_set6.json     # set 6's states (and v4 on it)
    python bench/knowledge_entities.py --stage fit
    python bench/knowledge_entities.py --stage heldout --set bench/data/madeup_heldout7.jsonl
    python bench/knowledge_entities.py --stage attach --probe guard/default_probe
                                       # ship it (by the frozen rule; report-only by default)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from knowledge_tokens import (  # noqa: E402
    FIT,
    LAYERS,
    NEGATIVES_PER_PROMPT,
    REAL_FLAG_SHARE,
    VAL_REAL,
    compute_states,
    heldout_items,
    load_group,
    prompt_max,
    token_labels,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench/data"
RESULTS = ROOT / "bench/results"
FIT_SET, CHOICE_SET = DATA / "madeup_heldout5.jsonl", DATA / "madeup_heldout6.jsonl"
C_GRID = (0.01, 0.1, 1.0)
SHIP_RULE = (
    "v6 replaces the shipped v4 gate if, on set 7 read once after this freeze (every prompt "
    "in all four renderings), it flags more of the made-up prompts than v4 at v4's own line "
    "and at most 10% of the real prompts in every rendering; it acts by default only if it "
    "also flags >= 90% of the made-up prompts in every rendering"
)
log = logging.getLogger("knowledge_entities")


def _kinds(path: Path) -> list[str]:
    return [f"{path.stem}_{kind}" for kind in ("short", "real_short", "long", "real_long")]


def entity_labels(path: Path, tokenizer: Any) -> dict[str, np.ndarray]:
    """Per group of `heldout_items`' layout: 1 at the last token of each occurrence of a
    made-up row's entity name (in the order `compute_states` stored the tokens)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    items = heldout_items(path)
    out: dict[str, list[np.ndarray]] = {}
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(f"{path.stem}_{row['kind']}", []).append(row)
    for group, group_items in items.items():
        renderings = len(group_items) // len(by_kind[group])
        for k, item in enumerate(group_items):
            row = by_kind[group][k // renderings]
            names = (str(row["entity"]),) if item[2] == 1 else ()
            out.setdefault(group, []).append(token_labels(tokenizer, (*item[:3], names))[1])
    return {group: np.concatenate(labels) for group, labels in out.items()}


def _checked(labels: dict[str, np.ndarray], groups: dict[str, dict[str, np.ndarray]]) -> None:
    """The labels line up with the cached states token for token."""
    for name, group in groups.items():
        if len(labels[name]) != int(group["lengths"].sum()):
            raise SystemExit(
                f"{name}: {len(labels[name])} labels for {group['lengths'].sum()} tokens"
            )


def _rows(
    group: dict[str, np.ndarray], labels: np.ndarray, layer: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Every positive token and NEGATIVES_PER_PROMPT negatives per prompt."""
    negatives = np.flatnonzero(labels == 0)
    keep = rng.choice(
        negatives, size=min(len(negatives), NEGATIVES_PER_PROMPT * len(group["lengths"])),
        replace=False,
    )  # fmt: skip
    rows = np.concatenate([np.flatnonzero(labels == 1), keep])
    return group[f"L{layer}"][rows], labels[rows]


def _scores(
    groups: dict[str, dict[str, np.ndarray]], layer: int, w: np.ndarray, b: float
) -> dict[str, np.ndarray]:
    return {name: prompt_max(group, layer, w, b) for name, group in groups.items()}


def evaluate(
    scores: dict[str, np.ndarray], groups: dict[str, dict[str, np.ndarray]], line: float
) -> dict[str, Any]:
    """Made-up and real prompts flagged at ``line`` per rendering, and the AUROC."""
    from probes.knowledge import RENDERINGS
    from probes.metrics import auroc

    made = [n for n, g in groups.items() if g["made_up"][0] == 1]
    real = [n for n, g in groups.items() if g["made_up"][0] == 0]
    out: dict[str, Any] = {}
    for style in RENDERINGS:

        def share(names: list[str], style: str = style) -> float:
            z = np.concatenate([scores[n][groups[n]["styles"] == style] for n in names])
            return float(np.mean(z >= line))

        out[style] = {"made_up_flagged": share(made), "real_flagged": share(real)}
    z_made = np.concatenate([scores[n] for n in made])
    z_real = np.concatenate([scores[n] for n in real])
    out["made_up_flagged"] = float(np.mean(z_made >= line))
    out["real_flagged"] = float(np.mean(z_real >= line))
    out["auroc"] = auroc(np.r_[np.ones(len(z_made)), np.zeros(len(z_real))], np.r_[z_made, z_real])
    return out


def _line(scores: dict[str, np.ndarray], groups: dict[str, dict[str, np.ndarray]]) -> float:
    """The lowest line flagging at most REAL_FLAG_SHARE of each real group per rendering."""
    from probes.knowledge import RENDERINGS, line_for

    checks = [
        (scores[n][g["styles"] == style], REAL_FLAG_SHARE)
        for n, g in groups.items()
        if g["made_up"][0] == 0
        for style in RENDERINGS
    ]
    return line_for(checks)


def fit_stage(cache: Path, frozen: Path, seed: int = 0) -> dict[str, Any]:
    from longform_analysis import load_tokenizer  # bench/ is on sys.path

    from probes.scope import fit_raw_logistic

    tokenizer = load_tokenizer("smollm2")
    fit5 = {n: load_group(cache, n) for n in _kinds(FIT_SET)}
    labels5 = entity_labels(FIT_SET, tokenizer)
    _checked(labels5, fit5)
    v4_fit = {n: load_group(cache, n) for n in FIT}
    choice = {n: load_group(cache, n) for n in _kinds(CHOICE_SET)}
    val_real = {n: load_group(cache, n) for n in VAL_REAL}
    line_groups = {**choice, **val_real}
    with np.load(RESULTS / "knowledge_v4_frozen.npz") as data:
        v4_w, v4_b, v4_layer = data["weights"], float(data["bias"]), int(data["layer"])
    v4_line = json.loads((RESULTS / "knowledge_v4_frozen.json").read_text())["line_logit"]
    v4 = evaluate(_scores(choice, v4_layer, v4_w, v4_b), choice, v4_line)
    search, best = [], None
    for with_v4 in (True, False):
        for layer in LAYERS:
            rng = np.random.default_rng(seed)
            parts = [_rows(g, labels5[n], layer, rng) for n, g in fit5.items()]
            if with_v4:
                parts += [_rows(g, g["labels"], layer, rng) for g in v4_fit.values()]
            x = np.concatenate([p[0] for p in parts]).astype(np.float64)
            y = np.concatenate([p[1] for p in parts])
            for c in C_GRID:
                w, b = fit_raw_logistic(x, y, c, seed)
                line = _line(_scores(line_groups, layer, w, b), line_groups)
                got = evaluate(_scores(choice, layer, w, b), choice, line)
                row = {"with_v4_rows": with_v4, "layer": layer, "C": c, "line_logit": line,
                       "made_up_flagged": got["made_up_flagged"],
                       "real_flagged": got["real_flagged"], "auroc": got["auroc"]}  # fmt: skip
                search.append(row)
                log.info("%s", row)
                key = (got["made_up_flagged"], got["auroc"])
                if best is None or key > (best["made_up_flagged"], best["auroc"]):
                    best = {**row, "weights": w, "bias": b, "set6": got}
    assert best is not None
    report = {
        "what": "issue 11 experiment v6: v4's token probe refitted with set 5's prompts, "
        "label 1 also at the last token of a made-up entity's name; chosen on set 6; "
        "frozen before set 7 is read",
        "frozen_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "search": search,
        "chosen": {k: v for k, v in best.items() if k not in ("weights", "bias")},
        "v4_on_set6": {**v4, "line_logit": v4_line},
        "line_rule": f"flag at most {REAL_FLAG_SHARE:.0%} of the real prompts of set 6 and "
        "of v4's real validation groups in every rendering",
        "ship_rule": SHIP_RULE,
    }
    frozen.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    np.savez(
        frozen.with_suffix(".npz"),
        weights=best["weights"], bias=np.float64(best["bias"]), layer=np.int64(best["layer"]),
    )  # fmt: skip
    return report


def heldout_stage(cache: Path, frozen: Path, path: Path, out: Path) -> dict[str, Any]:
    design = json.loads(frozen.read_text(encoding="utf-8"))
    with np.load(frozen.with_suffix(".npz")) as data:
        w, b, layer = data["weights"], float(data["bias"]), int(data["layer"])
    with np.load(RESULTS / "knowledge_v4_frozen.npz") as data:
        v4_w, v4_b, v4_layer = data["weights"], float(data["bias"]), int(data["layer"])
    groups = {n: load_group(cache, n) for n in heldout_items(path)}
    report = {
        "what": f"issue 11 experiment v6 (frozen {design['frozen_at']}) on {path.name}, read once",
        "read_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "v6": evaluate(_scores(groups, layer, w, b), groups, design["chosen"]["line_logit"]),
        "v4": evaluate(
            _scores(groups, v4_layer, v4_w, v4_b), groups, design["v4_on_set6"]["line_logit"]
        ),
        "ship_rule": design["ship_rule"],
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def attach_stage(cache: Path, frozen: Path, heldout: Path, directory: Path) -> str:
    """Rewrite the probe at ``directory`` with the frozen v6 gate (every other file byte for
    byte); returns the manifest sha256 to pin. Its abstain line follows v4's rule (at most 5%
    of the same real prompts in every rendering), computed here on the choice data only."""
    from knowledge_gate import attach  # bench/ is on sys.path
    from knowledge_tokens import ABSTAIN_SHARE

    from guard.probe import GateWeights, KnowledgeRecipe
    from probes.knowledge import RENDERINGS, line_for

    design = json.loads(frozen.read_text(encoding="utf-8"))
    read = json.loads(heldout.read_text(encoding="utf-8"))
    with np.load(frozen.with_suffix(".npz")) as data:
        weights = GateWeights(data["weights"].astype(np.float64), float(data["bias"]))
        layer = int(data["layer"])
    groups = {n: load_group(cache, n) for n in (*_kinds(CHOICE_SET), *VAL_REAL)}
    scores = _scores(groups, layer, weights.weights, weights.bias)
    flag = design["chosen"]["line_logit"]
    checks = [
        (scores[n][g["styles"] == style], ABSTAIN_SHARE)
        for n, g in groups.items()
        if g["made_up"][0] == 0
        for style in RENDERINGS
    ]
    abstain = max(flag, line_for(checks))
    chosen = {k: design["chosen"][k] for k in ("with_v4_rows", "layer", "C", "auroc")}
    recipe = KnowledgeRecipe(
        feature="residual_max_prompt_token",
        layer=layer,
        hidden_size=int(weights.weights.shape[0]),
        flag=float(1 / (1 + np.exp(-flag))),
        abstain=float(1 / (1 + np.exp(-abstain))),
        training={
            "feature": f"residual stream after decoder layer {layer} at every prompt token; "
            "prompt_risk = sigmoid(max over the prompt's tokens of the token logit)",
            "labels": "1 = the last token of a word the generator coined for a made-up entity "
            "(seed 0) and the last token of each made-up entity name of held-out set 5 (all "
            "four renderings); 0 = every other token of every fit prompt",
            "chosen": chosen,
            "chosen_on": "held-out set 6, every rendering (already read)",
            "flag_rule": design["line_rule"],
            "abstain_rule": f"abstain on at most {ABSTAIN_SHARE:.0%} of the same real prompts "
            "in every rendering",
            "frozen": "bench/results/knowledge_v6_frozen.json",
        },
        evaluation={"set6_choice": design["chosen"]["set6"], "heldout_set7": read["v6"]},
    )
    return attach(directory, recipe, weights, None, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("fit", "heldout", "attach"), required=True)
    parser.add_argument("--probe", type=Path, help="the probe directory (--stage attach)")
    parser.add_argument("--cache", type=Path, default=ROOT / "work-knowledge-tokens")
    parser.add_argument("--frozen", type=Path, default=RESULTS / "knowledge_v6_frozen.json")
    parser.add_argument("--set", type=Path, help="the held-out set (--stage heldout)")
    parser.add_argument("--out", type=Path, default=RESULTS / "knowledge_v6_heldout.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.stage == "fit":
        report = fit_stage(args.cache, args.frozen)
        print(json.dumps({k: report[k] for k in ("chosen", "v4_on_set6")}, indent=2))
        return 0
    if args.stage == "attach":
        if args.probe is None:
            raise SystemExit("--stage attach needs --probe")
        sha = attach_stage(args.cache, args.frozen, args.out, args.probe)
        print(f"manifest sha256 {sha}: pin it in guard/shipped.py")
        return 0
    if args.set is None:
        raise SystemExit("--stage heldout needs --set")
    import torch

    from guard.model import load_model

    torch.set_num_threads(args.threads)
    compute_states(load_model(), heldout_items(args.set), args.cache)
    print(json.dumps(heldout_stage(args.cache, args.frozen, args.set, args.out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
