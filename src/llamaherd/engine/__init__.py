"""The serving engine: one model instance per loaded model, shared by every request.

- `scheduler`: continuous batching (what Ollama calls the runner's batch loop). A thread owns
  the model's runner and its KV cache rows; requests are
  prefilled (each token as if alone, a prompt's reusable prefix taken from the row that holds
  it), then decode together in one batched forward per step; each keeps its own sampling
  options, seed, stop conditions and grammar.
- `models`: the model lifecycle — load on first use, keep-alive, least-recently-used unloading —
  and the asyncio-facing `Engine` the server calls.
- `runner`: one runner per loaded model and backend (native CPU kernels, torch on CPU or CUDA),
  chosen at load: the only code that runs the model for the loops.
- `grammar`: constrained decoding (JSON mode, JSON schema) with llguidance.

Below it: `chat/` (templates, tools, text streaming), the model and the kernels. `Llama`
(llm.py) and the server both drive the scheduler: one pipeline.

Submodules are imported explicitly (`from llamaherd.engine.models import Engine`): this package
is imported by `llamaherd.llm`, so it must stay light.
"""
