"""`hguard export-model`: any model spec to a float32 safetensors directory whose
fingerprint the probe verifies (what vLLM loads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guard.cli import main
from guard.errors import ModelLoadError
from guard.export import export_model, exported_dir, exported_fingerprint
from guard.model import load_model
from guard.probe import load_probe
from tests.fixtures.models import save_tiny_model


def test_export_of_a_directory_reproduces_weights_and_fingerprint(tmp_path: Path) -> None:
    source = save_tiny_model(tmp_path / "tiny", seed=3)
    out = tmp_path / "export"
    assert main(["export-model", str(source), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    original, exported = load_model(str(source)), load_model(str(out))
    assert exported.fingerprint == original.fingerprint == exported_fingerprint(out)
    for name, tensor in original.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[name], tensor), name
    assert exported_dir(str(out)) == out  # a directory is used as it is
    assert main(["export-model", str(source), str(out)]) == 2  # refused: not empty
    with pytest.raises(ModelLoadError, match="not empty"):
        export_model(str(source), out)


@pytest.mark.slow
def test_embedded_gguf_exports_to_a_directory_the_shipped_probe_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARD_EXPORT_DIR", str(tmp_path))
    directory = exported_dir("smollm2")
    assert directory.parent == tmp_path and (directory / "model.safetensors").is_file()
    exported = load_model(str(directory))
    load_probe("default").verify_model(exported.fingerprint)  # raises on any mismatch
    assert exported.model.dtype == torch.float32
    assert exported.tokenizer.convert_tokens_to_ids("<|im_end|>") is not None
    assert exported_dir("smollm2") == directory  # reused, not exported again
