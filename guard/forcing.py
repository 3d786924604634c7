"""Teacher-forced passes: per-token CETT and logit statistics of given responses.

Offline extraction, evaluation and the runtime's ``score`` all read a response the same
way: one batched, left-padded forward pass over prompt + response, CETT read where each
response token is the *input*, log-prob and entropy from the raw logits at the position
that *predicted* it (docs/ARCHITECTURE.md, "Position").

    traces = teacher_force(model, prompts, responses, pad_id=tokenizer.pad_token_id)
    traces[0].cett[17]  # [response_len, k]

`prompt_hidden` is the prompt-only pass the scope gate reads (``guard.scope``); the
knowledge gate's prompt risk (``guard.knowledge``) comes from the same pass as the response
(``knowledge``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from guard.knowledge import KnowledgeGate
from guard.model import left_pad
from guard.neurons import MLPLayer, NeuronCapture, NeuronSelection
from guard.scope import FinalHiddenCapture
from guard.scoring import logit_statistics


@dataclass(frozen=True)
class TokenTrace:
    """One response's per-token measurements (on the CPU).

    ``cett``: ``{layer: [response_len, k]}`` float32; ``logprobs``, ``entropies``:
    ``[response_len]`` float32; ``prompt_hidden``: the final hidden state at the last prompt
    token ``[hidden]`` (when asked for: the scope gate's input); ``prompt_risk``: the
    knowledge gate's (when given one).
    """

    cett: dict[int, torch.Tensor]
    logprobs: torch.Tensor
    entropies: torch.Tensor
    prompt_hidden: torch.Tensor | None = None
    prompt_risk: float | None = None

    @property
    def length(self) -> int:
        return int(self.logprobs.numel())


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` computes them: ``[batch, seq]``."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def teacher_force(
    model: nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    neurons: NeuronSelection | None = None,
    *,
    layers: list[MLPLayer] | None = None,
    with_prompt_hidden: bool = False,
    knowledge: KnowledgeGate | None = None,
) -> list[TokenTrace]:
    """Measure each ``responses[i]`` as the continuation of ``prompts[i]`` in one pass.

    ``neurons=None`` captures every neuron of every layer (offline extraction); a
    selection captures only those (runtime scoring). Responses may be empty.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if any(not prompt for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    input_ids, attention_mask = left_pad(sequences, pad_id)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    width = input_ids.shape[1]
    # Only the positions that predict response tokens need the LM head (a 262k-token
    # vocabulary makes full logits the largest tensor of the pass): the last ``keep``.
    keep = max((len(r) for r in responses), default=0) + 1
    hidden_capture = FinalHiddenCapture(model) if with_prompt_hidden else contextlib.nullcontext()
    residual_capture = knowledge.capture(model) if knowledge else contextlib.nullcontext()
    with (
        torch.inference_mode(),
        NeuronCapture(model, neurons, layers=layers) as capture,
        hidden_capture as hidden,
        residual_capture as residual,
    ):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            use_cache=False,
            logits_to_keep=keep,
        ).logits  # [batch, keep, vocab]: positions width - keep .. width - 1
        cett = dict(capture.items())
        prompt_states = None
        if hidden is not None:
            # the LM head's input is the kept window too: the prompt's last token is at
            # ``keep - len(r) - 1`` in it
            prompt_ends = torch.as_tensor([keep - len(r) - 1 for r in responses])
            prompt_states = hidden.take(prompt_ends).cpu()
        prompt_risks: list[float | None] = [None] * len(responses)
        if knowledge is not None and residual is not None:
            # every position: a row's prompt is its columns before the response
            lengths = torch.as_tensor([width - len(r) for r in responses], device=device)
            states = residual.take_all()
            if knowledge.pooled:
                before = torch.arange(width, device=device) < lengths[:, None]
                prompt_risks = list(knowledge.prompt_risks(states, attention_mask * before))
            else:  # the prompt's last token only
                last = states[torch.arange(len(responses), device=device), lengths - 1]
                prompt_risks = list(knowledge.risks(last))
    traces = []
    for row, response in enumerate(responses):
        start = width - len(response)  # first response position (left padding)
        stop = width
        if response:
            offset = width - keep
            predicting = logits[row, start - 1 - offset : stop - 1 - offset]
            lp, ent = logit_statistics(predicting, input_ids[row, start:stop])
        else:
            lp = ent = torch.zeros(0)
        traces.append(
            TokenTrace(
                cett={layer: values[row, start:stop].cpu() for layer, values in cett.items()},
                logprobs=lp.cpu(),
                entropies=ent.cpu(),
                prompt_hidden=prompt_states[row] if prompt_states is not None else None,
                prompt_risk=prompt_risks[row],
            )
        )
    return traces


def prompt_hidden(model: nn.Module, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """The final hidden state at each prompt's last token, one batched pass (the LM head
    runs on the last position only): ``[batch, hidden]`` float32 on the CPU."""
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("give at least one prompt, each with at least one token")
    input_ids, attention_mask = left_pad(prompts, pad_id)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with torch.inference_mode(), FinalHiddenCapture(model) as hidden:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            use_cache=False,
            logits_to_keep=1,
        )
        return hidden.take().cpu()
