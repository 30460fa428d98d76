"""Continuous batching: one thread owns one model instance and interleaves all of its requests.

Every request (a `Job`) gets a row of the KV cache for its whole life. One turn of the loop:

1. drop cancelled jobs — their rows are free at once — and give free rows to waiting jobs (the
   row that holds the longest reusable prefix of the prompt: see "Prompt reuse" below);
2. prefill up to `PREFILL_BUDGET` prompt tokens of the waiting jobs, in chunks of `PREFILL_CHUNK`
   tokens at fixed positions (on the native path in one call for all of them, each token computed
   as if alone); a job whose prompt is done samples its first token and joins the running set;
3. one decode step for all running jobs: a single batched forward in which every row is at its
   own position (`decode.decode_step`);
4. each job samples its next token with its own options and `torch.Generator`, checks its stop
   tokens, stop strings, grammar and limits, and streams what it made.

Same output alone or in a crowd. A request's numbers must not depend on who else is running, so
that greedy output is reproducible: prefill runs alone, chunked at positions that depend only on
the prompt, and the decode step (`decode.decode_step`) computes every row exactly as if it were
alone — batched linear layers, row-by-row attention (see there why).

Prompt reuse. A row that a job has left still holds the keys and values of its prompt, and a new
job whose prompt starts with the same tokens (a chat's next turn, a shared system prompt) takes
that row and prefills only the rest. Only what a fresh prefill would compute to the same bits is
reused: whole units of the prompt path (`native.DENSE_ROWS` positions on the native path, a
`PREFILL_CHUNK` on the torch one) that lay inside the earlier prompt — not the reply's tokens, which
decoding computed in another way. So the output is the same with or without the reuse (tested).

The KV cache is `n_rows` rows by `capacity` positions; the capacity grows
(doubling, up to the model's context length) when a sequence needs it. On the CPU the cache is
lazily committed memory (`kvcache`): a row costs memory for the positions it holds, and a row given
back returns what it does not keep, so one long request does not grow every row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from ..errors import HerdError
from ..generate import SamplingOptions, make_generator, sample
from ..quantize import native
from . import kvcache
from .decode import decode_step
from .text import TextStream, common_prefix
from .types import Delta, Done, TokenLogprob

log = logging.getLogger("llamaherd.engine")

PREFILL_CHUNK = 512  # prompt tokens per prefill forward
PREFILL_BUDGET = 512  # prompt tokens prefilled between two decode steps, so running streams keep flowing
MIN_CAPACITY = 256


class Job:
    """One generation inside a scheduler. Only the scheduler thread changes it after `submit`.

    Args:
        prompt: the prompt's token ids (not empty, shorter than `opts.num_ctx`).
        opts: sampling options with `num_ctx` set.
        stop_ids: tokens that end the generation (not emitted).
        tokenizer: for the text of the tokens.
        emit: called on the scheduler thread with each `Delta`, then a `Done` — or an exception.
        logprobs: None, or k >= 0: report each chosen token's logprob and its k best alternatives.
        constraint: a grammar (`grammar.Constraint`) the output must follow, or None.
    """

    def __init__(self, prompt: Sequence[int], opts: SamplingOptions, stop_ids: frozenset[int], tokenizer,
                 emit: Callable[[Any], None], *, logprobs: int | None = None, constraint=None):
        if not prompt:
            raise HerdError("the prompt is empty")
        if opts.num_ctx is None:
            raise ValueError("opts.num_ctx must be set")
        if len(prompt) >= opts.num_ctx:
            raise HerdError(f"the prompt is {len(prompt)} tokens, which does not fit the context of "
                            f"{opts.num_ctx} (raise num_ctx or shorten the prompt)")
        self.prompt = list(prompt)
        self.opts = opts
        self.stop_ids = stop_ids
        self.emit = emit
        self.logprobs = logprobs
        self.constraint = constraint
        self.text = TextStream(tokenizer, opts.stop)
        self.history = list(prompt)
        self.generated: list[int] = []
        self.budget = opts.num_predict if opts.num_predict >= 0 else opts.num_ctx
        self.generator: torch.Generator | None = None  # made when the job starts (seed None: fresh entropy)
        self.row: int | None = None
        self.prefilled = 0
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.cancelled = False
        self.finished = False
        self.submitted_at = time.perf_counter_ns()
        self.started_at: int | None = None  # first prefill chunk
        self.first_token_at: int | None = None

    def cancel(self) -> None:
        """Stop as soon as possible; nothing more is emitted. Safe from any thread."""
        self.cancelled = True


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s log-probability under logits (V,) and the k most likely tokens."""
    logp = torch.log_softmax(logits, dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(logp, k)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logp[token]), top)


class Scheduler:
    """Owns `model` (and its KV cache) on one thread; runs every job submitted to it.

    Args:
        model: a `Transformer`. Nothing else may use it while the scheduler runs; use `call` to run
            other work (scoring, embeddings) on the scheduler's thread between steps.
        n_rows: jobs that can run at once (KV-cache rows); more wait in a queue.
        max_ctx: the largest num_ctx a job may have (the model's context length).
        name: for the thread's name and logs.
    """

    def __init__(self, model, *, n_rows: int, max_ctx: int, name: str = "model"):
        self.model = model
        self.n_rows = n_rows
        self.max_ctx = max_ctx
        self.name = name
        self.device = model.norm.weight.device
        self._free = list(range(n_rows))  # least recently freed first
        self._kept: list[list[int]] = [[] for _ in range(n_rows)]  # per row: the prompt prefix it can give again
        self.reused_tokens = 0  # prompt tokens not computed again thanks to a kept prefix (stats, tests)
        self._capacity = 0
        self._waiting: deque[Job] = deque()
        self._prefilling: list[Job] = []
        self._running: list[Job] = []
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run (for tests and stats)
        self.max_batch_seen = 0
        self._thread = threading.Thread(target=self._run, name=f"herd-scheduler-{name}", daemon=True)
        self._thread.start()

    # -- used from other threads ------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise HerdError(f"model '{self.name}' is being unloaded")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._cond:
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the scheduler thread between two steps (it may use the model); its result
        or exception comes back through the returned future."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise HerdError(f"model '{self.name}' is being unloaded")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_active(self) -> int:
        """Jobs submitted and not finished, and calls not yet run."""
        return len(self._waiting) + len(self._prefilling) + len(self._running) + len(self._calls)

    @property
    def rows_in_use(self) -> int:
        return self.n_rows - len(self._free)

    def kv_bytes(self) -> int:
        """Bytes the KV cache holds: the positions rows hold where it is lazy, else all of it."""
        cache = self.model.layers[0].attention.cache
        if cache is None:
            return 0
        if kvcache.is_lazy(self.model):
            return sum(self._row_lengths()) * kvcache.bytes_per_position(self.model)
        return len(self.model.layers) * 2 * cache.k.numel() * cache.k.element_size()

    def kept_bytes(self) -> int:
        """Bytes of the prompt prefixes free rows keep for reuse (what `forget_kept` gives back)."""
        return sum(len(self._kept[r]) for r in list(self._free)) * kvcache.bytes_per_position(self.model)

    def forget_kept(self) -> None:
        """Drop the prefixes free rows keep and give their memory back. Scheduler thread (`call`)."""
        for r in self._free:
            self._kept[r] = []
            kvcache.release(self.model, r, 0)

    def _row_lengths(self) -> list[int]:
        """Positions each row holds: a job's tokens so far, or the prefix a free row keeps."""
        lengths = [len(k) for k in self._kept]
        held = [(j, j.prefilled) for j in list(self._prefilling)] + [(j, len(j.history)) for j in list(self._running)]
        for job, n in held:
            row = job.row
            if row is not None:
                lengths[row] = max(lengths[row], n)
        return lengths

    def close(self) -> None:
        """Stop the thread; jobs still queued or running end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the scheduler thread ---------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not (self._waiting or self._prefilling or self._running
                                                    or self._calls):
                        self._cond.wait()
                    if self._closed:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                for fn, future in calls:
                    self._run_call(fn, future)
                self._drop_cancelled()
                self._admit()
                self._prefill()
                if self._running:
                    self._decode()
            self._shutdown()

    def _run_call(self, fn, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:  # noqa: BLE001 — handed to the caller, who re-raises it
            future.set_exception(e)

    def _shutdown(self) -> None:
        error = HerdError(f"model '{self.name}' was unloaded")
        with self._cond:
            jobs = list(self._waiting) + self._prefilling + self._running
            self._waiting.clear()
            calls = list(self._calls)
            self._calls.clear()
        self._prefilling, self._running = [], []
        for job in jobs:
            if not job.cancelled and not job.finished:
                job.finished = True
                self._emit(job, error)
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        self.model.clear_cache()
        self._capacity = 0  # the next cache starts with nothing kept (`_ensure_capacity`)

    def _emit(self, job: Job, event: Any) -> None:
        try:
            job.emit(event)
        except Exception:  # the receiver is gone (its event loop closed): nothing to tell
            log.debug("dropping an event for a job whose receiver is gone", exc_info=True)
            job.cancelled = True

    def _free_row(self, job: Job) -> None:
        if job.row is not None:
            kvcache.release(self.model, job.row, len(self._kept[job.row]))  # keeps only the reusable prefix
            self._free.append(job.row)
            job.row = None

    def _drop_cancelled(self) -> None:
        with self._cond:
            if any(j.cancelled for j in self._waiting):
                self._waiting = deque(j for j in self._waiting if not j.cancelled)
        for job in self._prefilling + self._running:
            if job.cancelled:
                job.finished = True
                self._free_row(job)
        self._prefilling = [j for j in self._prefilling if not j.finished]
        self._running = [j for j in self._running if not j.finished]

    def _admit(self) -> None:
        while self._free:
            with self._cond:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if job.cancelled:
                continue
            try:
                job.generator = make_generator(job.opts.seed)
            except Exception as e:  # noqa: BLE001 — an error here used to end the scheduler thread,
                self._fail(job, e)  # leaving every later request for the model waiting forever
                continue
            if job.budget == 0:  # num_predict 0: nothing to generate, not even a prefill
                job.started_at = job.first_token_at = time.perf_counter_ns()
                self._finish(job, "length")
                continue
            self._take_row(job)
            self._prefilling.append(job)

    def _reuse_unit(self) -> int:
        """Prompt positions are computed the same from scratch and after a kept prefix only if the
        prefix ends where a fresh prefill starts a new piece of work (see the module's docstring)."""
        return native.DENSE_ROWS if native.prompts_native(self.model) else PREFILL_CHUNK

    def _take_row(self, job: Job) -> None:
        """Give `job` the free row that holds the longest reusable prefix of its prompt, or else the
        one left longest ago (whose prefix is the least likely to be asked for again)."""
        row, n = self._free[0], 0
        if self._capacity:
            unit = self._reuse_unit()
            for r in self._free:
                # at least one prompt token is left to compute: its logits give the first token
                k = min(common_prefix(self._kept[r], job.prompt), len(job.prompt) - 1) // unit * unit
                if k > n:
                    row, n = r, k
        self._free.remove(row)
        job.row, job.prefilled = row, n
        self._kept[row] = job.prompt[:n]  # the rest of the row is about to be overwritten
        self.reused_tokens += n

    def _ensure_capacity(self, n: int) -> None:
        """Make the KV cache hold at least n positions per row, keeping what it holds."""
        if n <= self._capacity:
            return
        new = min(self.max_ctx, max(MIN_CAPACITY, 1 << (n - 1).bit_length()))
        layers = self.model.layers
        old = [(layer.attention.cache.k, layer.attention.cache.v) for layer in layers] if self._capacity else None
        if old is None:  # a new cache holds no one's prompt
            self._kept = [[] for _ in range(self.n_rows)]
        lengths = self._row_lengths()
        if self.device.type == "cpu":
            kvcache.setup_lazy_cache(self.model, self.n_rows, new)
        else:
            self.model.setup_cache(self.n_rows, new)
        if old:
            for layer, (k, v) in zip(layers, old):
                for row, n in enumerate(lengths):  # only what rows hold: the rest stays uncommitted
                    n = min(n, k.shape[2])
                    if n:
                        layer.attention.cache.k[row, :, :n] = k[row, :, :n]
                        layer.attention.cache.v[row, :, :n] = v[row, :, :n]
        self._capacity = new

    def _prefill(self) -> None:
        """Prefill the next chunk of the waiting prompts, as many as PREFILL_BUDGET tokens take (at
        least one), in one native call where the model has it (every token still gets the numbers it
        gets alone); then the running streams get their next step."""
        if not self._prefilling:
            return
        batch, budget = [], PREFILL_BUDGET
        for job in self._prefilling:
            start = job.prefilled
            end = min(len(job.prompt), (start // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
            if batch and end - start > budget:
                break
            batch.append((job, start, end))
            budget -= end - start
        now = time.perf_counter_ns()
        for job, _, _ in batch:
            job.started_at = job.started_at or now
        try:
            self._ensure_capacity(max(end for _, _, end in batch))
            logits = native.prefill_many(self.model, [(job.prompt[s:e], s, job.row) for job, s, e in batch])
            if logits is None:  # not a GGUF-block model on a CPU: the torch modules, a prompt at a time
                logits = [self.model(torch.tensor([job.prompt[s:e]], device=self.device),
                                     torch.arange(s, e, device=self.device)[None],
                                     rows=torch.tensor([job.row], device=self.device), last_only=True)[0, -1]
                          for job, s, e in batch]
        except Exception as e:  # noqa: BLE001 — a failed forward fails these jobs, not the server
            log.exception("prefill failed")
            for job, _, _ in batch:
                self._prefilling.remove(job)
                self._fail(job, e)
            return
        for (job, _, end), row_logits in zip(batch, logits):
            job.prefilled = end
            if end == len(job.prompt):
                unit = self._reuse_unit()
                self._kept[job.row] = job.prompt[:end // unit * unit]
                self._prefilling.remove(job)
                self._running.append(job)
                self._advance(job, row_logits.float())
        self._running = [j for j in self._running if not j.finished]

    def _decode(self) -> None:
        jobs = self._running
        n = len(jobs)
        positions = [len(j.history) - 1 for j in jobs]
        try:
            self._ensure_capacity(max(positions) + 1)
            logits = decode_step(self.model, [j.next_token for j in jobs], positions, [j.row for j in jobs]).float()
        except Exception as e:  # noqa: BLE001
            log.exception("decode step failed")
            for job in jobs:
                self._fail(job, e)
            self._running = []
            return
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, n)
        if logits.device.type != "cpu":
            logits = logits.cpu()
        for job, row in zip(jobs, logits):
            self._advance(job, row)
        self._running = [j for j in self._running if not j.finished]

    def _advance(self, job: Job, logits: torch.Tensor) -> None:
        """Sample the job's next token from its logits (V,) float32 and act on it."""
        if job.cancelled:
            return
        now = time.perf_counter_ns()
        if job.first_token_at is None:
            job.first_token_at = now
        try:
            scores = logits if job.constraint is None else job.constraint.mask(logits)
            token = sample(scores, job.history, job.opts, job.generator)
            lp = None if job.logprobs is None else [token_logprob(logits, token, job.logprobs)]
            if token in job.stop_ids:
                return self._finish(job, "stop")
            if job.constraint is not None:
                job.constraint.accept(token)
        except Exception as e:  # noqa: BLE001 — e.g. a grammar error: this job fails, others go on
            log.exception("sampling failed")
            return self._fail(job, e)
        job.generated.append(token)
        job.history.append(token)
        text = job.text.push(token)
        self._emit(job, Delta(text, (token,), lp))
        if job.text.stopped or (job.constraint is not None and job.constraint.done):
            return self._finish(job, "stop")
        if len(job.generated) >= job.budget or len(job.history) >= job.opts.num_ctx:
            return self._finish(job, "length")
        job.next_token = token

    def _finish(self, job: Job, reason: str) -> None:
        job.finished = True
        self._free_row(job)
        if job.cancelled:
            return
        rest = job.text.finish()
        if rest:
            self._emit(job, Delta(rest))
        end = time.perf_counter_ns()
        started = job.started_at or end
        first = job.first_token_at or end
        self._emit(job, Done(reason, prompt_eval_count=job.prefilled, prompt_eval_duration=first - started,
                             eval_count=len(job.generated), eval_duration=end - first,
                             context=job.history))

    def _fail(self, job: Job, error: BaseException) -> None:
        job.finished = True
        self._free_row(job)
        if not job.cancelled:
            self._emit(job, error)
