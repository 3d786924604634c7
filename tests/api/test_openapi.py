"""``/openapi.json`` says what the server accepts and returns (the fuzz test checks the
server against it; these check that the facts are in it)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.fixtures.servers import AppFactory


def _schema(make_app: AppFactory, **settings: Any) -> dict[str, Any]:
    with TestClient(make_app(**settings)) as client:
        schema: dict[str, Any] = client.get("/openapi.json").json()
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _branches(prop: dict[str, Any]) -> list[dict[str, Any]]:
    return list(prop.get("anyOf", [prop]))


def test_the_200_bodies_are_documented(make_app: AppFactory) -> None:
    schema = _schema(make_app)
    paths, components = schema["paths"], schema["components"]["schemas"]
    for path, body, chunk in (
        ("/v1/chat/completions", "ChatCompletion", "ChatCompletionChunk"),
        ("/v1/completions", "TextCompletion", "TextCompletionChunk"),
    ):
        content = paths[path]["post"]["responses"]["200"]["content"]
        assert content["application/json"]["schema"] == _ref(body)
        event = content["text/event-stream"]["schema"]
        json_data, done = event["properties"]["data"]["anyOf"]
        assert json_data["contentSchema"]["oneOf"] == [_ref(chunk), _ref("ErrorResponse")]
        assert done == {"const": "[DONE]"} and chunk in components
    score = paths["/v1/guard/score"]["post"]["responses"]["200"]["content"]
    assert score["application/json"]["schema"] == _ref("ScoreResponse")
    guard = components["GuardObject"]["properties"]
    assert {"risk", "decision", "tokens", "scope", "withheld", "thresholds"} <= set(guard)
    assert all("422" not in op["responses"] for ops in paths.values() for op in ops.values())


def test_only_what_the_server_accepts_is_valid(make_app: AppFactory) -> None:
    components = _schema(make_app, max_new_tokens=7, max_prompt_tokens=99)["components"]
    schemas = components["schemas"]
    chat, text = schemas["ChatCompletionRequest"]["properties"], schemas["CompletionRequest"]
    assert [b.get("maximum") for b in _branches(chat["n"])] == [1, None]
    assert [b.get("maximum") for b in _branches(text["properties"]["best_of"])] == [1, None]
    for prop in (chat["max_tokens"], chat["max_completion_tokens"]):
        assert _branches(prop)[0]["maximum"] == 7
    ids = [b for b in _branches(text["properties"]["prompt"]) if b.get("type") == "array"][-1]
    assert ids["maxItems"] == 99 and ids["items"]["maximum"] == 258  # the tiny vocabulary - 1


def test_the_score_request_is_one_of_its_two_forms(make_app: AppFactory) -> None:
    schema = _schema(make_app)
    body = schema["paths"]["/v1/guard/score"]["post"]["requestBody"]["content"]
    forms = body["application/json"]["schema"]["oneOf"]
    assert forms == [_ref("QuestionAnswer"), _ref("Conversation")]
    components = schema["components"]["schemas"]
    assert set(components["QuestionAnswer"]["required"]) == {"question", "answer"}
    assert components["QuestionAnswer"]["not"] == {"required": ["messages"]}
    assert components["Conversation"]["required"] == ["messages"]
    assert components["Conversation"]["properties"]["messages"]["minItems"] == 2
