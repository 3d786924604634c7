"""Closed-book QA questions with gold aliases, and the deterministic train/val/test split.

Sources: JSON Lines like ``../shared/data`` (``{"id", "question", "answers"}`` per line),
Parquet in the Hugging Face TriviaQA ``rc.nocontext`` schema, or the ``trivia_qa`` dataset
itself when the ``datasets`` package is installed and the hub is reachable.

    items = load_questions("../shared/data/triviaqa/triviaqa.jsonl", limit=100)
    split_of(items[0].id)  # "train" | "val" | "test"
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guard.errors import GuardError

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
PARQUET_SUFFIXES = (".parquet", ".pq")


class DatasetError(GuardError, ValueError):
    """A QA file or dataset could not be read: says which file, which line and why."""


class QAItem(BaseModel):
    """One question with its gold answer and aliases (raw and normalised forms mixed)."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answers: list[str] = Field(min_length=1)


def split_of(item_id: str) -> Split:
    """Deterministic split of an id: ``sha256(id) mod 100`` < 70 train, < 85 val, else test."""
    bucket = int(hashlib.sha256(item_id.encode("utf-8")).hexdigest(), 16) % 100
    if bucket < 70:
        return "train"
    return "val" if bucket < 85 else "test"


def load_questions(path: str | Path, limit: int | None = None) -> list[QAItem]:
    """The first ``limit`` questions (all when None) of a JSONL or TriviaQA Parquet file.

    Raises DatasetError naming the file and line (row, for Parquet) of a bad record, and
    of a repeated id (ids key resumable runs and splits, so they must be unique).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetError(f"QA file not found: {file}")
    if limit is not None and limit < 0:
        raise DatasetError(f"limit must be >= 0, got {limit}")
    if file.suffix.lower() in PARQUET_SUFFIXES:
        return _collect(_parquet_rows(file), _triviaqa_item, str(file), "row", limit)
    return _collect(_jsonl_rows(file), _jsonl_item, str(file), "line", limit)


def load_hf_dataset(
    name: str = "trivia_qa",
    config: str = "rc.nocontext",
    split: str = "validation",
    limit: int | None = None,
) -> list[QAItem]:
    """Questions of a Hugging Face dataset in the TriviaQA schema (needs ``datasets`` + network)."""
    try:
        import datasets  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise DatasetError(
            "loading a Hugging Face dataset needs the 'datasets' package: pip install datasets "
            "(or download the data once and pass a JSONL/Parquet file to load_questions)"
        ) from exc
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub raises many kinds; all mean the same to the caller
        raise DatasetError(
            f"could not load Hugging Face dataset {name}/{config} split {split}: {exc}. "
            "It needs network access (HF_HUB_OFFLINE must not be 1) or a local cache; "
            "offline, pass a JSONL or Parquet file to load_questions instead"
        ) from exc
    rows = enumerate((dict(row) for row in data), start=1)
    return _collect(rows, _triviaqa_item, f"{name}/{config}[{split}]", "row", limit)


def _collect(
    rows: Iterable[tuple[int, Mapping[str, Any]]],
    parse: Callable[[Mapping[str, Any]], QAItem],
    source: str,
    where: str,
    limit: int | None,
) -> list[QAItem]:
    items: list[QAItem] = []
    seen: dict[str, int] = {}
    for number, row in rows:
        if limit is not None and len(items) >= limit:
            break
        try:
            item = parse(row)
        except (ValidationError, KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{source}, {where} {number}: bad QA record: {exc}") from exc
        if item.id in seen:
            raise DatasetError(
                f"{source}, {where} {number}: id {item.id!r} repeats {where} {seen[item.id]}; "
                "ids must be unique"
            )
        seen[item.id] = number
        items.append(item)
    return items


def _jsonl_rows(file: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{file}, line {number}: not valid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise DatasetError(
                    f"{file}, line {number}: expected a JSON object, got {type(row).__name__}"
                )
            yield number, row


def _parquet_rows(file: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DatasetError(f"{file}: not a readable Parquet file: {exc}") from exc
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _jsonl_item(row: Mapping[str, Any]) -> QAItem:
    return QAItem.model_validate(row)


def _triviaqa_item(row: Mapping[str, Any]) -> QAItem:
    """TriviaQA schema: ``question``, ``question_id``, ``answer`` {value, aliases, ...}."""
    answer = row["answer"]
    if not isinstance(answer, Mapping):
        raise TypeError(f"'answer' must be a struct, got {type(answer).__name__}")
    candidates = [answer.get("value")]
    for key in ("aliases", "normalized_value", "normalized_aliases"):
        value = answer.get(key)
        candidates.extend(value if isinstance(value, list) else [value])
    answers = list(dict.fromkeys(c for c in candidates if isinstance(c, str) and c.strip()))
    return QAItem(id=row["question_id"], question=row["question"], answers=answers)
