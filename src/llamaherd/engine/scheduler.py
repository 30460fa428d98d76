"""Continuous batching: one thread owns one model instance and interleaves all of its requests.

Every request (a `Job`) gets a row of the KV cache for its whole life. One turn of the loop:

1. drop cancelled jobs — their rows are free at once — and give free rows to waiting jobs (the
   row that holds the longest reusable prefix of the prompt: see "Prompt reuse" below);
2. prefill up to `PREFILL_BUDGET` prompt tokens of the waiting jobs, in chunks of `PREFILL_CHUNK`
   tokens at fixed positions (`Runner.prefill`: each token computed as if alone); a job whose
   prompt is done samples its first token and joins the running set;
3. one decode step for all running jobs: a single batched step in which every row is at its
   own position (`Runner.decode`);
4. each job samples its next token with its own options and `torch.Generator`, checks its stop
   tokens, stop strings, grammar and limits, and streams what it made.

Same output alone or in a crowd. A request's numbers must not depend on who else is running, so
that greedy output is reproducible: prefill runs alone, chunked at positions that depend only on
the prompt, and the decode step (`Runner.decode`) computes every row exactly as if it were
alone (see `engine/decode.py` why that takes care).

Prompt reuse. A row that a job has left still holds the keys and values of its prompt, and a new
job whose prompt starts with the same tokens (a chat's next turn, a shared system prompt) takes
that row and prefills only the rest. Only what a fresh prefill would compute to the same bits is
reused: whole units of the prompt path (`Runner.reuse_unit`) that lay inside the earlier prompt — not the reply's tokens, which
decoding computed in another way. So the output is the same with or without the reuse (tested).

Shared prompts. K samples of one prompt (rejection sampling) are one job and its `forks`
(`submit(job, forks=...)`): the group waits until a row is free for each, the prompt is prefilled
once into the job's row, its keys and values are copied into the forks' rows (`Runner.fork`), and
each fork samples its first token from the same logits with its own options and generator. A copy
holds the bits a prefill would, so each sample is what it would be alone.

The KV cache is `n_rows` rows by `capacity` positions; the capacity grows
(doubling, up to the model's context length) when a sequence needs it. On the CPU the cache is
lazily committed memory (`kvcache`): a row costs memory for the positions it holds, and a row given
back returns what it does not keep, so one long request does not grow every row.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from ..errors import HerdError
from ..generate import PromptLookup, SamplingOptions, make_generator, sample
from .runner import PREFILL_CHUNK, Runner
from ..chat.text import TextStream, common_prefix
from .types import Delta, Done, TokenLogprob

log = logging.getLogger("llamaherd.engine")

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
        self.reused = 0  # prompt tokens taken from a kept prefix, not computed
        self.lookup: PromptLookup | None = None  # draft tokens, when the job speculates
        self.forks: list[Job] = []  # jobs with this prompt that take its prefill (`Scheduler.submit`)
        self.guesses = opts.speculate  # how many drafts to check next, adapted to how many hold

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


def _heir(job: Job) -> Job | None:
    """A waiting `job`, or if it is cancelled the first of its forks that is not (taking the others
    as its forks); None if all are."""
    if not job.cancelled:
        return job
    live = [f for f in job.forks if not f.cancelled]
    if live:
        live[0].forks = live[1:]
        return live[0]
    return None


_live: weakref.WeakSet = weakref.WeakSet()  # every batch loop whose thread may still run


@atexit.register
def _close_all() -> None:
    """Stop every batch loop before the interpreter finalizes. A daemon thread still inside a torch
    or native call then is ended by pthread_exit as it takes the GIL back, an unwind through C++
    frames that aborts the process ("terminate called without an active exception"), after a
    `herd run` whose reply was already printed."""
    for scheduler in list(_live):
        scheduler.close()


class Scheduler:
    """Owns `model` (and its KV cache) on one thread; runs every job submitted to it.

    Args:
        runner: the model's `Runner`. Nothing else may use it while the scheduler runs; use `call`
            to run other work (scoring, embeddings) on the scheduler's thread between steps.
        n_rows: jobs that can run at once (KV-cache rows); more wait in a queue.
        max_ctx: the largest num_ctx a job may have (the model's context length).
        name: for the thread's name and logs.
    """

    def __init__(self, runner: Runner, *, n_rows: int, max_ctx: int, name: str = "model"):
        self.runner = runner
        self.n_rows = n_rows
        self.max_ctx = max_ctx
        self.name = name
        self._free = list(range(n_rows))  # least recently freed first
        self._kept: list[list[int]] = [[] for _ in range(n_rows)]  # per row: the prompt prefix it can give again
        self.reused_tokens = 0  # prompt tokens not computed again thanks to a kept prefix (stats, tests)
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
        _live.add(self)

    # -- used from other threads ------------------------------------------------------------

    def submit(self, job: Job, forks: Sequence[Job] = ()) -> None:
        """Queue `job`. `forks`: more jobs with the same prompt (each with its own options and
        seed) that share its prefill: the prompt is computed once and its keys and values copied
        into their rows. A group needs a free row for each of its jobs at once."""
        if any(f.prompt != job.prompt for f in forks):
            raise ValueError("forks must have the job's prompt")
        if len(forks) >= self.n_rows:
            raise ValueError(f"{len(forks) + 1} jobs sharing a prompt need as many rows; "
                             f"the scheduler has {self.n_rows}")
        job.forks = list(forks)
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
        """Bytes the KV cache holds (on the CPU, only the positions rows hold)."""
        return self.runner.kv_bytes(self._row_lengths())

    def kept_bytes(self) -> int:
        """Bytes of the prompt prefixes free rows keep for reuse (what `forget_kept` gives back)."""
        return sum(len(self._kept[r]) for r in list(self._free)) * self.runner.bytes_per_position

    def forget_kept(self) -> None:
        """Drop the prefixes free rows keep and give their memory back. Scheduler thread (`call`)."""
        for r in self._free:
            self._kept[r] = []
            self.runner.release_row(r, 0)

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
                    # One call a turn, then a step: embeddings and scores (one input each) interleave
                    # with decoding instead of holding every stream for all of them.
                    calls = [self._calls.popleft()] if self._calls else []
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
            jobs += [f for j in jobs for f in j.forks]
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
        self.runner.release()

    def _emit(self, job: Job, event: Any) -> None:
        try:
            job.emit(event)
        except Exception:  # the receiver is gone (its event loop closed): nothing to tell
            log.debug("dropping an event for a job whose receiver is gone", exc_info=True)
            job.cancelled = True

    def _free_row(self, job: Job) -> None:
        if job.row is not None:
            self.runner.release_row(job.row, len(self._kept[job.row]))  # keeps only the reusable prefix
            self._free.append(job.row)
            job.row = None

    def _drop_cancelled(self) -> None:
        with self._cond:
            if any(j.cancelled for j in self._waiting):
                self._waiting = deque(j for j in map(_heir, self._waiting) if j is not None)
        for job in self._prefilling + self._running:
            if job.cancelled:
                job.finished = True
                self._pass_on(job)
                self._free_row(job)
        self._prefilling = [j for j in self._prefilling if not j.finished]
        self._running = [j for j in self._running if not j.finished]

    def _admit(self) -> None:
        while self._free:
            with self._cond:
                if not self._waiting or len(self._waiting[0].forks) >= len(self._free):
                    return  # (a group waits for a row for each of its jobs)
                job = self._waiting.popleft()
            members, job.forks = (job, *job.forks), []
            group = [j for j in members if self._start(j)]
            if not group:
                continue
            job, job.forks = group[0], group[1:]
            self._take_row(job)
            for fork in job.forks:  # rows the prefill will be copied into
                fork.row = self._free.pop(0)
                self._kept[fork.row] = []
            self._prefilling.append(job)

    def _start(self, job: Job) -> bool:
        """Get `job` ready to run; False if it is over already (cancelled, failed, nothing to make)."""
        if job.cancelled:
            return False
        try:
            job.generator = make_generator(job.opts.seed)
        except Exception as e:  # noqa: BLE001 — fail this job; the loop (and every later job) goes on
            self._fail(job, e)
            return False
        if job.budget == 0:  # num_predict 0: nothing to generate, not even a prefill
            job.started_at = job.first_token_at = time.perf_counter_ns()
            self._finish(job, "length")
            return False
        if job.opts.speculate and job.opts.temperature <= 0 and self.runner.speculates and job.constraint is None:
            job.lookup = PromptLookup(job.prompt)
        return True

    def _take_row(self, job: Job) -> None:
        """Give `job` the free row that holds the longest reusable prefix of its prompt, or else the
        one left longest ago (whose prefix is the least likely to be asked for again)."""
        row, n = self._free[0], 0
        if self.runner.n_rows == self.n_rows:  # the cache is ours: its rows hold what _kept says
            unit = self.runner.reuse_unit
            for r in self._free:
                # at least one prompt token is left to compute: its logits give the first token
                k = min(common_prefix(self._kept[r], job.prompt), len(job.prompt) - 1) // unit * unit
                if k > n:
                    row, n = r, k
        self._free.remove(row)
        job.row, job.prefilled, job.reused = row, n, n
        self._kept[row] = job.prompt[:n]  # the rest of the row is about to be overwritten
        self.reused_tokens += n

    @property
    def capacity(self) -> int:
        """Positions per row of the KV cache (0: none, or not ours)."""
        return self.runner.capacity if self.runner.n_rows == self.n_rows else 0

    def _ensure_capacity(self, n: int) -> None:
        """Make the KV cache hold at least n positions per row, keeping what it holds: it grows by
        doubling, so memory follows the longest live sequence."""
        if n <= self.capacity:
            return
        new = min(self.max_ctx, max(MIN_CAPACITY, 1 << (n - 1).bit_length()))
        if self.runner.allocate(self.n_rows, new, self._row_lengths()):  # a new cache holds no one's prompt
            self._kept = [[] for _ in range(self.n_rows)]

    def _prefill(self) -> None:
        """Prefill the next chunk of the waiting prompts, as many as PREFILL_BUDGET tokens take (at
        least one), in one runner call (every token still gets the numbers it gets alone); then the
        running streams get their next step."""
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
            logits = self.runner.prefill([(job.prompt[s:e], s, job.row) for job, s, e in batch]).cpu()
        except Exception as e:  # noqa: BLE001 — a failed forward fails these jobs, not the server
            log.exception("prefill failed")
            for job, _, _ in batch:
                self._prefilling.remove(job)
                self._fail(job, e)
            return
        for (job, _, end), row_logits in zip(batch, logits):
            job.prefilled = end
            if end == len(job.prompt):
                unit = self.runner.reuse_unit
                self._kept[job.row] = job.prompt[:end // unit * unit]
                self._prefilling.remove(job)
                self._running.append(job)
                self._fork(job, row_logits)
                self._advance(job, row_logits)
        self._running = [j for j in self._running if not j.finished]

    def _fork(self, job: Job, logits: torch.Tensor) -> None:
        """Give `job`'s prefilled prompt to its forks (see "Shared prompts"); they join the running set."""
        forks, job.forks = job.forks, []
        for fork in forks:
            if fork.cancelled:
                fork.finished = True
                self._free_row(fork)
        forks = [f for f in forks if not f.finished]
        if not forks:
            return
        try:
            self.runner.fork(job.row, [f.row for f in forks], len(job.prompt))
        except Exception as e:  # noqa: BLE001 — the forks fail, the job goes on
            log.exception("fork failed")
            for fork in forks:
                self._fail(fork, e)
            return
        for fork in forks:
            fork.prefilled = fork.reused = len(fork.prompt)
            fork.started_at = job.started_at
            self._kept[fork.row] = self._kept[job.row]
            self._running.append(fork)
            self._advance(fork, logits)

    def _pass_on(self, job: Job) -> None:
        """A cancelled job's forks still want its prefill: the first of them takes over its row and
        its progress, the others stay its forks."""
        heirs = [f for f in job.forks if not f.cancelled]
        for fork in job.forks:
            if fork.cancelled:
                fork.finished = True
                self._free_row(fork)
        job.forks = []
        if not heirs or job not in self._prefilling:
            return
        heir = heirs[0]
        heir.row, job.row = job.row, heir.row
        heir.prefilled, heir.reused, heir.started_at = job.prefilled, job.reused, job.started_at
        heir.forks = heirs[1:]
        self._prefilling.append(heir)

    def _decode(self) -> None:
        """One step for every running job: its next token, and for a job that speculates, the
        tokens its prompt lookup guesses come next, checked in the same step (each row of a step
        is computed as if alone, so a guess the model confirms costs no change in the output)."""
        jobs = self._running
        tokens, positions, rows, drafts = [], [], [], []
        for job in jobs:
            pos = len(job.history) - 1
            room = min(job.budget - len(job.generated), job.opts.num_ctx - len(job.history)) - 1
            guessed = job.lookup.propose(min(job.guesses, room)) if job.lookup else []
            tokens += [job.next_token, *guessed]
            positions += range(pos, pos + len(guessed) + 1)
            rows += [job.row] * (len(guessed) + 1)
            drafts.append(guessed)
        try:
            self._ensure_capacity(max(positions) + 1)
            logits = self.runner.decode(tokens, positions, rows)
        except Exception as e:  # noqa: BLE001
            log.exception("decode step failed")
            for job in jobs:
                self._fail(job, e)
            self._running = []
            return
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(jobs))
        at = 0
        for job, guessed in zip(jobs, drafts):
            held = 0
            for i, row in enumerate(logits[at:at + len(guessed) + 1]):
                token = self._advance(job, row)
                if i == len(guessed) or token != guessed[i]:
                    break  # over, a wrong guess, or the model's own token after all the guesses
                held += 1
            if guessed:  # a wrong guess cost a row: check fewer next time; all held: more
                job.guesses = min(job.opts.speculate, 2 * job.guesses) if held == len(guessed) else max(1, held)
            at += len(guessed) + 1
        self._running = [j for j in self._running if not j.finished]

    def _advance(self, job: Job, logits: torch.Tensor) -> int | None:
        """Sample the job's next token from its logits (V,) float32 and act on it; the token, or
        None once the job is over."""
        if job.cancelled or job.finished:
            return None
        now = time.perf_counter_ns()
        if job.first_token_at is None:
            job.first_token_at = now
        try:
            scores = logits if job.constraint is None else job.constraint.mask(logits)
            token = sample(scores, job.history, job.opts, job.generator)
            lp = None if job.logprobs is None else [token_logprob(logits, token, job.logprobs)]
            if token in job.stop_ids:
                if lp is not None:  # the stop token's own log-probability, with no text (see Reply)
                    self._emit(job, Delta("", (), lp))
                return self._finish(job, "stop")
            if job.constraint is not None:
                job.constraint.accept(token)
        except Exception as e:  # noqa: BLE001 — e.g. a grammar error: this job fails, others go on
            log.exception("sampling failed")
            return self._fail(job, e)
        job.generated.append(token)
        job.history.append(token)
        if job.lookup:
            job.lookup.push(token)
        text = job.text.push(token)
        self._emit(job, Delta(text, (token,), lp))
        if job.text.stopped or (job.constraint is not None and job.constraint.done):
            return self._finish(job, "stop")
        if len(job.generated) >= job.budget or len(job.history) >= job.opts.num_ctx:
            return self._finish(job, "length")
        job.next_token = token
        return token

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
        forks, job.forks = job.forks, []
        for fork in forks:  # they were waiting for this job's prefill
            self._fail(fork, error)
