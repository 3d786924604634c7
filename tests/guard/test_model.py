"""Model specs resolve offline with clear errors; the embedded SmolLM2 loads and fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.errors import ModelLoadError
from guard.model import encode_chats, end_token_ids, load_model, resolve_spec


def test_missing_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_spec(str(tmp_path / "nope.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_spec(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="could not load model .* offline"):
        load_model(str(tmp_path))


def test_saved_hf_directory_loads(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.fixtures.models import tiny_model

    vocab = {f"w{i}": i for i in range(97)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="w1", unk_token="w0")
    tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.fingerprint.num_layers == 2 and loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token_id == 1  # falls back to eos


@pytest.mark.slow
def test_embedded_smollm2(smollm2) -> None:  # type: ignore[no-untyped-def]
    assert smollm2.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert smollm2.fingerprint.architecture == "LlamaForCausalLM"
    assert len(smollm2.fingerprint.down_proj_sha256) == 64
    im_end = smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in end_token_ids(smollm2.model, smollm2.tokenizer)
    prompts, ids, mask = encode_chats(
        smollm2.tokenizer,
        [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A longer question?"}]],
    )
    assert ids.shape[1] == max(len(p) for p in prompts)
    assert mask[0].sum().item() == len(prompts[0]) and mask[0, 0].item() == 0  # left padded
    assert ids[1, -len(prompts[1]) :].tolist() == prompts[1]
