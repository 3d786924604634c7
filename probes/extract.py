"""CETT features of collected answers, written to disk shards and read back by `FeatureStore`.

One teacher-forced pass per batch (`guard.forcing.teacher_force`, every neuron of every
layer) gives each answer's per-token CETT ``[tokens, layers * width]`` (feature index =
``layer * width + neuron``). Pooled per answer into four float32 vectors (kinds):

- ``resp_mean`` / ``resp_max``: mean / max over the response tokens;
- ``span_mean``: mean over the answer span (NaN row when there is none);
- ``other_mean``: mean over the response tokens outside the span (all of them when there
  is no span; NaN row when the span covers the whole response);

plus logit statistics (``length``, mean/min log-prob, mean/max entropy). Answers with no
response token are skipped. Layout under ``work_dir/features/``::

    index.json                   shapes, and per shard: ids, digest, per-answer metadata
    shard_00000.resp_mean.npy    float32 [answers in shard, layers * width], one per kind

A shard is written under a temporary name and renamed when complete, and recorded in the
index only then, so a killed run recomputes at most the shard it was in. Memory holds one
batch of CETT; the store is read through memory maps.

    store = extract_features(loaded, records, Path("work"))
    x = store.load("resp_mean", rows=store.meta["split"] == "train", columns=screened)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from guard.errors import GuardError
from guard.forcing import TokenTrace, teacher_force
from guard.model import LoadedModel, pad_token_id
from guard.neurons import MLPLayer, find_mlp_layers
from probes.collect import AnswerRecord

log = logging.getLogger(__name__)

FeatureKind = Literal["resp_mean", "resp_max", "span_mean", "other_mean"]
KINDS: tuple[FeatureKind, ...] = ("resp_mean", "resp_max", "span_mean", "other_mean")
STAT_KEYS = ("length", "mean_logprob", "min_logprob", "mean_entropy", "max_entropy")
INDEX_FILE = "index.json"
FORMAT_VERSION = 1
_READ_CHUNK = 256  # rows per memory-mapped read in FeatureStore.load


class FeatureStoreError(GuardError, ValueError):
    """A feature store is missing, inconsistent, or asked for something it does not hold."""


def extract_features(
    loaded: LoadedModel,
    records: list[AnswerRecord],
    work_dir: Path,
    batch_size: int = 32,
    shard_size: int = 512,
) -> FeatureStore:
    """Features of ``records`` (in order, answers without tokens skipped) under ``work_dir``.

    Shards already on disk for the same records and model are reused.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    root = Path(work_dir) / "features"
    root.mkdir(parents=True, exist_ok=True)
    layers = find_mlp_layers(loaded.model)
    index = _read_index(root) or {}
    index.update(
        format_version=FORMAT_VERSION,
        model_id=loaded.model_id,
        num_layers=len(layers),
        width=layers[0].width,
        kinds=list(KINDS),
    )
    old = {shard["name"]: shard for shard in index.get("shards", [])}
    shards = []
    with tqdm(total=len(records), desc="extract", unit="answer") as progress:
        for number, first in enumerate(range(0, len(records), shard_size)):
            chunk = records[first : first + shard_size]
            name = f"shard_{number:05d}"
            digest = _digest(loaded, chunk)
            shard = old.get(name)
            if shard is None or shard["digest"] != digest or not _complete(root, name):
                shard = _extract_shard(loaded, layers, chunk, root / name, batch_size, progress)
                shard["digest"] = digest
            else:
                progress.update(len(chunk))
            shards.append(shard)
            _write_index(root, {**index, "shards": shards})
    for name in set(old) - {shard["name"] for shard in shards}:  # from a longer earlier run
        for kind in KINDS:
            (root / f"{name}.{kind}.npy").unlink(missing_ok=True)
    skipped = sum(len(shard["skipped"]) for shard in shards)
    if skipped:
        log.info("skipped %d answers with no response tokens", skipped)
    return FeatureStore(root)


def _digest(loaded: LoadedModel, chunk: Sequence[AnswerRecord]) -> str:
    """What a shard's features depend on: the model and each answer's tokens and labels."""
    digest = hashlib.sha256(loaded.fingerprint.down_proj_sha256.encode())
    for r in chunk:
        # ``not hallucinated`` is ``correct`` except for refusals: old shards keep their digest
        key = [
            r.id,
            r.prompt_ids,
            r.response_ids,
            r.span,
            not r.hallucinated,
            r.consistent,
            r.split,
        ]
        digest.update(json.dumps(key).encode())
    return digest.hexdigest()


def _complete(root: Path, name: str) -> bool:
    return all((root / f"{name}.{kind}.npy").is_file() for kind in KINDS)


def _extract_shard(
    loaded: LoadedModel,
    layers: list[MLPLayer],
    chunk: Sequence[AnswerRecord],
    stem: Path,
    batch_size: int,
    progress: tqdm,
) -> dict[str, Any]:
    """Compute and write one shard (files ``<stem>.<kind>.npy``); returns its index entry
    without the digest."""
    kept = [r for r in chunk if r.response_ids]
    skipped = [r.id for r in chunk if not r.response_ids]
    for rid in skipped:
        log.info("%s: no response tokens, skipped", rid)
    width = len(layers) * layers[0].width
    tmp = {kind: stem.with_name(f"{stem.name}.{kind}.tmp.npy") for kind in KINDS}
    outs = {kind: _open_rows(tmp[kind], (len(kept), width)) for kind in KINDS}
    stats: dict[str, list[float]] = {key: [0.0] * len(kept) for key in STAT_KEYS}
    pad_id = pad_token_id(loaded.tokenizer)
    order = sorted(range(len(kept)), key=lambda i: len(kept[i].prompt_ids + kept[i].response_ids))
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        traces = teacher_force(
            loaded.model,
            [kept[i].prompt_ids for i in rows],
            [kept[i].response_ids for i in rows],
            pad_id,
            layers=layers,
        )
        for i, trace in zip(rows, traces, strict=True):
            for kind, vector in pool_trace(trace, len(layers), kept[i].span).items():
                outs[kind][i] = vector
            for key, value in trace_stats(trace).items():
                stats[key][i] = value
        progress.update(len(rows))
    progress.update(len(skipped))
    for kind in KINDS:
        array = outs.pop(kind)
        if isinstance(array, np.memmap):
            array.flush()
        else:
            np.save(tmp[kind], array)
        del array
        os.replace(tmp[kind], stem.with_name(f"{stem.name}.{kind}.npy"))
    meta = {
        "label": [1 if r.hallucinated else 0 for r in kept],
        "split": [r.split for r in kept],
        "consistent": [r.consistent for r in kept],
        "has_span": [r.span is not None and r.span[1] > r.span[0] for r in kept],
        **stats,
    }
    return {"name": stem.name, "ids": [r.id for r in kept], "skipped": skipped, "meta": meta}


def _open_rows(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A writable float32 ``.npy`` array on disk (in memory when empty: mmap needs bytes)."""
    if shape[0] == 0:
        return np.zeros(shape, dtype=np.float32)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def pool_trace(
    trace: TokenTrace, num_layers: int, span: tuple[int, int] | None
) -> dict[FeatureKind, np.ndarray]:
    """The four pooled feature vectors ``[layers * width]`` (float32) of one answer."""
    cett = torch.cat([trace.cett[layer].float() for layer in range(num_layers)], dim=-1)
    in_span = torch.zeros(cett.shape[0], dtype=torch.bool)
    if span is not None:
        in_span[span[0] : span[1]] = True

    def mean(mask: torch.Tensor) -> np.ndarray:
        if not bool(mask.any()):
            return np.full(cett.shape[1], np.nan, dtype=np.float32)
        return cett[mask].mean(dim=0).numpy()

    return {
        "resp_mean": cett.mean(dim=0).numpy(),
        "resp_max": cett.max(dim=0).values.numpy(),
        "span_mean": mean(in_span),
        "other_mean": mean(~in_span),
    }


def trace_stats(trace: TokenTrace) -> dict[str, float]:
    """Per-answer logit statistics over the response tokens."""
    lp, ent = trace.logprobs.double(), trace.entropies.double()
    return {
        "length": float(trace.length),
        "mean_logprob": float(lp.mean()),
        "min_logprob": float(lp.min()),
        "mean_entropy": float(ent.mean()),
        "max_entropy": float(ent.max()),
    }


def _read_index(root: Path) -> dict[str, Any] | None:
    path = root / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FeatureStoreError(f"{path}: unreadable feature index: {exc}") from exc
    return index


def _write_index(root: Path, index: dict[str, Any]) -> None:
    tmp = root / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index), encoding="utf-8")
    os.replace(tmp, root / INDEX_FILE)


class FeatureStore:
    """Read access to extracted features: ids, metadata and (subsets of) feature matrices.

    store = FeatureStore(Path("work"))  # or work/features
    x = store.load("resp_mean", rows=store.meta["split"] == "val")  # [n, layers * width]
    """

    def __init__(self, path: Path | str) -> None:
        root = Path(path)
        if not (root / INDEX_FILE).is_file() and (root / "features" / INDEX_FILE).is_file():
            root = root / "features"
        index = _read_index(root)
        if index is None:
            raise FeatureStoreError(
                f"no feature store at {path}: run extract_features (or `hguard probes build`)"
            )
        self.path = root
        self.num_layers: int = int(index["num_layers"])
        self.width: int = int(index["width"])
        self.model_id: str = str(index.get("model_id", ""))
        self._shards: list[tuple[str, int, int]] = []  # (name, first row, rows)
        self.ids: list[str] = []
        columns: dict[str, list[Any]] = {key: [] for key in ("label", "split", "consistent")}
        columns.update({key: [] for key in ("has_span", *STAT_KEYS)})
        for shard in index["shards"]:
            self._shards.append((shard["name"], len(self.ids), len(shard["ids"])))
            self.ids.extend(shard["ids"])
            for key, values in columns.items():
                values.extend(shard["meta"][key])
        self.skipped: list[str] = [rid for s in index["shards"] for rid in s["skipped"]]
        self.meta: dict[str, np.ndarray] = {
            "label": np.asarray(columns.pop("label"), dtype=np.int8),
            "split": np.asarray(columns.pop("split"), dtype=str),
            "consistent": np.asarray(columns.pop("consistent"), dtype=bool),
            "has_span": np.asarray(columns.pop("has_span"), dtype=bool),
            **{key: np.asarray(values, dtype=np.float64) for key, values in columns.items()},
        }

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_features(self) -> int:
        return self.num_layers * self.width

    def load(
        self,
        kind: str,
        rows: np.ndarray | None = None,
        columns: np.ndarray | None = None,
    ) -> np.ndarray:
        """Features ``[len(rows), len(columns)]`` float32 of one kind (see module docstring).

        ``rows``: boolean mask over the store or row indices (kept in the given order);
        ``columns``: feature indices. None means all. Reads only what is asked for,
        ``_READ_CHUNK`` rows at a time.
        """
        if kind not in KINDS:
            raise FeatureStoreError(f"unknown feature kind {kind!r}: one of {', '.join(KINDS)}")
        index = self._row_index(rows)
        cols = None if columns is None else self._column_index(columns)
        out = np.empty((index.size, self.num_features if cols is None else cols.size), np.float32)
        for name, first, count in self._shards:
            hit = np.flatnonzero((index >= first) & (index < first + count))
            if hit.size == 0:
                continue
            data = np.load(self.path / f"{name}.{kind}.npy", mmap_mode="r")
            for start in range(0, hit.size, _READ_CHUNK):
                part = hit[start : start + _READ_CHUNK]
                block = data[index[part] - first]
                out[part] = block if cols is None else block[:, cols]
        return out

    def _row_index(self, rows: np.ndarray | None) -> np.ndarray:
        n = len(self.ids)
        if rows is None:
            return np.arange(n)
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise FeatureStoreError(f"row mask has shape {rows.shape}, the store has {n} rows")
            return np.flatnonzero(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise FeatureStoreError("rows must be a boolean mask or a 1-d integer index array")
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise FeatureStoreError(f"row index out of range for a store of {n} rows")
        return rows % n if n else rows

    def _column_index(self, columns: np.ndarray) -> np.ndarray:
        cols = np.asarray(columns)
        if cols.dtype == bool:
            if cols.shape != (self.num_features,):
                raise FeatureStoreError(
                    f"column mask has shape {cols.shape}; the store has {self.num_features} columns"
                )
            return np.flatnonzero(cols)
        if cols.ndim != 1 or not np.issubdtype(cols.dtype, np.integer):
            raise FeatureStoreError("columns must be a boolean mask or a 1-d integer index array")
        if cols.size and (cols.min() < 0 or cols.max() >= self.num_features):
            raise FeatureStoreError(f"column index out of range 0..{self.num_features - 1}")
        return cols
