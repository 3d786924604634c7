"""Serving logic of ``POST /v1/guard/score``: one teacher-forced pass on the worker thread.

The answer is the client's own text, so an abstained score withholds nothing: its tokens
keep their text (the decision says what the guard would have done with it).
"""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse

from guard.api.bodies import guard_headers, score_response
from guard.api.deps import Services
from guard.api.errors import invalid
from guard.api.schemas import QuestionAnswer, ScoreRequest
from guard.api.serving import check_model
from guard.results import Decision, ScoreResult


async def score_answer(services: Services, body: ScoreRequest, rid: str) -> JSONResponse:
    """The ``guard`` object of a given answer, with the usual guard headers."""
    engine = services.require_ready()
    model = check_model(services, body.model)
    if isinstance(body, QuestionAnswer):
        prompt_ids = engine.encode_question(body.question)
        answer = body.answer
    else:
        prompt_ids = engine.encode_chat([m.as_template() for m in body.messages[:-1]])
        answer = body.messages[-1].text()
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
    body_out = score_response(rid, model, int(time.time()), result, len(prompt_ids))
    return JSONResponse(body_out.model_dump(mode="json"), headers=guard_headers(result, rid))


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
