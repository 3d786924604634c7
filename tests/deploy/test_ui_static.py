"""The playground's files are served from /ui by the router alone, and reach for nothing
outside the server (no CDN, works offline)."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from guard.api import ui


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(ui.router)
    return TestClient(app)


def test_page_and_assets_are_served_with_their_types(client: TestClient) -> None:
    page = client.get("/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for src in re.findall(r'(?:src|href)="(/[^"]+)"', page.text):
        asset = client.get(src)
        assert asset.status_code == 200, src
    assert client.get("/ui/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/static/style.css").headers["content-type"].startswith("text/css")


def test_only_the_listed_assets_are_reachable(client: TestClient) -> None:
    assert client.get("/ui/static/index.html").status_code == 404
    assert client.get("/ui/static/..%2F..%2Fui.py").status_code == 404
    assert client.get("/ui/static/ui.py").status_code == 404


def test_trailing_slash_redirects_to_the_page(client: TestClient) -> None:
    response = client.get("/ui/", follow_redirects=False)
    assert response.status_code == 308 and response.headers["location"] == "/ui"


def test_static_files_load_nothing_from_other_origins() -> None:
    for path in ui.STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), (
            f"{path.name} refers to another origin"
        )
        assert "@import" not in text and "fonts.googleapis" not in text


def test_the_page_talks_to_the_openai_compatible_stream() -> None:
    script = (ui.STATIC_DIR / "app.js").read_text()
    assert '"/v1/chat/completions"' in script and "stream: true" in script
    assert "guard.tokens" in script and "guard.layers" in script and "[DONE]" in script
