"""The chat page of `herd serve`: static files under `static/`, served at `/ui/`.

The page is plain JavaScript over the public Ollama API (`/api/tags`, `/api/ps`, `/api/pull`,
`/api/chat`); it needs no build step and loads nothing from other hosts (its vendored libraries
are listed in `static/vendor/LICENSES.md`).

`GET /` keeps answering API clients as Ollama does ("Ollama is running"); a browser, which asks
for `text/html`, is redirected to the page instead.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PATH = "/ui"


class BrowserRedirect:
    """ASGI middleware: `GET /` from a browser (Accept names text/html) -> 307 to the chat page."""

    def __init__(self, app, target: str = PATH + "/"):
        self.app = app
        self.target = target

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") == "/" and scope.get("method") == "GET":
            accept = dict(scope.get("headers", [])).get(b"accept", b"")
            if b"text/html" in accept:
                return await RedirectResponse(self.target, 307)(scope, receive, send)
        await self.app(scope, receive, send)


def mount_ui(app: FastAPI) -> None:
    """Serve the chat page at `/ui/` and send browsers that open `/` there."""
    app.mount(PATH, StaticFiles(directory=STATIC, html=True), name="ui")
    app.add_middleware(BrowserRedirect)
