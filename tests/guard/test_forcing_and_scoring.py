"""Teacher forcing reads the right positions; scoring pools exactly and streams exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from guard.forcing import teacher_force
from guard.neurons import NeuronCapture
from guard.probe import Stacker, load_probe
from guard.scoring import AnswerStats, RiskScorer, RunningStats, logit_statistics
from tests.fixtures.models import tiny_model
from tests.fixtures.probes import write_probe


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_teacher_force_matches_unpadded_single_pass(kind: str) -> None:
    model = tiny_model(kind)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    responses = [[20, 21, 22], [30, 31, 32, 33, 34]]
    traces = teacher_force(model, prompts, responses, pad_id=0)
    for prompt, response, trace in zip(prompts, responses, traces, strict=True):
        ids = torch.tensor([prompt + response])
        with torch.no_grad(), NeuronCapture(model) as capture:
            logits = model(ids).logits
        start = len(prompt)
        lp, ent = logit_statistics(logits[0, start - 1 : -1], ids[0, start:])
        torch.testing.assert_close(trace.logprobs, lp, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(trace.entropies, ent, rtol=1e-4, atol=1e-4)
        for layer, values in capture.items():
            torch.testing.assert_close(trace.cett[layer], values[0, start:], rtol=1e-4, atol=1e-5)


def test_empty_response_and_bad_input() -> None:
    model = tiny_model("llama")
    trace = teacher_force(model, [[1, 2, 3]], [[]], pad_id=0, neurons={0: [1]})[0]
    assert trace.length == 0 and trace.cett[0].shape == (0, 1)
    with pytest.raises(ValueError, match="prompts but"):
        teacher_force(model, [[1]], [[2], [3]], pad_id=0)


def test_running_stats_equal_pooled_stats_at_every_prefix() -> None:
    rng = np.random.default_rng(0)
    s, lp, ent = rng.normal(size=9), -rng.random(9) * 3, rng.random(9) * 4
    running = RunningStats()
    for t in range(9):
        running.update(s[t], lp[t], ent[t])
        assert running.stats() == pytest.approx(
            AnswerStats.from_tokens(s[: t + 1], lp[: t + 1], ent[: t + 1])
        )
    with pytest.raises(ValueError, match="no token"):
        RunningStats().stats()


def test_answer_probe_logit_is_the_linear_probe_on_mean_cett(tmp_path: Path) -> None:
    model = tiny_model("llama")
    write_probe(tmp_path / "p", model, seed=0)
    probe = load_probe(tmp_path / "p")
    scorer = RiskScorer(probe)
    trace = teacher_force(
        model, [[3, 4, 5]], [[6, 7, 8, 9]], pad_id=0, neurons=scorer.neuron_selection()
    )[0]
    token_logits = scorer.measure(scorer.flatten(trace.cett))[:, 0]
    # Manual: w . mean(CETT) + b over the probe's (layer, neuron) pairs.
    full = teacher_force(model, [[3, 4, 5]], [[6, 7, 8, 9]], pad_id=0)[0]
    w = probe.weights
    mean_feature = np.array(
        [
            full.cett[int(layer)][:, int(neuron)].mean().item()
            for layer, neuron in zip(w.layers, w.neurons, strict=True)
        ]
    )
    expected = float(mean_feature @ w.weights + w.bias)
    assert token_logits.mean().item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    stats = AnswerStats.from_tokens(
        token_logits.numpy(), trace.logprobs.numpy(), trace.entropies.numpy()
    )
    assert scorer.answer_risk(stats) == pytest.approx(1 / (1 + np.exp(-expected)), rel=1e-5)


def test_stacker_combines_probe_and_logit_statistics(tmp_path: Path) -> None:
    model = tiny_model("llama")
    stacker = Stacker(
        probe_coef=2.0, coef={"max_entropy": 0.5, "min_logprob": -1.0}, intercept=-1.0
    )
    write_probe(tmp_path / "p", model, seed=0, stacker=stacker)
    scorer = RiskScorer(load_probe(tmp_path / "p"))
    stats = AnswerStats(0.3, 4, -1.0, -2.5, 1.0, 3.0)
    z = -1.0 + 2.0 * 0.3 + 0.5 * 3.0 - 1.0 * -2.5
    assert scorer.stack(stats) == pytest.approx(z)
    risks = scorer.token_risks(np.array([0.3, -0.2]), np.array([-1.0, -0.5]), np.array([2.0, 1.0]))
    assert risks.shape == (2,) and np.all((risks > 0) & (risks < 1))
