"""`herd serve`: the Ollama and OpenAI APIs and the chat page."""

from __future__ import annotations

import argparse


def cmd_serve(args) -> int:
    """Serve the Ollama API (/api/...) and the OpenAI API (/v1/...) over one batching engine.

    Settings come from the environment: HERD_HOST (default 127.0.0.1:11434), HERD_ORIGINS,
    HERD_API_KEY, HERD_MAX_QUEUE, HERD_MAX_LOADED_MODELS, HERD_MAX_MEMORY, HERD_KEEP_ALIVE,
    HERD_NUM_PARALLEL, HERD_CONTEXT_LENGTH, HERD_MAX_BODY, HERD_NUM_THREADS, HERD_HOME
    (see llamaherd.server.app)."""
    from ..server.app import serve

    serve()
    return 0



def register(sub, local) -> None:
    serve = sub.add_parser("serve", help="serve the Ollama and OpenAI APIs", description=cmd_serve.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.set_defaults(func=cmd_serve)
