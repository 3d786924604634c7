"""PNG plots of an evaluation: ROC, risk-coverage, reliability, H-neurons per layer.

Matplotlib with the non-interactive Agg backend, small figures (the shipped probe keeps
them). Every plot is a file ``<prefix><name>.png`` in the given directory.

    paths = save_plots(scored, probe, Path("out"), prefix="test.")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import roc_curve

from probes.metrics import BASELINE_SIGNS, ScoredAnswers, auroc, reliability_bins

if TYPE_CHECKING:
    from guard.probe import Probe

PLOT_NAMES = ("roc", "risk_coverage", "reliability", "h_neurons")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(scored: ScoredAnswers) -> dict[str, np.ndarray]:
    curves = {"served risk": scored.risk, "CETT probe only": scored.probe_logit}
    for name in ("max_entropy", "min_logprob", "length"):
        curves[name] = BASELINE_SIGNS[name] * scored.stats[name]
    return curves


def plot_roc(scored: ScoredAnswers, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=80)
    for name, score in _curves(scored).items():
        fpr, tpr, _ = roc_curve(scored.labels, score)
        ax.plot(fpr, tpr, label=f"{name} ({auroc(scored.labels, score):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(
        xlabel="false positive rate", ylabel="true positive rate", title="ROC (1 = hallucinated)"
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_risk_coverage(scored: ScoredAnswers, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=80)
    n = np.arange(1, scored.n + 1)
    for name, score in _curves(scored).items():
        order = np.argsort(score, kind="stable")
        ax.plot(n / scored.n, np.cumsum(scored.labels[order]) / n, label=name)
    ax.set(xlabel="coverage (answers kept, lowest score first)", ylabel="hallucination rate kept")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(scored: ScoredAnswers, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=80)
    bins = [b for b in reliability_bins(scored.labels, scored.risk) if b["n"]]
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot([b["mean_risk"] for b in bins], [b["observed"] for b in bins], "o-")
    for b in bins:
        ax.annotate(str(b["n"]), (b["mean_risk"], b["observed"]), fontsize=6)
    ax.set(xlabel="predicted risk", ylabel="observed hallucination rate", title="reliability")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_h_neurons(probe: Probe, path: Path) -> None:
    plt = _pyplot()
    w = probe.weights
    layers = probe.manifest.fingerprint.num_layers
    pos = np.bincount(w.layers[w.weights > 0], minlength=layers)
    neg = np.bincount(w.layers[w.weights < 0], minlength=layers)
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    ax.bar(np.arange(layers), pos, label="positive (H-neurons)")
    ax.bar(np.arange(layers), -neg, label="negative")
    ax.set(xlabel="layer", ylabel="neurons", title="probe neurons per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_plots(
    scored: ScoredAnswers, probe: Probe, directory: Path, prefix: str = ""
) -> list[Path]:
    """Write every plot; returns their paths. Needs both classes among the answers."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{prefix}{name}.png" for name in PLOT_NAMES]
    if 0 < scored.labels.sum() < scored.n:
        plot_roc(scored, paths[0])
        plot_risk_coverage(scored, paths[1])
        plot_reliability(scored, paths[2])
    else:
        paths = paths[3:]
    plot_h_neurons(probe, paths[-1])
    return paths
