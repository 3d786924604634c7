"""Serving logic of ``POST /v1/guard/score``: one teacher-forced pass on the worker thread."""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse

from guard.api.deps import Services
from guard.api.errors import invalid
from guard.api.schemas import ScoreRequest, usage
from guard.api.serving import check_model
from guard.results import Decision, ScoreResult


async def score_answer(services: Services, body: ScoreRequest, rid: str) -> JSONResponse:
    """The ``guard`` object of a given answer, with the usual guard headers."""
    engine = services.require_ready()
    model = check_model(services, body.model)
    if body.messages is not None:
        prompt_ids = engine.encode_chat([m.as_template() for m in body.messages[:-1]])
        answer = body.messages[-1].text()
    else:
        prompt_ids = engine.encode_question(body.question or "")
        answer = body.answer or ""
    response_ids = engine.encode_answer(answer)
    if not response_ids:
        raise invalid("the answer is empty: give the text to score", param="answer")
    limit = services.settings.max_prompt_tokens + services.settings.max_new_tokens
    if len(prompt_ids) + len(response_ids) > limit:
        raise invalid(
            f"question and answer have {len(prompt_ids) + len(response_ids)} tokens, more than "
            f"{limit} (GUARD_MAX_PROMPT_TOKENS + GUARD_MAX_NEW_TOKENS)",
            code="context_length_exceeded",
        )
    result = await engine.score(prompt_ids, response_ids)
    await record_score(services, rid, model, result, answer)
    content = {
        "id": f"score-{rid}", "object": "guard.score", "created": int(time.time()),
        "model": model, "guard": result.guard_object(),
        "usage": usage(len(prompt_ids), len(response_ids)),
    }  # fmt: skip
    return JSONResponse(content, headers=result.headers(rid))


async def record_score(
    services: Services, rid: str, model: str, result: ScoreResult, answer: str
) -> None:
    services.metrics.observe_verdict(result)
    if services.audit is None or result.decision is Decision.PASS:
        return
    record = {
        "request_id": rid, "route": "score", "model": model, "risk": result.risk,
        "decision": result.decision.value, "aborted": False, "answer": answer,
        "probe": result.info.probe_name, "probe_sha256": result.info.probe_sha256,
    }  # fmt: skip
    await asyncio.to_thread(services.audit.write, record)
