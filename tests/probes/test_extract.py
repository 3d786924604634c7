"""Feature extraction: values against a manual CETT computation, shards, resume, FeatureStore."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import probes.extract as extract_module
from guard.model import LoadedModel, encode_chats
from guard.neurons import compute_cett, find_mlp_layers
from guard.probe import PromptRecipe
from probes.collect import AnswerRecord, collect_answers
from probes.datasets import load_questions, split_of
from probes.extract import KINDS, FeatureStore, FeatureStoreError, extract_features
from tests.conftest import TRIVIAQA
from tests.fixtures.models import tiny_loaded

# (response text, answer token span, correct, consistent); "" has no tokens and is skipped
ANSWERS = [
    ("Paris", (0, 1), True, True),
    ("It was in Paris, France.", (4, 6), True, False),
    ("No idea", None, False, True),
    ("", None, False, True),
    ("Belsen", (0, 99), True, True),  # span covers everything: other_mean is NaN
    ("William Shakespeare wrote it in 1600.", None, False, False),
    ("Café", (0, 1), True, True),
]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded(seed=5, tokenizer="bpe", sharpen=False)


def make_records(loaded: LoadedModel) -> list[AnswerRecord]:
    tokenizer = loaded.tokenizer
    questions = [f"Question number {i}?" * (1 + i % 3) for i in range(len(ANSWERS))]
    prompts, _, _ = encode_chats(tokenizer, [PromptRecipe().messages(q) for q in questions])
    records = []
    for i, ((text, span, correct, consistent), prompt) in enumerate(
        zip(ANSWERS, prompts, strict=True)
    ):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if span is not None:
            span = (span[0], min(span[1], len(ids)))
        records.append(
            AnswerRecord(
                id=f"a{i}",
                question=questions[i],
                answers=["x"],
                split=split_of(f"a{i}"),
                prompt_ids=prompt,
                response_ids=ids,
                response=text,
                stopped=True,
                correct=correct,
                alias="x" if correct else None,
                span=span,
                consistent=consistent,
            )
        )
    return records


def manual_features(loaded: LoadedModel, record: AnswerRecord) -> dict[str, np.ndarray]:
    """Unbatched, unpadded forward pass with our own hooks and `compute_cett`."""
    layers = find_mlp_layers(loaded.model)
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int, norms: torch.Tensor) -> Callable[..., None]:
        def record(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured[index] = compute_cett(inputs[0], output, norms)[0]

        return record

    handles = [
        layer.module.register_forward_hook(hook(layer.index, layer.column_norms))
        for layer in layers
    ]
    ids = torch.tensor([record.prompt_ids + record.response_ids])
    try:
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    start = len(record.prompt_ids)
    cett = torch.cat([captured[layer.index][start:] for layer in layers], dim=-1).numpy()
    in_span = np.zeros(len(cett), dtype=bool)
    if record.span is not None:
        in_span[record.span[0] : record.span[1]] = True
    logp = torch.log_softmax(logits[start - 1 : -1].double(), dim=-1)
    token_logp = logp.gather(-1, ids[0, start:, None]).squeeze(-1).numpy()
    entropy = (-(logp.exp() * logp).sum(-1)).numpy()
    nan = np.full(cett.shape[1], np.nan)
    return {
        "resp_mean": cett.mean(0),
        "resp_max": cett.max(0),
        "span_mean": cett[in_span].mean(0) if in_span.any() else nan,
        "other_mean": cett[~in_span].mean(0) if (~in_span).any() else nan,
        "stats": np.array(
            [len(cett), token_logp.mean(), token_logp.min(), entropy.mean(), entropy.max()]
        ),
    }


def test_features_match_a_manual_cett_computation(loaded: LoadedModel, tmp_path: Path) -> None:
    records = make_records(loaded)
    store = extract_features(loaded, records, tmp_path, batch_size=3, shard_size=4)
    kept = [r for r in records if r.response_ids]
    assert store.ids == [r.id for r in kept]
    assert store.skipped == ["a3"]
    assert (store.num_layers, store.width) == (2, 64)
    assert store.meta["label"].tolist() == [0 if r.correct else 1 for r in kept]
    assert store.meta["label"].dtype == np.int8
    assert store.meta["split"].tolist() == [r.split for r in kept]
    assert store.meta["consistent"].tolist() == [r.consistent for r in kept]
    assert store.meta["has_span"].tolist() == [r.span is not None for r in kept]
    stats = np.stack(
        [store.meta[k] for k in ("length", "mean_logprob", "min_logprob")]
        + [store.meta[k] for k in ("mean_entropy", "max_entropy")],
        axis=1,
    )
    for row, record in enumerate(kept):
        expected = manual_features(loaded, record)
        for kind in KINDS:
            got = store.load(kind, rows=np.array([row]))[0]
            assert got.dtype == np.float32 and got.shape == (2 * 64,)
            np.testing.assert_allclose(got, expected[kind], rtol=1e-4, atol=1e-6, err_msg=kind)
        np.testing.assert_allclose(stats[row], expected["stats"], rtol=1e-4, atol=1e-5)
    # NaN rows exactly where there is no span / no token outside it
    span = store.load("span_mean")
    other = store.load("other_mean")
    assert np.isnan(span).all(axis=1).tolist() == [r.span is None for r in kept]
    assert np.isnan(other).any(axis=1).tolist() == [r.id == "a4" for r in kept]
    assert np.isfinite(store.load("resp_mean")).all()


def test_feature_index_is_layer_times_width_plus_neuron(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    record = make_records(loaded)[1]
    store = extract_features(loaded, [record], tmp_path)
    expected = manual_features(loaded, record)["resp_mean"]
    layer, neuron = 1, 17
    column = np.array([layer * store.width + neuron])
    np.testing.assert_allclose(store.load("resp_mean", columns=column)[0, 0], expected[64 + 17])


def test_load_subsets(loaded: LoadedModel, tmp_path: Path) -> None:
    store = extract_features(loaded, make_records(loaded), tmp_path, batch_size=2, shard_size=2)
    full = store.load("resp_max")
    rows = np.array([5, 0, 3])
    cols = np.array([127, 3, 64])
    np.testing.assert_array_equal(
        store.load("resp_max", rows=rows, columns=cols), full[rows][:, cols]
    )
    mask = store.meta["label"] == 1
    np.testing.assert_array_equal(store.load("resp_max", rows=mask), full[mask])
    assert store.load("resp_max", rows=np.zeros(len(store), dtype=bool)).shape == (0, 128)
    with pytest.raises(FeatureStoreError, match="unknown feature kind"):
        store.load("mean")
    with pytest.raises(FeatureStoreError, match="out of range"):
        store.load("resp_max", rows=np.array([len(store)]))
    with pytest.raises(FeatureStoreError, match="row mask"):
        store.load("resp_max", rows=np.ones(3, dtype=bool))
    with pytest.raises(FeatureStoreError, match="out of range"):
        store.load("resp_max", columns=np.array([128]))
    reopened = FeatureStore(tmp_path / "features")
    assert reopened.ids == store.ids
    np.testing.assert_array_equal(reopened.load("resp_max"), full)


def test_missing_store(tmp_path: Path) -> None:
    with pytest.raises(FeatureStoreError, match="no feature store"):
        FeatureStore(tmp_path)


def test_finished_shards_are_not_recomputed(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = make_records(loaded)
    reference = extract_features(loaded, records, tmp_path / "ref", batch_size=2, shard_size=3)
    expected = {kind: reference.load(kind) for kind in KINDS}

    real_force = extract_module.teacher_force
    calls = 0

    def dying_force(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls > 2:  # killed in the second shard
            raise KeyboardInterrupt
        return real_force(*args, **kwargs)  # type: ignore[arg-type]

    work = tmp_path / "work"
    monkeypatch.setattr(extract_module, "teacher_force", dying_force)
    with pytest.raises(KeyboardInterrupt):
        extract_features(loaded, records, work, batch_size=2, shard_size=3)
    assert len(FeatureStore(work).ids) == 3  # the first shard was recorded

    seen: list[int] = []
    monkeypatch.setattr(extract_module, "teacher_force", counting(real_force, seen))
    store = extract_features(loaded, records, work, batch_size=2, shard_size=3)
    assert sum(seen) == 3  # only the answers of the unfinished shards (a3 has no tokens)
    assert store.ids == reference.ids
    for kind in KINDS:
        np.testing.assert_array_equal(store.load(kind), expected[kind])

    # everything finished: no forward pass at all
    monkeypatch.setattr(extract_module, "teacher_force", None)
    again = extract_features(loaded, records, work, batch_size=2, shard_size=3)
    np.testing.assert_array_equal(again.load("resp_mean"), expected["resp_mean"])


def test_changed_records_recompute_only_their_shard(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = make_records(loaded)
    extract_features(loaded, records, tmp_path, batch_size=8, shard_size=3)
    changed = list(records)
    changed[6] = changed[6].model_copy(update={"span": None, "correct": False})
    seen: list[int] = []
    real_force = extract_module.teacher_force
    monkeypatch.setattr(extract_module, "teacher_force", counting(real_force, seen))
    store = extract_features(loaded, changed[:7], tmp_path, batch_size=8, shard_size=3)
    assert seen == [1]  # only the last shard (one answer) ran again
    assert store.meta["label"][-1] == 1 and not store.meta["has_span"][-1]
    shorter = extract_features(loaded, changed[:3], tmp_path, batch_size=8, shard_size=3)
    assert shorter.ids == ["a0", "a1", "a2"]
    assert not list((tmp_path / "features").glob("shard_00002.*"))


def counting(real: Callable[..., Any], seen: list[int]) -> Callable[..., Any]:
    """``teacher_force`` that records how many answers each call measures."""

    def wrapper(model: Any, prompts: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        seen.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    return wrapper


@pytest.mark.slow
def test_real_model_end_to_end(smollm2: LoadedModel, tmp_path: Path) -> None:
    items = load_questions(TRIVIAQA, limit=8)
    records = collect_answers(smollm2, items, tmp_path / "answers.jsonl", PromptRecipe())
    assert [r.id for r in records] == [item.id for item in items]
    assert sum(bool(r.response.strip()) for r in records) >= 6
    assert all(r.span is not None for r in records if r.correct)
    store = extract_features(smollm2, records, tmp_path)
    n = sum(bool(r.response_ids) for r in records)
    assert (store.num_layers, store.width) == (30, 1536)
    features = store.load("resp_mean")
    assert features.shape == (n, 46080)
    assert np.isfinite(features).all() and (features >= 0).all()
    assert np.isfinite(store.load("resp_max")).all()
    for key in ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy"):
        assert np.isfinite(store.meta[key]).all()
    assert (store.meta["min_logprob"] <= store.meta["mean_logprob"]).all()
    assert (store.meta["length"] >= 1).all()
    assert not math.isnan(float(store.meta["max_entropy"].max()))
