"""Long answers and made-up entities (issue 11): which answer verdict does not dilute?

    python bench/longform.py --out bench/results/longform.json [--work work-longform]
        [--stage collect|analyse|all] [--heldout]

Collect: greedy answers with the shipped probe's model for every set of
`probes.longform_data` (TriviaQA short and long form, NQ-open short, made-up entities
from the generator, bench/scope.py's prompts), cached as resumable JSONL under ``--work``,
each with its trace through the shipped probe's `RiskScorer` (token logits, log-probs,
entropies, the prompt's final hidden state) read during generation
(`probes.longform_collect`), or by one teacher-forced pass for answers collected before
(`probes.longform.trace_answers`; the two agree, tests/probes/test_longform.py), cached
as ``<set>.traces.npz``.

Analyse (`bench/longform_analysis.py`): fits every candidate design on the train split
and the generator's seed-0 entities, chooses every threshold on the validation split and
the generator's seed-1 entities, and only then measures on the test split, NQ-open and,
with ``--heldout``, the independent held-out made-up set (whose first use is recorded in
the JSON). Threads: one torch thread by default (``--threads``); on a shared 2-core machine
two threads spinning against another process are several times slower than one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "bench" / "data" / "madeup_heldout.jsonl"
SCOPE_PROMPTS = ROOT / "bench" / "data" / "scope_prompts.jsonl"
log = logging.getLogger("longform")


def collect(work: Path, names: list[str] | None, heldout: Path | None, batch_size: int) -> None:
    """Answers and traces of every set (resumable: finished sets are skipped)."""
    from guard.generation import GuardedModel
    from guard.model import load_model
    from guard.probe import load_probe
    from probes.longform_data import (
        NQ_OPEN,
        TRIVIAQA,
        heldout_sets,
        scope_sets,
        standard_sets,
    )
    from probes.madeup import Vocabulary

    guarded = GuardedModel(load_model(), load_probe("default"))
    if guarded.scorer is None:
        raise RuntimeError("the shipped probe did not load")
    sets = standard_sets(Vocabulary.from_qa_files([TRIVIAQA, NQ_OPEN]))
    nq = sets.pop("nq_short")  # the largest set goes last
    sets.update(scope_sets(SCOPE_PROMPTS))
    if heldout is not None:
        sets.update(heldout_sets(heldout))
    sets["nq_short"] = nq
    for name, (items, recipe) in sets.items():
        if name == "nq_short":  # needs the train answers: built once they exist
            sets_known = known_entity_set(work)
            if sets_known is not None and (not names or "known_long" in names):
                _collect_one(guarded, work, "known_long", *sets_known, batch_size)
        if names and name not in names:
            continue
        _collect_one(guarded, work, name, items, recipe, batch_size)


def known_entity_set(work: Path) -> tuple[list[Any], Any] | None:
    """Long-form requests ("Tell me about Charles Dickens.") about the real entities the
    model named correctly in TriviaQA *train* answers: a validation stand-in for real
    long-form traffic (no labels; its flag rate is the price a design pays there)."""
    from probes.collect import read_answers
    from probes.datasets import QAItem
    from probes.longform_data import PLAIN_LONG, real_entity
    from probes.madeup_templates import generic_long_requests

    paths = [work / f"tqa_{form}_train.answers.jsonl" for form in ("short", "long")]
    if not all(path.exists() for path in paths):
        return None
    records = {**read_answers(paths[1]), **read_answers(paths[0])}
    items, seen = [], set()
    for k, record in enumerate(sorted(records.values(), key=lambda r: r.id)):
        name = real_entity(record.answers) if record.correct else None
        if name is None or name in seen:
            continue
        seen.add(name)
        requests = generic_long_requests(name)
        items.append(QAItem(id=f"known-{record.id}", question=requests[k % len(requests)],
                            answers=[name]))  # fmt: skip
    return items, PLAIN_LONG


def _collect_one(
    guarded: Any, work: Path, name: str, items: list[Any], recipe: Any, batch_size: int
) -> None:
    """One set's answers and traces (see the module docstring)."""
    from probes.collect import collect_answers
    from probes.longform import save_traces, trace_answers
    from probes.longform_collect import collect_traced

    answers = work / f"{name}.answers.jsonl"
    traces_path = work / f"{name}.traces.npz"
    started = time.perf_counter()
    if answers.exists() and not (work / f"{name}.traces.jsonl").exists():
        # answered by collect_answers earlier: teacher-force once for the traces
        records = collect_answers(guarded.loaded, items, answers, recipe, batch_size=batch_size)
        if not traces_path.exists():
            kept = [r for r in records if r.response_ids]
            traces = trace_answers(guarded.loaded, guarded.scorer, kept, batch_size=16)
            save_traces(traces_path, [r.id for r in kept], traces)
    else:
        records = collect_traced(
            guarded.loaded, guarded.scorer, items, work, name, recipe, batch_size
        )
    log.info("%s: %d answers in %.0f s", name, len(records), time.perf_counter() - started)
    if name == "tqa_long_train":  # all the knowledge probe's extra rows need
        collect_prompt_states(guarded, work)


def collect_prompt_states(guarded: Any, work: Path) -> None:
    """Prompt-only hidden states the answer sets do not hold (``prompt_states.npz``):
    TriviaQA train questions as users type them (labelled later by their short answer),
    and long-form requests about the real entities the model named correctly in train
    answers ("known" examples for the knowledge probe)."""
    import numpy as np

    from probes.collect import read_answers
    from probes.longform_data import real_entity
    from probes.madeup_templates import generic_long_requests
    from probes.scope import hidden_states, question_variants

    path = work / "prompt_states.npz"
    if path.exists():
        return
    ids: list[str] = []
    conversations: list[list[dict[str, str]]] = []
    train = read_answers(work / "tqa_short_train.answers.jsonl")
    recipe = guarded.prompt_recipe
    for record in train.values():
        plain, casual, _ = question_variants(record.question, recipe)
        ids += [f"{record.id}|plain", f"{record.id}|casual"]
        conversations += [plain, casual]
    known = {**read_answers(work / "tqa_long_train.answers.jsonl"), **train}
    for record in known.values():
        name = real_entity(record.answers) if record.correct else None
        if name is None:
            continue
        for k, request in enumerate(generic_long_requests(name)[::3]):
            ids.append(f"{record.id}|known{k}")
            conversations.append([{"role": "user", "content": request}])
    hidden = hidden_states(guarded.loaded, conversations, batch_size=32)
    np.savez(path, ids=np.array(ids, dtype=np.str_), hidden=hidden.astype(np.float64))
    log.info("prompt states: %d", len(ids))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=ROOT / "work-longform")
    parser.add_argument("--stage", choices=("collect", "analyse", "all"), default="all")
    parser.add_argument("--sets", nargs="*", help="collect only these sets")
    parser.add_argument("--heldout", action="store_true", help="also the held-out made-up set")
    parser.add_argument("--heldout-file", type=Path, default=HELDOUT)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.heldout:
        _record_heldout_use(args.work)
    if args.stage in ("collect", "all"):
        heldout = args.heldout_file if args.heldout else None
        collect(args.work, args.sets, heldout, args.batch_size)
    if args.stage in ("analyse", "all"):
        sys.path.insert(0, str(Path(__file__).parent))
        from longform_analysis import analyse

        report: dict[str, Any] = analyse(args.work, heldout=args.heldout)
        report["heldout_first_used"] = _heldout_use(args.work)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(report.get("table", ""))
    return 0


def _record_heldout_use(work: Path) -> None:
    """The first time the held-out set is read, kept for the report (never overwritten)."""
    stamp = work / "heldout_first_used.txt"
    if not stamp.exists():
        stamp.write_text(datetime.now(UTC).isoformat(timespec="seconds"), encoding="utf-8")


def _heldout_use(work: Path) -> str | None:
    stamp = work / "heldout_first_used.txt"
    return stamp.read_text(encoding="utf-8").strip() if stamp.exists() else None


if __name__ == "__main__":
    sys.exit(main())
