"""The serving engine: one model instance per loaded model, shared by every request.

- `scheduler`: continuous batching. A thread owns the model and its KV cache rows; requests are
  prefilled (each token as if alone, a prompt's reusable prefix taken from the row that holds
  it), then decode together in one batched forward per step; each keeps its own sampling
  options, seed, stop conditions and grammar.
- `models`: the model lifecycle — load on first use, keep-alive, least-recently-used unloading —
  and the asyncio-facing `Engine` the server calls.
- `grammar`: constrained decoding (JSON mode, JSON schema) with llguidance.
- `tools`: tool definitions into the prompt, tool calls out of the reply.
- `text`: tokens -> text with stop strings held back (shared with `Llama.stream`).

Submodules are imported explicitly (`from llamaherd.engine.models import Engine`): this package
is imported by `llamaherd.llm`, so it must stay light.
"""
