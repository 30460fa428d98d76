"""The OpenAPI schema of the server with its request bodies.

The routes read their bodies themselves (`http.parse_body`: one error format, strict types), so
FastAPI does not see them; here each JSON route's body schema (its pydantic wire type) is added
to `/openapi.json`. Clients get a schema that says what to send, and the fuzz tests
(tests/test_fuzz.py) generate requests from it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from . import schemas as s

BODIES: dict[tuple[str, str], type] = {
    ("post", "/api/generate"): s.GenerateRequest,
    ("post", "/api/chat"): s.ChatRequest,
    ("post", "/api/embed"): s.EmbedRequest,
    ("post", "/api/embeddings"): s.EmbeddingsRequest,
    ("post", "/api/show"): s.ModelRequest,
    ("post", "/api/pull"): s.ModelRequest,
    ("delete", "/api/delete"): s.ModelRequest,
    ("post", "/api/copy"): s.CopyRequest,
    ("post", "/api/create"): s.CreateRequest,
    ("post", "/v1/chat/completions"): s.ChatCompletionRequest,
    ("post", "/v1/completions"): s.CompletionRequest,
    ("post", "/v1/embeddings"): s.EmbeddingRequest,
}


def with_request_bodies(app: FastAPI) -> None:
    """Make `app.openapi()` describe the JSON bodies of the routes in `BODIES`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for (method, path), model in BODIES.items():
                operation = schema.get("paths", {}).get(path, {}).get(method)
                if operation is None:
                    continue
                body = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
                operation["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
