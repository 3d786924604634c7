"""Answer collection: greedy (and optionally sampled) answers to QA items, judged, resumable.

Questions are put to the model with a `PromptRecipe` (chat template or few-shot completion,
left padding; answers end as the decode loop ends them: `guard.sampling.response_tokens`),
in batches sorted by prompt length. Every finished question is appended to a JSONL file
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from tqdm import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.errors import GuardError
from guard.model import LoadedModel, encode_chats, end_token_ids, left_pad, pad_token_id
from guard.probe import PromptRecipe
from guard.sampling import cut_at_stop, response_tokens
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
    """Records for ``items`` in order of prompt length, one batch at a time."""
    tokenizer = loaded.tokenizer
    conversations = [recipe.messages(item.question) for item in items]
    prompts, _, _ = encode_chats(tokenizer, conversations, recipe)
    order = sorted(range(len(items)), key=lambda i: (len(prompts[i]), i))
    stops = end_token_ids(loaded.model, tokenizer)
    generated = 0
    started = time.perf_counter()
    with tqdm(total=len(items), desc="collect", unit="q") as progress:
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            batch = [prompts[i] for i in rows]
            greedy = _batch_generate(loaded, batch, stops, recipe, None)
            sampled = [
                _batch_generate(loaded, batch, stops, recipe, (temperature, _seed(seed, s, batch)))
                for s in range(samples)
            ]
            for j, i in enumerate(rows):
                yield _record(
                    loaded, recipe, items[i], prompts[i], greedy[j], [s[j] for s in sampled]
                )
            generated += sum(len(ids) + stop for ids, stop in greedy)
            generated += sum(len(ids) + stop for s in sampled for ids, stop in s)
            progress.update(len(rows))
            progress.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.0f}")


def _seed(seed: int, sample: int, batch: list[list[int]]) -> int:
    """A seed for one sampled pass of one batch, fixed by the batch's prompts."""
    digest = hashlib.sha256(repr((seed, sample, batch)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _batch_generate(
    loaded: LoadedModel,
    prompts: list[list[int]],
    stops: set[int],
    recipe: PromptRecipe,
    sampling: tuple[float, int] | None,
) -> list[tuple[list[int], bool]]:
    """``(response ids, whether the answer stopped)`` per prompt (`response_tokens`).

    ``sampling`` = ``(temperature, seed)`` samples from the full distribution (no top-k or
    top-p); None is greedy.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = pad_token_id(tokenizer)
    input_ids, attention_mask = left_pad(prompts, pad_id)
    device = model.device
    options: dict[str, Any] = {
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    if sampling is not None:
        options = {"do_sample": True, "temperature": sampling[0], "top_p": 1.0, "top_k": 0}
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        if sampling is not None:
            torch.manual_seed(sampling[1])
        output = model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=recipe.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=sorted(stops),
            **options,
            **({"stop_strings": list(recipe.stop), "tokenizer": tokenizer} if recipe.stop else {}),
        )
    rows = output[:, input_ids.shape[1] :].tolist()
    return [response_tokens(tokenizer, row, stops, recipe.stop) for row in rows]


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
