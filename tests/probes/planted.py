"""A FeatureStore stand-in with a planted hallucination signal, for training tests.

Features are positive, CETT-like (log-normal); a few chosen neurons fire more on
hallucinated answers, and ``max_entropy`` carries a weaker, independent signal.
"""

from __future__ import annotations

import numpy as np

PLANTED = ((1, 3), (2, 7))  # (layer, neuron) pairs that fire on hallucinations


class PlantedStore:
    """Implements `probes.train.FeatureSource` in memory."""

    def __init__(
        self,
        n: int = 600,
        num_layers: int = 3,
        width: int = 20,
        rate: float = 0.7,
        strength: float = 1.0,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.num_layers, self.width = num_layers, width
        self.ids = [f"q{i}" for i in range(n)]
        label = (rng.random(n) < rate).astype(np.int8)
        x = rng.lognormal(mean=-3.0, sigma=0.5, size=(n, num_layers * width)).astype(np.float32)
        for layer, neuron in PLANTED:
            col = layer * width + neuron
            x[:, col] *= np.exp(strength * label).astype(np.float32)
        self._data = {
            "resp_mean": x,
            "resp_max": x * 2,
            "span_mean": x * 0.5,
            "other_mean": x * rng.uniform(0.8, 1.2, size=x.shape).astype(np.float32),
        }
        splits = np.array(["train", "val", "test"])[rng.choice(3, size=n, p=[0.6, 0.2, 0.2])]
        length = rng.integers(1, 20, size=n).astype(np.float64)
        mean_lp = -rng.gamma(2.0, 0.5, size=n)
        self.meta: dict[str, np.ndarray] = {
            "label": label,
            "split": splits,
            "consistent": rng.random(n) < 0.8,
            "has_span": (label == 0) & (rng.random(n) < 0.9),
            "length": length,
            "mean_logprob": mean_lp,
            "min_logprob": mean_lp - rng.gamma(2.0, 1.0, size=n),
            "mean_entropy": rng.gamma(2.0, 1.0, size=n),
            "max_entropy": rng.gamma(2.0, 1.0, size=n) + 1.0 * label,
        }

    def load(
        self, kind: str, rows: np.ndarray | None = None, columns: np.ndarray | None = None
    ) -> np.ndarray:
        x = self._data[kind]
        if rows is not None:
            x = x[rows]
        if columns is not None:
            x = x[:, columns]
        return np.array(x, dtype=np.float32)
