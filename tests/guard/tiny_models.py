"""Tiny randomly initialised causal LMs of each supported MLP layout, for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97


def tiny_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A 2-layer random model: ``llama``, ``qwen2``, ``gpt2``, ``gpt_neox`` or ``opt``."""
    torch.manual_seed(seed)
    if kind == "llama":
        model: PreTrainedModel = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
            )
        )
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
            )
        )
    elif kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        )
    elif kind == "gpt_neox":
        model = GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=80,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=128,
            )
        )
    elif kind == "opt":
        model = OPTForCausalLM(
            OPTConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=72,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=128,
                word_embed_proj_dim=32,
            )
        )
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    return model.eval()


ARCHITECTURES = ("llama", "qwen2", "gpt2", "gpt_neox", "opt")
