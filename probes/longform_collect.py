"""Greedy answers and their traces in one pass: generation under the probe's capture.

`probes.collect.collect_answers` generates, and `probes.longform.trace_answers` then
teacher-forces every answer again to read its neurons: on a CPU that second pass costs
about half as much again as the generation. Here `model.generate` runs inside a
`NeuronCapture` of the probe's neurons (which concatenates the passes of a KV-cached
generation into ``[batch, prompt + steps, k]``, aligned with the input ids) and a
`FinalHiddenCapture` (its state after the prefill pass is the prompt's final hidden state),
with the raw logits of every step (``output_logits``) for the log-probs and entropies
(`guard.scoring.logit_statistics`). One more token than ``max_new_tokens`` is generated so
that the last kept token is also fed once (its CETT is read where it is the input). Records
are the `AnswerRecord`s `collect_answers` writes; traces go to ``<name>.traces.jsonl``
(resumable) and, once complete, to ``<name>.traces.npz`` (`probes.longform.save_traces`).

    records, traces = collect_traced(loaded, scorer, items, work, "madeup_val_long", recipe)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from guard.model import LoadedModel, encode_chats, end_token_ids, left_pad
from guard.neurons import NeuronCapture
from guard.probe import PromptRecipe
from guard.scope import FinalHiddenCapture
from guard.scoring import RiskScorer, logit_statistics
from probes.collect import AnswerRecord, read_answers, rejudge
from probes.datasets import QAItem, split_of
from probes.longform import AnswerTrace, save_traces


def _read_traces(path: Path) -> dict[str, AnswerTrace]:
    out: dict[str, AnswerTrace] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a killed run's last line
            continue
        out[row["id"]] = AnswerTrace(*(np.asarray(row[k], dtype=np.float64) for k in "sleh"))
    return out


def _generate_traced(
    loaded: LoadedModel, scorer: RiskScorer, prompts: list[list[int]], recipe: PromptRecipe
) -> list[tuple[list[int], bool, AnswerTrace | None]]:
    """``(response ids, stopped, trace or None when empty)`` per prompt of one batch."""
    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    stops = end_token_ids(model, tokenizer)
    input_ids, attention_mask = left_pad(prompts, pad_id)
    width, limit = input_ids.shape[1], recipe.max_new_tokens
    first_hidden: list[torch.Tensor] = []
    with (
        torch.inference_mode(),
        NeuronCapture(model, scorer.neuron_selection()) as capture,
        FinalHiddenCapture(model) as hidden,
    ):
        handle = model.register_forward_hook(
            lambda *_: None if first_hidden else first_hidden.append(hidden.take())
        )
        try:
            out = model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=limit + 1,
                do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=pad_id, eos_token_id=sorted(stops),
                return_dict_in_generate=True, output_logits=True,
            )  # fmt: skip
        finally:
            handle.remove()
        cett = dict(capture.items())  # {layer: [batch, width + fed steps, k]}
    logits = torch.stack(out.logits, dim=1)  # [batch, steps, vocab], raw
    results: list[tuple[list[int], bool, AnswerTrace | None]] = []
    for row, generated in enumerate(out.sequences[:, width:].tolist()):
        cut = next((k for k, token in enumerate(generated[:limit]) if token in stops), None)
        response = generated[:limit] if cut is None else generated[:cut]
        if not response:
            results.append((response, cut is not None, None))
            continue
        n = len(response)
        lp, ent = logit_statistics(logits[row, :n], torch.as_tensor(response))
        rows = {layer: values[row : row + 1, width : width + n] for layer, values in cett.items()}
        trace = AnswerTrace(
            token_logits=scorer.measure(scorer.flatten(rows))[0, :, 0].double().numpy(),
            logprobs=lp.double().numpy(),
            entropies=ent.double().numpy(),
            prompt_hidden=first_hidden[0][row].double().numpy(),
        )
        results.append((response, cut is not None, trace))
    return results


def collect_traced(
    loaded: LoadedModel,
    scorer: RiskScorer,
    items: list[QAItem],
    work: Path,
    name: str,
    recipe: PromptRecipe,
    batch_size: int = 32,
) -> list[AnswerRecord]:
    """Answer, judge and trace every item (resumable); writes ``<name>.traces.npz`` at the
    end. Empty answers are recorded but have no trace."""
    answers_path, traces_path = work / f"{name}.answers.jsonl", work / f"{name}.traces.jsonl"
    meta = work / f"{name}.answers.jsonl.meta.json"
    setup: dict[str, Any] = {"model_id": loaded.model_id, "recipe": recipe.identity(),
                             "traced": True}  # fmt: skip
    if meta.exists() and json.loads(meta.read_text()) != setup:
        raise ValueError(f"{answers_path} was written with another set-up: remove it first")
    meta.write_text(json.dumps(setup))
    done = read_answers(answers_path, repair=True)
    traces = _read_traces(traces_path)
    todo = [
        i for i in items if i.id not in done or (done[i.id].response_ids and i.id not in traces)
    ]
    prompts, _, _ = encode_chats(loaded.tokenizer, [recipe.messages(i.question) for i in todo])
    order = sorted(range(len(todo)), key=lambda i: (len(prompts[i]), i))
    with answers_path.open("a") as answers_out, traces_path.open("a") as traces_out:
        for first in tqdm(range(0, len(order), batch_size), desc=name, unit="batch"):
            rows = order[first : first + batch_size]
            batch = _generate_traced(loaded, scorer, [prompts[i] for i in rows], recipe)
            for i, (response, stopped, trace) in zip(rows, batch, strict=True):
                record = _record(loaded, todo[i], prompts[i], response, stopped)
                answers_out.write(record.model_dump_json() + "\n")
                done[record.id] = record
                if trace is not None:
                    traces[record.id] = trace
                    arrays = (trace.token_logits, trace.logprobs, trace.entropies,
                              trace.prompt_hidden)  # fmt: skip
                    row = {"id": record.id}
                    row.update({k: a.tolist() for k, a in zip("sleh", arrays, strict=True)})
                    traces_out.write(json.dumps(row) + "\n")
            answers_out.flush()
            traces_out.flush()
    records = [done[i.id] for i in items]
    kept = [r for r in records if r.response_ids]
    save_traces(work / f"{name}.traces.npz", [r.id for r in kept], [traces[r.id] for r in kept])
    return records


def _record(
    loaded: LoadedModel, item: QAItem, prompt: list[int], response: list[int], stopped: bool
) -> AnswerRecord:
    record = AnswerRecord(
        id=item.id, question=item.question, answers=item.answers, split=split_of(item.id),
        prompt_ids=prompt, response_ids=response,
        response=str(loaded.tokenizer.decode(response, skip_special_tokens=True)),
        stopped=stopped, correct=False, alias=None, span=None,
    )  # fmt: skip
    return rejudge(loaded.tokenizer, record)
