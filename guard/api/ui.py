"""The browser playground: plain static files under ``/ui``, no CDN, works offline.

The page (``guard/api/static/``) streams ``POST /v1/chat/completions`` and shades each
token by the risk in the chunk's ``guard`` object. ``create_app`` mounts it with

    app.include_router(ui.router)
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

from guard.errors import GuardError

STATIC_DIR = Path(__file__).resolve().parent / "static"

# The only files served: a fixed list, so no request path ever reaches the filesystem.
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

# The page talks to nothing but this origin (that is also what keeps it offline).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


def _static(name: str, media_type: str) -> FileResponse:
    path = STATIC_DIR / name
    if not path.is_file():
        raise GuardError(
            f"playground file {path} is missing: reinstall hallucination-guard "
            "(guard/api/static/* is package data)"
        )
    return FileResponse(
        path,
        media_type=media_type,
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


@router.get("/ui")
def playground() -> FileResponse:
    """The playground page."""
    return _static("index.html", "text/html; charset=utf-8")


@router.get("/ui/")
def playground_slash() -> RedirectResponse:
    """``/ui/`` is the same page (relative asset URLs resolve the same from both)."""
    return RedirectResponse("/ui", status_code=308)


@router.get("/ui/static/{name}")
def asset(name: str) -> FileResponse:
    """``app.js`` or ``style.css``; anything else is 404."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"no playground asset {name!r}")
    return _static(name, media_type)
