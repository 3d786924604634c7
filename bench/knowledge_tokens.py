"""Issue 11 experiment: a knowledge gate read at every prompt token, max-pooled (v4).

The shipped gate (v2) reads the residual stream at the *last* prompt token, which is the
wording's token ("?", an instruction, the template), not the entity's: measured on held-out
set 4 it is switched off by an appended instruction (`bench/results/knowledge_v3_decision.json`).
Ferrando et al. 2025 ("Do I Know This Entity?") read entity recognition at the entity's
own last token. Here a token-level logistic regression is fitted on the residual stream
after one decoder layer, label 1 = the last token of a coined word of a made-up entity
(`probes.madeup`: the generator knows which words it coined), 0 = every other token of
every prompt (made-up and real alike, template and system prompt included); a prompt's
score is the max over all its tokens, so no entity has to be found at serving time.

    python bench/knowledge_tokens.py --stage states     # per-token states of every group
    python bench/knowledge_tokens.py --stage fit        # choose layer and C on validation;
                                                        # freeze the design and its line
    python bench/knowledge_tokens.py --stage heldout --set bench/data/madeup_heldout5.jsonl
    python bench/knowledge_tokens.py --stage attach --probe guard/default_probe
                                     # ship the frozen gate (report-only by default; v4
                                     # since replaced by v6, then v7: knowledge_entities.py)
    python bench/knowledge_tokens.py --stage score --work DIR
                                     # the shipped gate's prompt risk of every collected
                                     # answer set (for bench/longform_served.py)

Fit: the generator's seed-0 entities (short and long prompts) and real prompts (TriviaQA
train questions as users type them, requests about TriviaQA train gold-answer names in
the generator's generic templates, the open prompts), each in one of the four renderings
of `probes.knowledge.render`. Choice (validation only: seed-1 entities, validation names
and questions, every rendering): the layer and C with the best AUROC of made-up against
real prompts, pooled over renderings; the flag line flags at most 10% of the real
validation prompts in every rendering. The v2 gate is scored on the same prompts (its
own line) for comparison. The held-out stage reads a set once, after the freeze.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (9, 12, 15, 18, 21)
C_GRID = (0.01, 0.1, 1.0)
REAL_FLAG_SHARE = 0.10
ABSTAIN_SHARE = 0.05
SHIP_RULE = (
    "v4 replaces the shipped v2 gate if, on the held-out set read once after this freeze "
    "(every prompt in all four renderings), it flags a larger share of the made-up prompts "
    "than v2 at v2's own line and flags at most 10% of the real prompts in every rendering; "
    "it acts by default (flag and abstain) only if it also flags >= 90% of the made-up "
    "prompts in every rendering"
)
NEGATIVES_PER_PROMPT = 12  # negative tokens kept per fit prompt (the positives all)
log = logging.getLogger("knowledge_tokens")

# A prompt: its conversation, the rendering, 1 = made up, the coined words to label.
Item = tuple[list[dict[str, str]], str, int, tuple[str, ...]]


def fit_and_val_items(seed: int = 0) -> dict[str, list[Item]]:
    from probes.datasets import load_questions, split_of
    from probes.knowledge import RENDERINGS, render
    from probes.longform_data import MADEUP, NQ_OPEN, TRIVIAQA, real_entity
    from probes.madeup import Vocabulary, made_up_entities
    from probes.madeup import render as render_madeup
    from probes.madeup_templates import generic_long_requests
    from probes.scope import OPEN_PROMPTS, load_open_prompts

    rng = random.Random(seed)
    vocabulary = Vocabulary.from_qa_files([TRIVIAQA, NQ_OPEN])
    questions = load_questions(TRIVIAQA)
    by_split = {s: [q for q in questions if split_of(q.id) == s] for s in ("train", "val")}
    names: dict[str, list[str]] = {}
    for split in ("train", "val"):
        seen: dict[str, str] = {}
        for q in by_split[split]:
            name = real_entity(q.answers)
            if name is not None:
                seen.setdefault(name.lower(), name)
        names[split] = list(seen.values())
    groups: dict[str, list[Item]] = {}
    taken: set[str] = set()
    for split, (madeup_seed, n) in MADEUP.items():
        entities = [
            e for e in made_up_entities(n, madeup_seed, vocabulary) if e.name.lower() not in taken
        ]
        taken |= {e.name.lower() for e in entities}
        prompts = render_madeup(entities, seed=madeup_seed)
        styles = RENDERINGS if split == "val" else None
        groups[f"madeup_{split}"] = [
            (render(p.prompt, style), style, 1, p.entity.coined)
            for p in prompts
            for style in (styles or (rng.choice(RENDERINGS),))
        ]
    for split, n_names, n_questions in (("train", 1200, 1500), ("val", 300, 300)):
        styles = RENDERINGS if split == "val" else None
        requests = [rng.choice(generic_long_requests(name)) for name in names[split][:n_names]]
        typed = [
            q.question if rng.random() < 0.5 else q.question.rstrip("?").strip().lower()
            for q in by_split[split][:n_questions]
        ]
        for group, texts in ((f"real_names_{split}", requests), (f"real_typed_{split}", typed)):
            groups[group] = [
                (render(text, style), style, 0, ())
                for text in texts
                for style in (styles or (rng.choice(RENDERINGS),))
            ]
    groups["open_train"] = [
        (render(p.prompt, "plain"), "plain", 0, ()) for p in load_open_prompts(OPEN_PROMPTS)
    ]
    return groups


def heldout_items(path: Path) -> dict[str, list[Item]]:
    from probes.knowledge import RENDERINGS, render

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    groups: dict[str, list[Item]] = {}
    for row in rows:
        made_up = int(not str(row["kind"]).startswith("real"))
        for style in RENDERINGS:
            groups.setdefault(f"{path.stem}_{row['kind']}", []).append(
                (render(str(row["prompt"]), style), style, made_up, ())
            )
    return groups


def token_labels(tokenizer: Any, item: Item) -> tuple[list[int], np.ndarray]:
    """The prompt's ids as serving encodes them, and 1 at the last token of each coined
    word occurrence in the last user message."""
    conversation, _, _, coined = item
    text = str(
        tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    labels = np.zeros(len(ids), dtype=np.int8)
    content = conversation[-1]["content"]
    base = text.rfind(content)
    for word in coined:
        for match in re.finditer(re.escape(word), content, flags=re.IGNORECASE):
            end = base + match.end()
            last = max(i for i, (a, b) in enumerate(offsets) if a < end and b > a) if ids else 0
            labels[last] = 1
    return ids, labels


def token_states(
    loaded: Any, prompts: list[list[int]], layers: tuple[int, ...], batch_size: int = 32
) -> dict[int, list[np.ndarray]]:
    """Residual stream after each of ``layers`` at every token of each id list (the
    server's `ResidualCapture`, the pass stopped after the last of them): per layer, one
    ``[len(ids), hidden]`` float32 array per list."""
    import contextlib

    import torch
    from tqdm import tqdm

    from guard.forcing import position_ids_for
    from guard.knowledge import ResidualCapture, decoder_block
    from guard.kvbatch import run_until
    from guard.model import left_pad, pad_token_id

    model = loaded.model
    pad_id = pad_token_id(loaded.tokenizer)
    out: dict[int, list[np.ndarray]] = {layer: [None] * len(prompts) for layer in layers}  # type: ignore[list-item]
    order = np.argsort([len(p) for p in prompts], kind="stable")
    last = decoder_block(model, max(layers))
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        captures = {layer: stack.enter_context(ResidualCapture(model, layer)) for layer in layers}
        for start in tqdm(range(0, len(order), batch_size), desc="token states", unit="batch"):
            rows = order[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i in rows], pad_id)
            inputs = {"input_ids": ids, "attention_mask": mask,
                      "position_ids": position_ids_for(mask), "use_cache": False}  # fmt: skip
            run_until(model, inputs, last)
            for layer, capture in captures.items():
                hidden = capture.take_all().numpy()
                for j, i in enumerate(rows):
                    out[layer][i] = hidden[j, hidden.shape[1] - len(prompts[i]) :].copy()
    return out


def compute_states(loaded: Any, groups: dict[str, list[Item]], cache: Path) -> None:
    tokenizer = loaded.tokenizer
    for name, items in groups.items():
        path = cache / f"{name}.npz"
        if path.exists():
            continue
        encoded = [token_labels(tokenizer, item) for item in items]
        prompts = [ids for ids, _ in encoded]
        states = token_states(loaded, prompts, LAYERS)
        lengths = np.array([len(p) for p in prompts])
        arrays = {f"L{layer}": np.concatenate(states[layer]) for layer in LAYERS}
        np.savez(
            path,
            lengths=lengths,
            labels=np.concatenate([labels for _, labels in encoded]),
            made_up=np.array([item[2] for item in items]),
            styles=np.array([item[1] for item in items]),
            **arrays,
        )
        positives = int(sum(labels.sum() for _, labels in encoded))
        log.info(
            "%s: %d prompts, %d tokens, %d positive", name, len(items), lengths.sum(), positives
        )


def load_group(cache: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(cache / f"{name}.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def prompt_max(group: dict[str, np.ndarray], layer: int, w: np.ndarray, b: float) -> np.ndarray:
    z = group[f"L{layer}"].astype(np.float64) @ w + b
    bounds = np.concatenate([[0], np.cumsum(group["lengths"])])
    return np.array([z[bounds[i] : bounds[i + 1]].max() for i in range(len(bounds) - 1)])


def last_token(group: dict[str, np.ndarray], layer: int) -> np.ndarray:
    ends = np.cumsum(group["lengths"]) - 1
    return group[f"L{layer}"][ends]


FIT = ("madeup_train", "real_names_train", "real_typed_train", "open_train")
VAL_REAL = ("real_names_val", "real_typed_val")


def fit_stage(cache: Path, frozen: Path, seed: int = 0) -> dict[str, Any]:
    from probes.knowledge import RENDERINGS, line_for
    from probes.metrics import auroc
    from probes.scope import fit_raw_logistic

    rng = np.random.default_rng(seed)
    fit = {name: load_group(cache, name) for name in FIT}
    val = {name: load_group(cache, name) for name in ("madeup_val", *VAL_REAL)}
    search = []
    best: dict[str, Any] | None = None
    for layer in LAYERS:
        xs, ys = [], []
        for group in fit.values():
            x, y = group[f"L{layer}"], group["labels"]
            negatives = np.flatnonzero(y == 0)
            keep = rng.choice(
                negatives,
                size=min(len(negatives), NEGATIVES_PER_PROMPT * len(group["lengths"])),
                replace=False,
            )
            rows = np.concatenate([np.flatnonzero(y == 1), keep])
            xs.append(x[rows])
            ys.append(y[rows])
        x_fit, y_fit = np.concatenate(xs).astype(np.float64), np.concatenate(ys)
        for c in C_GRID:
            w, b = fit_raw_logistic(x_fit, y_fit, c, seed)
            made = prompt_max(val["madeup_val"], layer, w, b)
            real = np.concatenate([prompt_max(val[n], layer, w, b) for n in VAL_REAL])
            score = auroc(np.r_[np.ones(len(made)), np.zeros(len(real))], np.r_[made, real])
            row = {"layer": layer, "C": c, "val_auroc": score}
            search.append(row)
            log.info("layer %d C %g: validation AUROC %.4f", layer, c, score)
            if best is None or score > best["val_auroc"]:
                best = {**row, "weights": w, "bias": b}
    assert best is not None
    layer, w, b = best["layer"], best["weights"], best["bias"]
    scores = {name: prompt_max(group, layer, w, b) for name, group in val.items()}
    checks = [
        (scores[n][val[n]["styles"] == style], REAL_FLAG_SHARE)
        for n in VAL_REAL
        for style in RENDERINGS
    ]
    line = line_for(checks)
    abstain = max(line, line_for([(z, ABSTAIN_SHARE) for z, _ in checks]))
    per_style = {
        style: {
            "made_up_flagged": float(
                np.mean(scores["madeup_val"][val["madeup_val"]["styles"] == style] >= line)
            ),
            **{
                f"{n}_flagged": float(np.mean(scores[n][val[n]["styles"] == style] >= line))
                for n in VAL_REAL
            },
        }
        for style in RENDERINGS
    }
    v2 = v2_scores(val)
    report = {
        "what": "issue 11 experiment: knowledge gate v4 (max over prompt tokens of a token-level "
        "probe on coined-word tokens), chosen on validation only; frozen before any held-out read",
        "frozen_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "layers": list(LAYERS),
        "search": search,
        "chosen": {"layer": layer, "C": best["C"], "val_auroc": best["val_auroc"]},
        "line_logit": line,
        "line_rule": f"flag at most {REAL_FLAG_SHARE:.0%} of real validation prompts in "
        "every rendering",
        "abstain_logit": abstain,
        "abstain_rule": f"abstain on at most {ABSTAIN_SHARE:.0%} of them in every rendering",
        "ship_rule": SHIP_RULE,
        "validation": per_style,
        "v2_validation": v2,
        "fit_rows": {n: int(len(g["lengths"])) for n, g in fit.items()},
    }
    frozen.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    np.savez(frozen.with_suffix(".npz"), weights=w, bias=np.float64(b), layer=np.int64(layer))
    return report


def v2_scores(groups: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """The shipped gate (last prompt token, layer 15) at its own flag line, per rendering."""
    from guard.probe import load_probe
    from probes.knowledge import RENDERINGS
    from probes.metrics import auroc

    probe = load_probe("default")
    recipe, gate = probe.manifest.knowledge, probe.knowledge
    assert recipe is not None and gate is not None
    line = float(np.log(recipe.flag / (1 - recipe.flag)))
    out: dict[str, Any] = {}
    z = {
        n: last_token(g, recipe.layer).astype(np.float64) @ gate.weights + gate.bias
        for n, g in groups.items()
    }
    for style in RENDERINGS:
        out[style] = {
            f"{n}_flagged": float(np.mean(z[n][g["styles"] == style] >= line))
            for n, g in groups.items()
        }
    made = np.concatenate([z[n] for n, g in groups.items() if g["made_up"][0] == 1])
    real = np.concatenate([z[n] for n, g in groups.items() if g["made_up"][0] == 0])
    out["auroc"] = auroc(np.r_[np.ones(len(made)), np.zeros(len(real))], np.r_[made, real])
    return out


def heldout_stage(cache: Path, frozen: Path, path: Path, out: Path) -> dict[str, Any]:
    from probes.knowledge import RENDERINGS
    from probes.metrics import auroc

    design = json.loads(frozen.read_text())
    with np.load(frozen.with_suffix(".npz")) as data:
        w, b, layer = data["weights"], float(data["bias"]), int(data["layer"])
    line = design["line_logit"]
    groups = {name: load_group(cache, name) for name in heldout_items(path)}
    scores = {n: prompt_max(g, layer, w, b) for n, g in groups.items()}
    per_style = {
        style: {
            f"{n}_flagged": float(np.mean(scores[n][g["styles"] == style] >= line))
            for n, g in groups.items()
        }
        for style in RENDERINGS
    }
    made = np.concatenate([scores[n] for n, g in groups.items() if g["made_up"][0] == 1])
    real = np.concatenate([scores[n] for n, g in groups.items() if g["made_up"][0] == 0])
    report = {
        "what": f"issue 11 experiment: the v4 gate (frozen {design['frozen_at']}) on "
        f"{path.name}, read once",
        "read_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "v4": {
            "auroc": auroc(np.r_[np.ones(len(made)), np.zeros(len(real))], np.r_[made, real]),
            "made_up_flagged": float(np.mean(made >= line)),
            "real_flagged": float(np.mean(real >= line)),
            "per_rendering": per_style,
        },  # fmt: skip
        "v2": v2_scores(groups),
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def attach_stage(frozen: Path, heldout: Path, directory: Path) -> str:
    """Rewrite the probe at ``directory`` with the frozen v4 gate (every other file byte for
    byte, `bench/knowledge_gate.py`'s `attach`); returns the manifest sha256 to pin."""
    sys.path.insert(0, str(Path(__file__).parent))
    from knowledge_gate import attach  # bench/ is on sys.path

    from guard.probe import GateWeights, KnowledgeRecipe

    design = json.loads(frozen.read_text())
    read = json.loads(heldout.read_text())
    with np.load(frozen.with_suffix(".npz")) as data:
        weights = GateWeights(data["weights"].astype(np.float64), float(data["bias"]))
        layer = int(data["layer"])
    recipe = KnowledgeRecipe(
        feature="residual_max_prompt_token",
        layer=layer,
        hidden_size=int(weights.weights.shape[0]),
        flag=float(1 / (1 + np.exp(-design["line_logit"]))),
        abstain=float(1 / (1 + np.exp(-design["abstain_logit"]))),
        training={
            "feature": f"residual stream after decoder layer {layer} at every prompt token; "
            "prompt_risk = sigmoid(max over the prompt's tokens of the token logit)",
            "labels": "1 = the last token of a word the generator coined for a made-up "
            "entity (seed 0); 0 = every other token of every fit prompt",
            "groups": design["fit_rows"],
            "chosen": design["chosen"],
            "flag_rule": design["line_rule"],
            "abstain_rule": design["abstain_rule"],
            "frozen": "bench/results/knowledge_v4_frozen.json",
        },
        evaluation={"validation": design["validation"], "heldout_set5": read["v4"]},
    )
    return attach(directory, recipe, weights, None, None)


def score_stage(loaded: Any, work: Path) -> None:
    """``<set>.prompt_risk.json`` (``{id: prompt_risk}``) beside every ``<set>.answers.jsonl``
    of ``work``: the shipped probe's gate as the server computes it (`GuardedModel`'s
    gate and capture, one unpadded prompt at a time)."""
    import torch

    from guard.knowledge import KnowledgeGate
    from guard.probe import load_probe
    from probes.collect import read_answers

    gate = KnowledgeGate.from_probe(load_probe("default"), int(loaded.model.config.hidden_size))
    if gate is None:
        raise SystemExit("the shipped probe has no knowledge gate")
    for path in sorted(work.glob("*.answers.jsonl")):
        risks = {}
        with torch.inference_mode(), gate.capture(loaded.model) as residual:
            for record in read_answers(path).values():
                loaded.model(torch.tensor([list(record.prompt_ids)]), logits_to_keep=1)
                risks[record.id] = gate.prompt_risks(residual.take_all())[0]
        out = path.with_name(path.name.replace(".answers.jsonl", ".prompt_risk.json"))
        out.write_text(json.dumps(risks) + "\n", encoding="utf-8")
        log.info("%s: %d prompt risks", out.name, len(risks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stage", choices=("states", "fit", "heldout", "attach", "score"), required=True
    )
    parser.add_argument("--work", type=Path, help="collected answer sets (--stage score)")
    parser.add_argument("--probe", type=Path, help="the probe directory (--stage attach)")
    parser.add_argument("--cache", type=Path, default=ROOT / "work-knowledge-tokens")
    parser.add_argument(
        "--frozen", type=Path, default=ROOT / "bench/results/knowledge_v4_frozen.json"
    )
    parser.add_argument("--set", type=Path, help="the held-out set (--stage heldout)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/knowledge_v4_heldout.json"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.stage == "fit":
        print(json.dumps(fit_stage(args.cache, args.frozen), indent=2)[:4000])
        return 0
    if args.stage == "attach":
        if args.probe is None:
            raise SystemExit("--stage attach needs --probe")
        sha = attach_stage(args.frozen, args.out, args.probe)
        print(f"manifest sha256 {sha}: pin it in guard/shipped.py")
        return 0
    import torch

    from guard.model import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model()
    if args.stage == "states":
        compute_states(loaded, fit_and_val_items(), args.cache)
        return 0
    if args.stage == "score":
        if args.work is None:
            raise SystemExit("--stage score needs --work")
        score_stage(loaded, args.work)
        return 0
    if args.set is None:
        raise SystemExit("--stage heldout needs --set")
    compute_states(loaded, heldout_items(args.set), args.cache)
    print(json.dumps(heldout_stage(args.cache, args.frozen, args.set, args.out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
