"""A tiny guarded setup for fast tests: byte-level tokenizer, random Llama, planted probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from guard.model import LoadedModel, fingerprint_model, prepare_tokenizer
from guard.probe import (
    PlattCalibrator,
    ProbeManifest,
    ProbeWeights,
    ScopeRecipe,
    ScopeWeights,
    ScoringRecipe,
    Thresholds,
    save_probe,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_MODEL_ID = "tiny-llama"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: 256 byte tokens + 3 specials, SmolLM2-style chat."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    for special in SPECIALS:
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|im_end|>",
        additional_special_tokens=SPECIALS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    prepare_tokenizer(tokenizer)
    return tokenizer


def tiny_loaded(seed: int = 0) -> LoadedModel:
    """A random 2-layer Llama with the tiny tokenizer, ready for `GuardedModel`."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a sharper distribution: greedy never sits on a near-tie
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel(model, tokenizer, fingerprint_model(model), TINY_MODEL_ID, "tiny")


def write_probe(
    directory: Path,
    loaded: LoadedModel,
    *,
    flag: float = 0.5,
    abstain: float = 0.8,
    abort: float | None = None,
    abort_min_tokens: int = 2,
    bias: float = 0.0,
    scale: float = 1.0,
    name: str = "tiny-probe",
    scope_bias: float | None = None,
    neurons: tuple[int, int, int, int, int] = (3, 17, 5, 40, 63),
) -> Path:
    """A probe on a few neurons of both layers with fixed weights; returns its directory.

    ``scope_bias`` adds a scope gate (fixed random weights, threshold 0.5): a large
    positive bias puts every prompt in scope, a large negative one none. ``neurons``: two
    of layer 0, then three of layer 1 (narrower MLPs need smaller indices)."""
    layers = np.array([0, 0, 1, 1, 1], dtype=np.int64)
    neuron_ids = np.array(neurons, dtype=np.int64)
    weights = np.array([2.0, -1.5, 1.0, 3.0, -0.5], dtype=np.float64) * scale
    manifest = ProbeManifest(
        name=name,
        model_id=loaded.model_id,
        fingerprint=loaded.fingerprint,
        scoring=ScoringRecipe(calibrator=PlattCalibrator(a=1.0, b=0.0)),
        thresholds=Thresholds(
            flag=flag, abstain=abstain, abort=abort, abort_min_tokens=abort_min_tokens
        ),
        validation_risk_quantiles={"0.5": 0.4, "0.9": 0.8},
        training={"model_spec": "tiny"},
    )
    scope = None
    if scope_bias is not None:
        hidden = int(loaded.model.config.hidden_size)
        scope_weights = np.random.default_rng(7).normal(0.0, 0.5, hidden)
        scope = ScopeWeights(scope_weights, scope_bias)
        manifest = manifest.model_copy(
            update={"scope": ScopeRecipe(hidden_size=hidden, threshold=0.5)}
        )
    save_probe(directory, manifest, ProbeWeights(layers, neuron_ids, weights, bias), scope=scope)
    return directory
