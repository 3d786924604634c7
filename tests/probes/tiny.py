"""A tiny random chat model (byte-level BPE tokenizer with a chat template + 2-layer Llama).

Built in-process in well under a second, so collect/extract tests need no download and no
real model. Its pad token is its end-of-turn token, as in the SmolLM2 GGUF.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from guard.model import LoadedModel, fingerprint_model, prepare_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Where did Anne Frank die? Belsen concentration camp.",
    "Which city is the capital of France? Paris, of course.",
    "Who wrote Hamlet? William Shakespeare wrote it in 1600.",
    "Answer in a few words. The Eiffel Tower is in Paris. Café, naïve, Zürich, 1,000 km.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    prepare_tokenizer(tokenizer)
    return tokenizer


def tiny_loaded(seed: int = 0) -> LoadedModel:
    """A random 2-layer Llama (width 64) with the tiny tokenizer, as `load_model` returns it."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, tokenizer, fingerprint_model(model), "tiny-llama", "tiny-llama")
