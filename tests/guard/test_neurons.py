"""CETT capture: hooked values equal a manual computation from the weights, hooks never leak."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from guard.errors import CaptureError, UnsupportedArchitectureError
from guard.neurons import NeuronCapture, find_mlp_layers
from tests.fixtures.models import ARCHITECTURES, tiny_model


def _mlp_io(model: nn.Module, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(z, h) of every down projection, recorded by plain hooks as ground truth."""
    records: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [
        layer.module.register_forward_hook(
            lambda _m, inputs, output: records.append((inputs[0].detach(), output.detach()))
        )
        for layer in find_mlp_layers(model)
    ]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return records


def _manual_cett(layer_module: nn.Module, z: torch.Tensor, transposed: bool) -> torch.Tensor:
    weight = layer_module.weight.detach()
    w_down = weight.T if transposed else weight  # [hidden, neurons]
    contributions = z.unsqueeze(-1) * w_down.T  # [..., neurons, hidden]: z_j * W[:, j]
    bias = getattr(layer_module, "bias", None)
    h = contributions.sum(-2) + (bias.detach() if bias is not None else 0)
    return contributions.norm(dim=-1) / h.norm(dim=-1, keepdim=True)


def _count_hooks(model: nn.Module) -> int:
    probe_input = torch.zeros(1, 2, dtype=torch.long)
    fired = 0

    # Count hooks by behaviour: a capture that is gone records nothing.
    def counter(*_args: object) -> None:
        nonlocal fired
        fired += 1

    handles = [layer.module.register_forward_hook(counter) for layer in find_mlp_layers(model)]
    try:
        with torch.no_grad():
            model(probe_input)
    finally:
        for handle in handles:
            handle.remove()
    return fired


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_cett_matches_manual_computation(kind: str) -> None:
    model = tiny_model(kind)
    layers = find_mlp_layers(model)
    assert len(layers) == 2
    input_ids = torch.randint(0, 90, (2, 7))
    truth = _mlp_io(model, input_ids)
    with NeuronCapture(model) as capture, torch.no_grad():
        model(input_ids)
    for layer, (z, _h) in zip(layers, truth, strict=True):
        expected = _manual_cett(layer.module, z, layer.transposed).reshape(2, 7, -1)
        got = capture.cett(layer.index)
        assert got.shape == (2, 7, layer.width)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_a_capture_and_its_buffers_go_with_the_last_reference(kind: str) -> None:
    """No reference cycle through the hooks: a whole-model capture of a batch is hundreds
    of MB offline, and waiting for the cyclic collector grew extraction to 12 GB."""
    model = tiny_model(kind)
    enabled = gc.isenabled()
    gc.disable()
    try:
        with NeuronCapture(model) as capture, torch.no_grad():
            model(torch.randint(0, 90, (2, 5)))
        cett = weakref.ref(capture.cett(0))
        gone = weakref.ref(capture)
        del capture
        assert gone() is None and cett() is None
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_subset_capture_equals_slice_of_full_capture(kind: str) -> None:
    model = tiny_model(kind)
    input_ids = torch.randint(0, 90, (3, 5))
    selection = {1: [3, 0, 17], 0: [5]}
    with NeuronCapture(model) as full, torch.no_grad():
        model(input_ids)
    with NeuronCapture(model, selection) as subset, torch.no_grad():
        model(input_ids)
    assert subset.layer_indices == [0, 1]
    for layer, neurons in selection.items():
        torch.testing.assert_close(subset.cett(layer), full.cett(layer)[..., neurons])


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_last_position_mode_equals_full_capture_at_the_last_position(kind: str) -> None:
    """The decode loop's fused capture: one ``[batch, K]`` tensor per pass, layers in order."""
    model = tiny_model(kind)
    selection = {1: [3, 0, 17], 0: [5, 9]}
    prompt, step = torch.randint(0, 90, (3, 6)), torch.randint(0, 90, (3, 1))
    with NeuronCapture(model, selection) as full, torch.no_grad():
        model(torch.cat([prompt, step], dim=1))
    expected = torch.cat([full.cett(0)[:, -1], full.cett(1)[:, -1]], dim=-1)
    with NeuronCapture(model, selection, last_position=True) as last, torch.no_grad():
        model(prompt)
        assert last.pop_last().shape == (3, 5)
        model(torch.cat([prompt, step], dim=1))
        torch.testing.assert_close(last.pop_last(), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(CaptureError, match="no forward pass"):
            last.pop_last()
    with pytest.raises(CaptureError, match="last_position=True"):
        full.pop_last()


def test_chunks_concatenate_over_forward_passes() -> None:
    model = tiny_model("llama")
    with NeuronCapture(model, {0: [1, 2]}) as capture, torch.no_grad():
        model(torch.randint(0, 90, (2, 4)))
        model(torch.randint(0, 90, (2, 1)))
    assert capture.cett(0).shape == (2, 5, 2)


def test_hooks_removed_after_block_and_after_exception() -> None:
    model = tiny_model("llama")
    baseline = _count_hooks(model)
    with NeuronCapture(model) as capture, torch.no_grad():
        model(torch.randint(0, 90, (1, 3)))
    assert _count_hooks(model) == baseline
    with pytest.raises(RuntimeError, match="boom"), NeuronCapture(model):
        raise RuntimeError("boom")
    assert _count_hooks(model) == baseline
    # The capture recorded nothing after its block ended.
    before = capture.cett(0).shape
    with torch.no_grad():
        model(torch.randint(0, 90, (1, 3)))
    assert capture.cett(0).shape == before
    capture.__exit__(None, None, None)  # exiting twice is harmless


def test_overlapping_captures_are_refused() -> None:
    model = tiny_model("llama")
    with NeuronCapture(model), pytest.raises(CaptureError, match="another neuron capture"):
        NeuronCapture(model).__enter__()
    with NeuronCapture(model):  # the first one released the model
        pass


def test_bad_selection_fails_before_any_hook() -> None:
    model = tiny_model("llama")
    with pytest.raises(CaptureError, match="layer 5 does not exist"):
        NeuronCapture(model, {0: [1], 5: [1]})
    with pytest.raises(CaptureError, match="neuron indices"):
        NeuronCapture(model, {0: [64]})
    with pytest.raises(CaptureError, match="not captured"), NeuronCapture(model, {0: [1]}) as cap:
        cap.cett(1)


def test_unknown_architecture_is_a_clear_error() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UnsupportedArchitectureError, match="down_proj.*c_proj"):
        find_mlp_layers(Odd())


@pytest.mark.slow
def test_smollm2_layout(smollm2) -> None:  # type: ignore[no-untyped-def]
    layers = find_mlp_layers(smollm2.model)
    assert len(layers) == 30 and layers[0].width == 1536
    assert smollm2.fingerprint.num_layers == 30 and smollm2.fingerprint.mlp_width == 1536
