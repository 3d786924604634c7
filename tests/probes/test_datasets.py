"""QA loaders (JSONL, TriviaQA Parquet, Hugging Face) and the deterministic split."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from probes.datasets import DatasetError, QAItem, load_hf_dataset, load_questions, split_of
from tests.conftest import TRIVIAQA


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_loads_shared_triviaqa_in_file_order() -> None:
    items = load_questions(TRIVIAQA, limit=5)
    with open(TRIVIAQA, encoding="utf-8") as handle:
        first = [json.loads(next(handle)) for _ in range(5)]
    assert [item.id for item in items] == [row["id"] for row in first]
    assert items[0] == QAItem(**first[0])
    assert all(item.answers for item in items)


def test_limit_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    rows = [{"id": f"q{i}", "question": f"Q{i}?", "answers": [f"A{i}"]} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert [item.id for item in load_questions(path)] == ["q0", "q1", "q2", "q3"]
    assert [item.id for item in load_questions(path, limit=2)] == ["q0", "q1"]
    assert load_questions(path, limit=0) == []


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a", "list"]', "expected a JSON object"),
        ('{"id": "x", "question": "Q?"}', "answers"),
        ('{"id": "x", "question": "Q?", "answers": []}', "answers"),
        ('{"id": "x", "question": "", "answers": ["A"]}', "question"),
        ('{"id": "x", "question": "Q?", "answers": "A"}', "answers"),
    ],
)
def test_bad_jsonl_row_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "ok", "question": "Q?", "answers": ["A"]})
    path.write_text(f"{good}\n{good.replace('ok', 'ok2')}\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=message) as caught:
        load_questions(path)
    assert isinstance(caught.value, ValueError)
    assert str(path) in str(caught.value) and "line 3" in str(caught.value)


def test_repeated_id_is_an_error(tmp_path: Path) -> None:
    row = {"id": "dup", "question": "Q?", "answers": ["A"]}
    path = write_jsonl(tmp_path / "dup.jsonl", [row, {**row, "id": "other"}, row])
    with pytest.raises(DatasetError, match="line 3: id 'dup' repeats line 1"):
        load_questions(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")


def triviaqa_table(rows: list[dict[str, object]]) -> pa.Table:
    return pa.Table.from_pylist(rows)


def test_triviaqa_parquet_schema(tmp_path: Path) -> None:
    rows = [
        {
            "question": "Where did Anne Frank die?",
            "question_id": "tc_2390",
            "question_source": "http://example",
            "answer": {
                "aliases": ["Belsen", "Bergen-Belsen"],
                "normalized_aliases": ["belsen", "bergen belsen"],
                "matched_wiki_entity_name": "",
                "normalized_matched_wiki_entity_name": "",
                "normalized_value": "belsen",
                "type": "WikipediaEntity",
                "value": "Belsen",
            },
        },
        {
            "question": "Second?",
            "question_id": "q2",
            "question_source": "",
            "answer": {
                "aliases": [],
                "normalized_aliases": [],
                "matched_wiki_entity_name": "",
                "normalized_matched_wiki_entity_name": "",
                "normalized_value": "two",
                "type": "",
                "value": "Two",
            },
        },
    ]
    path = tmp_path / "validation.parquet"
    pq.write_table(triviaqa_table(rows), path)
    items = load_questions(path)
    assert items[0] == QAItem(
        id="tc_2390",
        question="Where did Anne Frank die?",
        answers=["Belsen", "Bergen-Belsen", "belsen", "bergen belsen"],
    )
    assert items[1].answers == ["Two", "two"]
    assert len(load_questions(path, limit=1)) == 1


def test_bad_parquet_row_names_file_and_row(tmp_path: Path) -> None:
    answer = {"value": "A", "aliases": ["A"], "normalized_aliases": ["a"]}
    rows = [
        {"question": "Q1?", "question_id": "q1", "answer": answer},
        {"question": "Q2?", "question_id": "q2", "answer": None},
    ]
    path = tmp_path / "bad.parquet"
    pq.write_table(triviaqa_table(rows), path)
    with pytest.raises(DatasetError, match="row 2") as caught:
        load_questions(path)
    assert str(path) in str(caught.value)


def test_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="Parquet"):
        load_questions(path)


def test_hf_dataset_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DatasetError, match="pip install datasets"):
        load_hf_dataset()


def test_hf_dataset_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")

    def load_dataset(*args: object, **kwargs: object) -> None:
        raise ConnectionError("offline mode is enabled")

    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DatasetError, match="trivia_qa/rc.nocontext.*network"):
        load_hf_dataset()


def test_hf_dataset_rows_use_the_triviaqa_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")
    row = {"question": "Q?", "question_id": "q1", "answer": {"value": "A", "aliases": ["Ay"]}}
    fake.load_dataset = lambda *a, **k: [row, {**row, "question_id": "q2"}]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    items = load_hf_dataset(limit=1)
    assert items == [QAItem(id="q1", question="Q?", answers=["A", "Ay"])]


def test_split_of_follows_the_formula() -> None:
    for item_id in ["tc_3", "nq_0", "x", "ünïcode"]:
        bucket = int(hashlib.sha256(item_id.encode()).hexdigest(), 16) % 100
        expected = "train" if bucket < 70 else "val" if bucket < 85 else "test"
        assert split_of(item_id) == expected


def test_split_proportions_on_the_shared_data() -> None:
    ids = [item.id for item in load_questions(TRIVIAQA)]
    counts = Counter(split_of(item_id) for item_id in ids)
    assert set(counts) == {"train", "val", "test"}
    assert abs(counts["train"] / len(ids) - 0.70) < 0.03
    assert abs(counts["val"] / len(ids) - 0.15) < 0.03
    assert abs(counts["test"] / len(ids) - 0.15) < 0.03
