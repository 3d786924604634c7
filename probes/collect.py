"""Answer collection: greedy (and optionally sampled) answers to QA items, judged, resumable.

Questions are put to the model with a `PromptRecipe` (chat template or few-shot completion)
and answered by the serving decode loop, unguarded, as one running batch that new prompts
join as answers finish (shortest prompts first). Every finished question is appended to a JSONL file
at once, so a killed run resumes where it stopped; a sidecar ``<out>.meta.json`` records
the recipe and model so that a resumed run cannot silently mix two set-ups.

    records = collect_answers(loaded, items, Path("work/answers.jsonl"), PromptRecipe())
    records[0].response, records[0].correct, records[0].span
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from tqdm import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.decoding import GenerationRequest
from guard.errors import GuardError
from guard.generation import CollectingSink, GuardedModel
from guard.model import LoadedModel, encode_chats
from guard.probe import PromptRecipe
from guard.sampling import SamplingParams, cut_at_stop
from probes.datasets import QAItem, Split, split_of
from probes.judge import answer_token_span, judge

log = logging.getLogger(__name__)


class CollectError(GuardError):
    """An answers file cannot be resumed (corrupt line, or written with another set-up)."""


class SampleRecord(BaseModel):
    """One sampled (temperature) answer and its verdict."""

    text: str
    correct: bool


class AnswerRecord(BaseModel):
    """One question's greedy answer, its verdict and answer token span, and any samples.

    ``response_ids`` are the generated tokens up to and excluding the first end token;
    ``refusal``: the answer declines to answer (`probes.judge.is_refusal`), which is never
    a hallucination; ``span`` is the half-open range of ``response_ids`` holding the
    matched alias (correct answers only); ``consistent``: greedy and every sample agree on
    correctness.
    """

    id: str
    question: str
    answers: list[str]
    split: Split
    prompt_ids: list[int]
    response_ids: list[int]
    response: str
    stopped: bool
    correct: bool
    alias: str | None
    span: tuple[int, int] | None
    samples: list[SampleRecord] = []
    consistent: bool = True
    refusal: bool = False

    @property
    def hallucinated(self) -> bool:
        """The label: neither correct nor a refusal."""
        return not self.correct and not self.refusal


def collect_answers(
    loaded: LoadedModel,
    items: list[QAItem],
    out_path: Path,
    recipe: PromptRecipe,
    batch_size: int = 32,
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[AnswerRecord]:
    """Answer, judge and record every item; returns the records in ``items`` order.

    Items already in ``out_path`` (from an earlier, possibly killed run with the same
    set-up) are not asked again.
    """
    if batch_size < 1 or samples < 0 or temperature <= 0:
        raise ValueError("need batch_size >= 1, samples >= 0 and temperature > 0")
    out_path = Path(out_path)
    setup = {
        "model_id": loaded.model_id,
        "down_proj_sha256": loaded.fingerprint.down_proj_sha256,
        "recipe": recipe.identity(),
        "samples": samples,
        "temperature": temperature,
        "seed": seed,
    }
    _check_setup(out_path, setup)
    wanted = {item.id for item in items}
    done = {
        rid: rejudge(loaded.tokenizer, record)  # labels always follow the current judge
        for rid, record in read_answers(out_path, repair=True).items()
        if rid in wanted
    }
    todo = [item for item in items if item.id not in done]
    if done:
        log.info(
            "%s: resuming, %d of %d questions already answered", out_path, len(done), len(items)
        )
    if todo:
        with out_path.open("a", encoding="utf-8") as sink:
            for record in _generate(loaded, todo, recipe, batch_size, samples, temperature, seed):
                sink.write(record.model_dump_json() + "\n")
                sink.flush()
                done[record.id] = record
    return [done[item.id] for item in items]


def read_answers(path: Path, *, repair: bool = False) -> dict[str, AnswerRecord]:
    """Records of an answers file by id. A truncated last line (killed run) is ignored,
    and with ``repair`` cut off so that appending continues on a clean line."""
    path = Path(path)
    if not path.exists():
        return {}
    records: dict[str, AnswerRecord] = {}
    good_bytes = 0
    with path.open("rb") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = AnswerRecord.model_validate_json(line)
        except ValidationError as exc:
            if number == len(lines):  # the line a killed run was writing
                log.warning("%s: ignoring a truncated last line (%d bytes)", path, len(line))
                break
            raise CollectError(f"{path}, line {number}: not an answer record: {exc}") from exc
        if not line.endswith(b"\n"):  # complete JSON but no newline: keep it, end the line
            line += b"\n"
            if repair:
                with path.open("ab") as handle:
                    handle.write(b"\n")
        records[record.id] = record
        good_bytes += len(line)
    if repair and good_bytes < path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    return records


def _check_setup(out_path: Path, setup: dict[str, Any]) -> None:
    """Refuse to resume a file written with another model, recipe or sampling set-up."""
    meta = out_path.with_name(out_path.name + ".meta.json")
    if meta.exists() and out_path.exists():
        previous = json.loads(meta.read_text(encoding="utf-8"))
        if previous != setup:
            diff = sorted(k for k in setup if previous.get(k) != setup[k])
            raise CollectError(
                f"{out_path} was written with a different set-up ({', '.join(diff)} differ): "
                "use another output file, or delete it to start over"
            )
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(setup, indent=2), encoding="utf-8")


def _generate(
    loaded: LoadedModel,
    items: list[QAItem],
    recipe: PromptRecipe,
    batch_size: int,
    samples: int,
    temperature: float,
    seed: int,
) -> Iterator[AnswerRecord]:
    """Records for ``items`` as they finish, decoded by the serving loop.

    Every item's greedy answer and samples are rows of one running batch
    (`guard.livebatch.LiveBatch`, unguarded): at most ``batch_size`` rows, prompts queued
    shortest first, and a finished row's place goes to the next prompt at the next step,
    so a batch never waits for its longest answer. Answers are the ones the server gives
    (same decode loop, same end tokens and stop strings); a sample's seed depends on its
    item's prompt only, so it does not change with batching or resuming.
    """
    tokenizer = loaded.tokenizer
    conversations = [recipe.messages(item.question) for item in items]
    prompts, _, _ = encode_chats(tokenizer, conversations, recipe)
    order = sorted(range(len(items)), key=lambda i: (len(prompts[i]), i))
    greedy = SamplingParams(max_tokens=recipe.max_new_tokens, temperature=0.0, stop=recipe.stop)
    queue: deque[tuple[int, SamplingParams]] = deque()
    for i in order:
        queue.append((i, greedy))
        for s in range(samples):
            queue.append(
                (i, replace(greedy, temperature=temperature, seed=_seed(seed, s, prompts[i])))
            )
    batch = GuardedModel(loaded, None).live_batch(prefill_tokens=None)
    sinks: dict[int, list[CollectingSink]] = {}
    generated, started = 0, time.perf_counter()
    with tqdm(total=len(items), desc="collect", unit="q") as progress:
        while queue or batch:
            while queue and len(batch) < batch_size:
                i, params = queue.popleft()
                sink = CollectingSink()
                sinks.setdefault(i, []).append(sink)
                batch.add([GenerationRequest(prompts[i], params, sink)])
            batch.step()
            for i in [i for i, rows in sinks.items() if len(rows) > samples and _all_done(rows)]:
                results = [_answer(sink) for sink in sinks.pop(i)]
                yield _record(loaded, recipe, items[i], prompts[i], results[0], results[1:])
                generated += sum(len(ids) + stop for ids, stop in results)
                progress.update(1)
            progress.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.0f}")


def _all_done(sinks: list[CollectingSink]) -> bool:
    return all(sink.result is not None for sink in sinks)


def _answer(sink: CollectingSink) -> tuple[list[int], bool]:
    """``(response ids, whether the answer stopped)``: an end token or a stop string, not
    the length limit (the decode loop's own result)."""
    result = sink.result
    if result is None:
        raise RuntimeError("a collected answer ended without a result")
    return result.token_ids, result.finish_reason == "stop"


def _seed(seed: int, sample: int, prompt: list[int]) -> int:
    """The seed of one sample of one prompt."""
    digest = hashlib.sha256(repr((seed, sample, prompt)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _record(
    loaded: LoadedModel,
    recipe: PromptRecipe,
    item: QAItem,
    prompt_ids: list[int],
    greedy: tuple[list[int], bool],
    sampled: list[tuple[list[int], bool]],
) -> AnswerRecord:
    tokenizer = loaded.tokenizer
    response_ids, stopped = greedy

    def text(ids: list[int]) -> str:  # the answer text, cut at a stop string
        return cut_at_stop(str(tokenizer.decode(ids, skip_special_tokens=True)), recipe.stop)[0]

    record = AnswerRecord(
        id=item.id,
        question=item.question,
        answers=item.answers,
        split=split_of(item.id),
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        response=text(response_ids),
        stopped=stopped,
        correct=False,
        alias=None,
        span=None,
        samples=[SampleRecord(text=text(ids), correct=False) for ids, _ in sampled],
    )
    return rejudge(tokenizer, record)


def rejudge(tokenizer: PreTrainedTokenizerBase, record: AnswerRecord) -> AnswerRecord:
    """``record`` with its verdict, answer span and sample verdicts from the judge."""
    verdict = judge(record.response, record.answers, record.question)
    span = (
        answer_token_span(tokenizer, record.response_ids, verdict.char_span)
        if verdict.correct
        else None
    )
    samples = [
        SampleRecord(text=s.text, correct=judge(s.text, record.answers, record.question).correct)
        for s in record.samples
    ]
    return record.model_copy(
        update={
            "correct": verdict.correct,
            "refusal": verdict.refusal,
            "alias": verdict.alias,
            "span": span,
            "samples": samples,
            "consistent": all(s.correct == verdict.correct for s in samples),
        }
    )
