"""Issue 11 experiments v6 and v7: a token probe that also fires at the end of an unknown
name made of ordinary words.

v4 fires on coined words. On set 6 it missed 65 of the 180 made-up prompts as typed, and
about half of those names are built from real words ("A Grammar of Small Rains", "Coastal
Commons Act"): no single word is new, so nothing v4 learned can fire. The generator coins a
word for every name and cannot teach this. The held-out sets were written by independent
helpers and name their entity in every row; once read they are no longer held out, and here
they are fit and choice data:

- Fit: v4's fit prompts (coined-word labels, `bench/knowledge_tokens.py`) and the design's
  fit sets' 360 prompts each in all four renderings, label 1 = the last token of each
  occurrence of a made-up entity's name, 0 = every other token (the real entities' names
  included).
- Choice on the design's choice set (every rendering): the fit sets (v7: set 5 alone or sets
  5 and 6), the layer (9, 12, 15, 18, 21), C, and whether v4's rows are kept; the line flags
  at most 10% of the real prompts in every rendering of the choice set and of v4's real
  validation prompts; the design that flags the most made-up prompts of the choice set at
  its line wins. The gate it would replace is scored the same way. Frozen before the
  design's held-out set is read once.

Designs (`DESIGNS`): v6 (fit set 5, choice set 6, held out set 7; shipped 2026-12-03 over
v4); v7 (fit sets 5 and 6, choice set 7, held out set 8; shipped 2026-12-03 over v6).

    python bench/knowledge_tokens.py --stage heldout --set bench/data/madeup_heldout6.jsonl \\
        --out bench/results/knowledge_v4_set6.json     # set 6's states (and v4 on it)
    python bench/knowledge_entities.py --design v7 --stage fit
    python bench/knowledge_entities.py --design v7 --stage heldout
    python bench/knowledge_entities.py --design v7 --stage attach --probe guard/default_probe
                                       # ship it (by the frozen rule; report-only by default)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
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
C_GRID = (0.01, 0.1, 1.0)


def _set(n: int) -> Path:
    return DATA / f"madeup_heldout{n}.jsonl"


@dataclass(frozen=True)
class Design:
    """One experiment: what it fits on, chooses on, is read on once, and must beat."""

    name: str
    fit_options: tuple[tuple[int, ...], ...]  # the fit sets, one tuple per choice
    choice: int
    heldout: int
    previous: str  # the shipped gate it would replace

    @property
    def frozen(self) -> Path:
        return RESULTS / f"knowledge_{self.name}_frozen.json"

    @property
    def read(self) -> Path:
        return RESULTS / f"knowledge_{self.name}_heldout.json"

    @property
    def ship_rule(self) -> str:
        p = self.previous
        return (
            f"{self.name} replaces the shipped {p} gate if, on set {self.heldout} read once "
            "after this freeze (every prompt in all four renderings), it flags more of the "
            f"made-up prompts than {p} at {p}'s own line and at most 10% of the real prompts "
            "in every rendering; it acts by default only if it also flags >= 90% of the "
            "made-up prompts in every rendering"
        )


DESIGNS = {
    "v6": Design("v6", fit_options=((5,),), choice=6, heldout=7, previous="v4"),
    "v7": Design("v7", fit_options=((5,), (5, 6)), choice=7, heldout=8, previous="v6"),
}


def frozen_gate(name: str) -> tuple[np.ndarray, float, int, float]:
    """(weights, bias, layer, line logit) of a frozen gate (`knowledge_<name>_frozen.*`)."""
    with np.load(RESULTS / f"knowledge_{name}_frozen.npz") as data:
        w, b, layer = data["weights"], float(data["bias"]), int(data["layer"])
    design = json.loads((RESULTS / f"knowledge_{name}_frozen.json").read_text())
    line = design["chosen"]["line_logit"] if "chosen" in design else design["line_logit"]
    return w, b, layer, float(line)


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


def fit_stage(design: Design, cache: Path, seed: int = 0) -> dict[str, Any]:
    from longform_analysis import load_tokenizer  # bench/ is on sys.path

    from probes.scope import fit_raw_logistic

    tokenizer = load_tokenizer("smollm2")
    fit_sets = sorted({n for option in design.fit_options for n in option})
    groups: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    labels: dict[int, dict[str, np.ndarray]] = {}
    for n in fit_sets:
        groups[n] = {name: load_group(cache, name) for name in _kinds(_set(n))}
        labels[n] = entity_labels(_set(n), tokenizer)
        _checked(labels[n], groups[n])
    v4_fit = {n: load_group(cache, n) for n in FIT}
    choice = {n: load_group(cache, n) for n in _kinds(_set(design.choice))}
    val_real = {n: load_group(cache, n) for n in VAL_REAL}
    line_groups = {**choice, **val_real}
    p_w, p_b, p_layer, p_line = frozen_gate(design.previous)
    previous = evaluate(_scores(choice, p_layer, p_w, p_b), choice, p_line)
    search, best = [], None
    for option in design.fit_options:
        for with_v4 in (True, False):
            for layer in LAYERS:
                rng = np.random.default_rng(seed)
                parts = [
                    _rows(g, labels[n][name], layer, rng)
                    for n in option
                    for name, g in groups[n].items()
                ]
                if with_v4:
                    parts += [_rows(g, g["labels"], layer, rng) for g in v4_fit.values()]
                x = np.concatenate([p[0] for p in parts]).astype(np.float64)
                y = np.concatenate([p[1] for p in parts])
                for c in C_GRID:
                    w, b = fit_raw_logistic(x, y, c, seed)
                    line = _line(_scores(line_groups, layer, w, b), line_groups)
                    got = evaluate(_scores(choice, layer, w, b), choice, line)
                    row = {"fit_sets": list(option), "with_v4_rows": with_v4, "layer": layer,
                           "C": c, "line_logit": line, "made_up_flagged": got["made_up_flagged"],
                           "real_flagged": got["real_flagged"], "auroc": got["auroc"]}  # fmt: skip
                    search.append(row)
                    log.info("%s", row)
                    key = (got["made_up_flagged"], got["auroc"])
                    if best is None or key > (best["made_up_flagged"], best["auroc"]):
                        best = {**row, "weights": w, "bias": b, "choice": got}
    assert best is not None
    report = {
        "what": f"issue 11 experiment {design.name}: v4's token probe refitted with held-out "
        f"sets {fit_sets}' prompts (the fit sets chosen), label 1 also at the last token of a "
        f"made-up entity's name; chosen on set {design.choice}; frozen before set "
        f"{design.heldout} is read",
        "frozen_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "search": search,
        "chosen": {k: v for k, v in best.items() if k not in ("weights", "bias")},
        f"{design.previous}_on_set{design.choice}": {**previous, "line_logit": p_line},
        "line_rule": f"flag at most {REAL_FLAG_SHARE:.0%} of the real prompts of set "
        f"{design.choice} and of v4's real validation groups in every rendering",
        "ship_rule": design.ship_rule,
    }
    design.frozen.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    np.savez(
        design.frozen.with_suffix(".npz"),
        weights=best["weights"], bias=np.float64(best["bias"]), layer=np.int64(best["layer"]),
    )  # fmt: skip
    return report


def heldout_stage(design: Design, cache: Path) -> dict[str, Any]:
    frozen = json.loads(design.frozen.read_text(encoding="utf-8"))
    w, b, layer, line = frozen_gate(design.name)
    p_w, p_b, p_layer, p_line = frozen_gate(design.previous)
    path = _set(design.heldout)
    groups = {n: load_group(cache, n) for n in heldout_items(path)}
    report = {
        "what": f"issue 11 experiment {design.name} (frozen {frozen['frozen_at']}) on "
        f"{path.name}, read once",
        "read_at": datetime.now(UTC).isoformat(timespec="seconds"),
        design.name: evaluate(_scores(groups, layer, w, b), groups, line),
        design.previous: evaluate(_scores(groups, p_layer, p_w, p_b), groups, p_line),
        "ship_rule": design.ship_rule,
    }
    design.read.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def attach_stage(design: Design, cache: Path, directory: Path) -> str:
    """Rewrite the probe at ``directory`` with the design's frozen gate (every other file
    byte for byte); returns the manifest sha256 to pin. Its abstain line follows v4's rule
    (at most 5% of the same real prompts in every rendering), computed here on the choice
    data only."""
    from knowledge_gate import attach  # bench/ is on sys.path
    from knowledge_tokens import ABSTAIN_SHARE

    from guard.probe import GateWeights, KnowledgeRecipe
    from probes.knowledge import RENDERINGS, line_for

    frozen = json.loads(design.frozen.read_text(encoding="utf-8"))
    read = json.loads(design.read.read_text(encoding="utf-8"))
    w, b, layer, flag = frozen_gate(design.name)
    weights = GateWeights(w.astype(np.float64), b)
    groups = {n: load_group(cache, n) for n in (*_kinds(_set(design.choice)), *VAL_REAL)}
    scores = _scores(groups, layer, weights.weights, weights.bias)
    checks = [
        (scores[n][g["styles"] == style], ABSTAIN_SHARE)
        for n, g in groups.items()
        if g["made_up"][0] == 0
        for style in RENDERINGS
    ]
    abstain = max(flag, line_for(checks))
    chosen = {k: frozen["chosen"][k] for k in ("with_v4_rows", "layer", "C", "auroc")}
    fit_sets = frozen["chosen"].get("fit_sets", [5])
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
            "(seed 0) and the last token of each made-up entity name of held-out sets "
            f"{', '.join(map(str, fit_sets))} (all four renderings); 0 = every other token of "
            "every fit prompt",
            "chosen": chosen,
            "chosen_on": f"held-out set {design.choice}, every rendering (already read)",
            "flag_rule": frozen["line_rule"],
            "abstain_rule": f"abstain on at most {ABSTAIN_SHARE:.0%} of the same real prompts "
            "in every rendering",
            "frozen": f"bench/results/{design.frozen.name}",
        },
        evaluation={
            f"set{design.choice}_choice": frozen["chosen"].get(
                "choice", frozen["chosen"].get("set6")
            ),
            f"heldout_set{design.heldout}": read[design.name],
        },
    )
    return attach(directory, recipe, weights, None, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--design", choices=sorted(DESIGNS), default="v7")
    parser.add_argument("--stage", choices=("fit", "heldout", "attach"), required=True)
    parser.add_argument("--probe", type=Path, help="the probe directory (--stage attach)")
    parser.add_argument("--cache", type=Path, default=ROOT / "work-knowledge-tokens")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    design = DESIGNS[args.design]
    if args.stage == "fit":
        report = fit_stage(design, args.cache)
        shown = ("chosen", f"{design.previous}_on_set{design.choice}")
        print(json.dumps({k: report[k] for k in shown}, indent=2))
        return 0
    if args.stage == "attach":
        if args.probe is None:
            raise SystemExit("--stage attach needs --probe")
        sha = attach_stage(design, args.cache, args.probe)
        print(f"manifest sha256 {sha}: pin it in guard/shipped.py")
        return 0
    import torch

    from guard.model import load_model

    torch.set_num_threads(args.threads)
    compute_states(load_model(), heldout_items(_set(design.heldout)), args.cache)
    print(json.dumps(heldout_stage(design, args.cache), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
