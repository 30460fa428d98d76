"""`POST /v1/moderations` in OpenAI's shape, answered by a guard model (llamaherd.safety)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import HerdError
from .http import unless_disconnected


def routes() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/moderations")
    async def moderations(request: Request):
        from ..safety.moderation import ModerationSettings, moderations as moderate

        try:
            body = await request.json()
        except ValueError:
            raise HerdError("the body is not JSON") from None
        handler = request.app.state.handler
        settings = handler.moderator.settings if handler.moderator is not None else ModerationSettings.from_env()
        return JSONResponse(await unless_disconnected(request, moderate(handler.engine, body, settings)))

    return router
