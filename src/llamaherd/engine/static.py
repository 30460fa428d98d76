"""A decode step of static shapes over every row of the KV cache: what `torch.compile` turns into
one graph, replayed on CUDA as one CUDA graph (`GraphedStep`): gpt-fast's decode, batched.

The server's batch lives in B slots, the KV cache's rows. Each step feeds one token to every row:
a row with nothing to decode gets a dummy token whose keys and values are not written (`active`
False: the cache keeps what it held). Attention runs over the whole cache with a mask of the
positions each row has reached. So no shape depends on which rows decode or where they are: the
step is captured once per cache size (it grows by doubling, `Scheduler._ensure_capacity`) and no
Python runs between its kernels.

The price is attention over the whole capacity rather than each row's own keys, and work for
the idle rows: on a GPU, where a step is bound by reading the weights once for all rows, both are
small next to the launches they save. The eager row-exact step (`decode.decode_step`) stays the
default on a CPU; this one runs when the runner compiles (`TorchRunner(compile=True)`: by default on
CUDA, HERD_COMPILE=1 elsewhere).
Equal to the eager step within float tolerance (tests/test_compiled.py), not to the bit: other
kernels, other summation orders.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from .decode import _projections


class StaticStep(nn.Module):
    """`step(inputs)` -> logits (B, V) in the model's dtype, B = the cache's rows.

    Args:
        inputs: (3, B) integers (`step_inputs`; row i of the cache is column i): the token each
            row feeds (anything for an idle row), its position (the number of tokens before it
            in that row's sequence), and 1 if the row decodes, 0 if idle (its cache is left as
            it was). One tensor, so a step costs one copy to the device.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        model = self.model
        tokens, positions, active = inputs.unbind(0)
        B = tokens.shape[0]
        S = model.layers[0].attention.cache.k.shape[2]
        rows = torch.arange(B, device=tokens.device)
        rope = model.rope[positions][:, None]  # (B, 1, Dh/2, 2)
        sees = torch.arange(S, device=tokens.device)[None, :] <= positions[:, None]  # (B, S)
        mask = sees[:, None, None, :]  # (B, 1, 1, S): each row's keys up to its own position
        keep = (active != 0)[:, None, None]  # (B, 1, 1)
        x = model.tok_embeddings(tokens)[:, None]  # (B, 1, D)
        for layer in model.layers:
            attn = layer.attention
            q, k, v = _projections(attn, layer.attention_norm(x), rope)  # (B, 1, H|K, Dh)
            cache = attn.cache
            # An idle row writes back what its slot held: a static write that changes nothing.
            cache.k[rows, :, positions] = torch.where(keep, k[:, 0].to(cache.k.dtype), cache.k[rows, :, positions])
            cache.v[rows, :, positions] = torch.where(keep, v[:, 0].to(cache.v.dtype), cache.v[rows, :, positions])
            y = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k.to(q.dtype), cache.v.to(q.dtype),
                                               attn_mask=mask, enable_gqa=True)  # (B, H, 1, Dh)
            x = x + attn.wo(y.transpose(1, 2).reshape(B, 1, -1))
            x = x + layer.feed_forward(layer.ffn_norm(x))
        return model.output(model.norm(x))[:, 0]


_CAPTURING = threading.Lock()


class GraphedStep:
    """A compiled `StaticStep` captured as one CUDA graph per KV cache, replayed every step.

    Ours rather than inductor's mode "reduce-overhead": its graphs belong to the thread that
    recorded them (the server decodes on its batch loop's thread, and they failed there on an
    H200), and a graph of the whole step needs no checks of its inputs per call. The step's
    inputs are copied into buffers the graph reads; its logits are the graph's own output buffer,
    valid until the next call. A new cache (it grew, or a new batch size) means new addresses: the
    step is captured again (`key`: the first layer's key tensor, held so its address is never reused).
    """

    def __init__(self, step):
        self.step = step
        self.graph = self.key = self.inputs = self.out = None

    def reset(self) -> None:
        """Drop the graph and its memory (the cache it wrote is gone)."""
        self.graph = self.key = self.inputs = self.out = None

    def __call__(self, key: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(key.device):  # the model's GPU, whatever the thread's current one is
            if self.graph is None or key is not self.key:
                self._capture(key, inputs)
            else:
                self.inputs.copy_(inputs)
            self.graph.replay()
            return self.out

    def _capture(self, key: torch.Tensor, inputs: torch.Tensor) -> None:
        self.reset()
        self.inputs = inputs.clone()
        # Compile (and let inductor tune) outside the capture, on a side stream as capture wants.
        # The step run twice is the step run once: the same keys and values land in the same slots.
        side = torch.cuda.Stream()
        with _CAPTURING:  # one capture at a time in a process (torch's rule): models decode on their own threads
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self.out = self.step(self.inputs)
        self.graph, self.key = graph, key


def step_inputs(n_rows: int, tokens: list[int], positions: list[int], rows: list[int], device) -> torch.Tensor:
    """The (3, n_rows) inputs of a `StaticStep` in which `rows` (distinct) decode."""
    tok, pos, act = [0] * n_rows, [0] * n_rows, [0] * n_rows
    for t, p, r in zip(tokens, positions, rows):
        tok[r], pos[r], act[r] = t, p, 1
    return torch.tensor([tok, pos, act], device=device)
