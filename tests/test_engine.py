"""The serving engine: continuous batching on the real SmolLM2 (outputs and logprobs identical alone
and in a batch), stop conditions, cancellation, structured output, scores and embeddings; and the
model lifecycle (keep-alive, LRU, queue limit) on a tiny random model."""

import asyncio
import json
import queue
import time

import pytest
import torch

from llamaherd.engine.models import Engine, EngineConfig, ModelRef
from llamaherd.engine.scheduler import MIN_CAPACITY, Job, Scheduler
from llamaherd.chat.text import TextStream
from llamaherd.engine.types import (Delta, Done, EmbedRequest, GenerateRequest, ModelNotFound, QueueFull,
                                    ScoreRequest)
from llamaherd.errors import HerdError


@pytest.fixture(scope="module")
def llm(smollm2_path):
    """Our own instance: the scheduler takes over its KV cache."""
    import llamaherd

    return llamaherd.load(smollm2_path)


@pytest.fixture(scope="module")
def scheduler(llm):
    s = Scheduler(llm.runner, n_rows=8, max_ctx=llm.args.max_seq_len, name="smollm2")
    yield s
    s.close()


def submit(scheduler, llm, text, chat=True, **options):
    q = queue.Queue()
    opts = llm.options(**{"temperature": 0, "num_predict": 12, **options})
    ids = llm.encode_chat([{"role": "user", "content": text}]) if chat else llm.encode(text)
    job = Job(ids, opts, llm.tokenizer.stop_ids, llm.tokenizer, q.put, logprobs=options.get("logprobs_k"))
    scheduler.submit(job)
    return job, q


def collect(q, timeout=120):
    tokens, text, logprobs = [], [], []
    while True:
        event = q.get(timeout=timeout)
        if isinstance(event, Exception):
            raise event
        if isinstance(event, Done):
            return tokens, "".join(text), logprobs, event
        tokens += event.tokens
        text.append(event.text)
        logprobs += event.logprobs or []


PROMPTS = ["Name a color.", "What is 2+2?", "Say hello in French.", "Write a haiku about rain.",
           "Who wrote Hamlet?", "List three fruits.", "What is the capital of Italy?"]


def test_batched_output_and_logprobs_equal_alone(scheduler, llm):
    alone = [collect(submit(scheduler, llm, p, logprobs_k=0)[1]) for p in PROMPTS]
    jobs = [submit(scheduler, llm, p, logprobs_k=0) for p in PROMPTS]  # 7 at once: a padded batch of 8
    together = [collect(q) for _, q in jobs]
    assert scheduler.max_batch_seen >= 5
    for (t1, s1, lp1, _), (t2, s2, lp2, _) in zip(alone, together):
        assert t1 == t2 and s1 == s2
        # bitwise: every row's logits were computed exactly as when it ran alone
        assert [lp.logprob for lp in lp1] == [lp.logprob for lp in lp2]


def test_matches_llama_stream(scheduler, llm):
    opts = llm.options(temperature=0, num_predict=12)
    ids = llm.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    ref = [t for chunk in llm.stream(ids, opts) for t in chunk.tokens]
    llm.runner.release()  # the scheduler starts a cache of its own
    tokens, *_ = collect(submit(scheduler, llm, PROMPTS[0])[1])
    assert tokens == ref


def test_stats_and_done_reasons(scheduler, llm):
    tokens, text, _, done = collect(submit(scheduler, llm, "Count from 1 to 20.", num_predict=5)[1])
    assert done.reason == "length" and done.eval_count == len(tokens) == 5
    assert done.prompt_eval_count > 10 and done.prompt_eval_duration > 0 and done.eval_duration > 0
    assert done.context[-5:] == tokens and text == llm.tokenizer.decode(tokens)
    # a stop string: the text ends before it, even when it spans tokens
    full = collect(submit(scheduler, llm, "Count from 1 to 20, separated by commas.", num_predict=30)[1])[1]
    stop = full[full.index("3"):full.index("3") + 3]
    _, text, _, done = collect(submit(scheduler, llm, "Count from 1 to 20, separated by commas.", num_predict=30,
                                      stop=[stop])[1])
    assert done.reason == "stop" and text == full[:full.index(stop)]
    # the context fills up
    ids = llm.encode_chat([{"role": "user", "content": "Tell me a story."}])
    _, _, _, done = collect(submit(scheduler, llm, "Tell me a story.", num_predict=-1, num_ctx=len(ids) + 4)[1])
    assert done.reason == "length" and done.eval_count == 4
    # num_predict 0: nothing at all
    tokens, _, _, done = collect(submit(scheduler, llm, "Hi", num_predict=0)[1])
    assert tokens == [] and done.reason == "length"


def test_prompt_that_does_not_fit_is_an_error(llm):
    opts = llm.options(num_ctx=8)
    with pytest.raises(HerdError, match="does not fit"):
        Job(list(range(10)), opts, frozenset(), llm.tokenizer, print)


def test_cancel_frees_the_row_at_once(scheduler, llm):
    job, q = submit(scheduler, llm, "Write a very long essay about the sea.", num_predict=2000)
    assert isinstance(q.get(timeout=60), Delta)
    scheduler.cancel(job)
    deadline = time.time() + 30
    while scheduler.rows_in_use and time.time() < deadline:
        time.sleep(0.01)
    assert scheduler.rows_in_use == 0 and scheduler.n_active == 0
    tokens, *_ = collect(submit(scheduler, llm, "Hi")[1])  # still serving
    assert tokens


def test_cache_grows_and_keeps_what_it_holds(scheduler, llm):
    text = "Repeat after me. " + "The quick brown fox jumps over the lazy dog. " * 22
    ids = llm.encode_chat([{"role": "user", "content": text}])
    assert MIN_CAPACITY - 16 < len(ids) < MIN_CAPACITY  # generation crosses the first capacity
    llm.runner.release()
    other, q_other = submit(scheduler, llm, "Hi", num_predict=30)
    _, q = submit(scheduler, llm, text, num_predict=24)
    tokens, *_ = collect(q)
    collect(q_other)
    assert scheduler.capacity == 2 * MIN_CAPACITY
    opts = llm.options(temperature=0, num_predict=24)
    ref = [t for chunk in llm.stream(ids, opts) for t in chunk.tokens]
    llm.runner.release()
    assert tokens == ref


def test_a_kept_prompt_prefix_is_reused_and_changes_nothing(scheduler, llm):
    """A chat's second turn starts with the first turn's prompt: the row that ran it gives those
    keys and values again, in whole 64-position units, and the output and its logprobs are the
    bits a fresh prefill gives."""
    story = "Here is a story. " + " ".join(f"On day {i} the fox found {i + 2} berries by the river." for i in range(12))
    turn1 = [{"role": "user", "content": story + " How many berries on day 3?"}]

    def run(messages):
        ids = llm.encode_chat(messages)
        q = queue.Queue()
        job = Job(ids, llm.options(temperature=0, num_predict=10), llm.tokenizer.stop_ids, llm.tokenizer, q.put,
                  logprobs=0)
        scheduler.submit(job)
        tokens, text, logprobs, done = collect(q)
        return ids, tokens, text, [lp.logprob for lp in logprobs], done

    ids1, _, answer, _, _ = run(turn1)
    question = "And on day 7? " + "Answer with the number alone, please, and with nothing else. " * 6
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    before = scheduler.reused_tokens
    ids2, tokens, _, logprobs, done = run(turn2)
    reused = scheduler.reused_tokens - before
    # the first prompt's last, partial unit (computed as a prompt's tail) is a whole unit of the second
    assert ids2[:len(ids1)] == ids1 and len(ids1) > 128 and len(ids2) >= (len(ids1) // 64 + 1) * 64
    assert reused == len(ids1) // 64 * 64  # the first prompt's whole units, none of the answer
    assert done.prompt_eval_count == len(ids2)  # the prompt's size, reused or not

    scheduler.call(lambda: setattr(scheduler, "_kept", [[] for _ in range(scheduler.n_rows)])).result()
    before = scheduler.reused_tokens
    _, fresh_tokens, _, fresh_logprobs, _ = run(turn2)
    assert scheduler.reused_tokens == before  # nothing kept: all computed again
    assert tokens == fresh_tokens and logprobs == fresh_logprobs  # bitwise


def test_json_schema_output_parses_and_validates(llm):
    pytest.importorskip("llguidance")

    async def run():
        engine = Engine(lambda name: ModelRef(name, llm.path), EngineConfig(num_parallel=2),
                        loader=lambda path: llm)
        await engine.start()
        try:
            schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                      "required": ["name", "age"]}
            gen = await engine.generate(GenerateRequest(
                model="smol", messages=[{"role": "user", "content": "Describe a person."}],
                options={"temperature": 0.7, "seed": 1, "num_predict": 60}, format=schema))
            text = "".join([e.text async for e in gen if isinstance(e, Delta)])
            with pytest.raises(HerdError, match="invalid JSON schema"):
                await engine.generate(GenerateRequest(model="smol", prompt="x", format={"type": "objekt"}))
            return text
        finally:
            await engine.close()

    value = json.loads(asyncio.run(run()))
    assert isinstance(value["name"], str) and isinstance(value["age"], int)


def test_scores_are_teacher_forced_logprobs_and_embeddings_are_normalised(llm):
    async def run():
        engine = Engine(lambda name: ModelRef(name, llm.path), loader=lambda path: llm)
        await engine.start()
        try:
            scored = await engine.score(ScoreRequest(model="smol", prompt="The capital of France is Paris", top=3))
            embedded = await engine.embed(EmbedRequest(model="smol", inputs=["Paris", "Paris", "A banana."]))
            return scored, embedded
        finally:
            await engine.close()

    scored, embedded = asyncio.run(run())
    ids = llm.encode("The capital of France is Paris")
    assert scored.tokens == ids and scored.logprobs[0] is None
    expected = torch.log_softmax(llm.logits(ids), dim=-1)
    for i, lp in enumerate(scored.logprobs[1:], start=1):
        assert lp.logprob == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-5)
        assert [t for t, _ in lp.top] == expected[i - 1].topk(3).indices.tolist()
    a, b, c = (torch.tensor(v) for v in embedded.embeddings)
    assert torch.allclose(a.norm(), torch.tensor(1.0)) and torch.equal(a, b)
    assert len(a) == llm.args.dim and float(a @ c) < 0.999
    with torch.no_grad():
        h = llm.model.hidden_states(torch.tensor([llm.encode("Paris")]))[0].mean(0)
    assert torch.allclose(a, torch.nn.functional.normalize(h, dim=0), atol=1e-6)


# -- the model lifecycle, on a tiny model -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_loader(smollm2):
    """path -> a Llama: a 2-layer random model (the real tokenizer, so prompts are real)."""
    from llamaherd.config import ModelArgs
    from llamaherd.llm import Llama
    from llamaherd.model import Transformer

    def load(path):
        torch.manual_seed(0)
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=smollm2.n_words, hidden_dim=128,
                         max_seq_len=512, tie_embeddings=True)
        model = Transformer(args)
        model.init_weights()  # Transformer leaves its weights uninitialised (checkpoints fill them)
        return Llama(model.eval(), smollm2, path=path)

    return load


def tiny_engine(tiny_loader, **config):
    def resolve(name):
        if name.startswith("missing"):
            raise ModelNotFound(name)
        return ModelRef(name, f"/models/{name}", digest=name)

    return Engine(resolve, EngineConfig(**config), loader=tiny_loader)


def test_keep_alive_and_lru_unloading(tiny_loader):
    async def run():
        engine = tiny_engine(tiny_loader, max_loaded=2, keep_alive=300)
        await engine.start()
        try:
            await engine.load("a")
            await engine.load("b")
            assert {m.name for m in engine.running()} == {"a", "b"}
            gen = await engine.generate(GenerateRequest(model="a", prompt="hi", options={"num_predict": 2}))
            [e async for e in gen]
            await engine.load("c")  # b is the least recently used
            assert [m.name for m in engine.running()] == ["c", "a"]
            await engine.load("a", keep_alive=0)
            assert [m.name for m in engine.running()] == ["c"]
            gen = await engine.generate(GenerateRequest(model="c", prompt="hi", options={"num_predict": 2},
                                                        keep_alive=0.2))
            [e async for e in gen]
            assert engine.running()[0].expires_at < time.time() + 1
            await asyncio.sleep(1.2)  # the reaper unloads it
            assert engine.running() == []
            await engine.load("d", keep_alive=-1)
            assert engine.running()[0].expires_at == float("inf")
            with pytest.raises(ModelNotFound):
                await engine.load("missing")
        finally:
            await engine.close()

    asyncio.run(run())


def test_a_reply_read_whole_wakes_the_event_loop_once(tiny_loader):
    """stream=False: the pieces of the reply wait for its end on the scheduler's thread and come in
    one hand-over (not one wake-up of the event loop a token), as the same events."""
    async def run():
        engine = tiny_engine(tiny_loader)
        await engine.start()
        loop = asyncio.get_running_loop()
        handovers = []
        real = loop.call_soon_threadsafe

        def counted(fn, *args):
            if getattr(fn, "__name__", "") == "put":  # Generation.put (not to_thread's own)
                handovers.append(fn)
            return real(fn, *args)

        loop.call_soon_threadsafe = counted
        try:
            replies = {}
            for stream in (True, False):
                handovers.clear()
                gen = await engine.generate(GenerateRequest(model="a", prompt="hi", stream=stream, options={
                    "num_predict": 6, "temperature": 0}))
                events = [e async for e in gen]
                replies[stream] = ([(e.text, e.tokens) for e in events[:-1]], len(handovers))
            assert replies[False][0] == replies[True][0] and len(replies[True][0]) == 6
            assert (replies[True][1], replies[False][1]) == (7, 1)
        finally:
            await engine.close()

    asyncio.run(run())


def test_queue_limit_is_a_503(tiny_loader):
    async def run():
        engine = tiny_engine(tiny_loader, num_parallel=1, max_queue=1)
        await engine.start()
        try:
            req = GenerateRequest(model="a", prompt="hi", options={"num_predict": 400, "num_ctx": 512})
            first = await engine.generate(req)
            # running: it holds the only row (the iterator kept: a dropped one is closed, which cancels)
            events = first.__aiter__()
            await events.__anext__()
            second = await engine.generate(req)  # waits for the row
            with pytest.raises(QueueFull):
                await engine.generate(req)
            first.cancel()
            [e async for e in second]  # the row came free
        finally:
            await engine.close()

    asyncio.run(run())


def test_bad_requests_are_errors_before_streaming(tiny_loader):
    async def run():
        engine = tiny_engine(tiny_loader)
        await engine.start()
        try:
            for req, match in [
                (GenerateRequest(model="a", prompt="hi", options={"num_predict": -5}), "num_predict"),
                (GenerateRequest(model="a", prompt="hi", options={"top_k": "many"}), "top_k"),
                (GenerateRequest(model="a", prompt="hi", suffix="bye"), "does not support insert"),
                (GenerateRequest(model="a", prompt=[1, 10 ** 7]), "token-id prompt"),
                (GenerateRequest(model="a", messages=[]), "non-empty"),
                (GenerateRequest(model="a", messages=[{"role": "robot", "content": "x"}]), "unknown role"),
                (GenerateRequest(model="missing-one", prompt="hi"), "not found"),
            ]:
                with pytest.raises(HerdError, match=match):
                    await engine.generate(req)
            assert engine.running()[0].name == "a"
            assert all(m.scheduler.n_active == 0 and m.in_flight == 0 for m in engine._models.values())
        finally:
            await engine.close()

    asyncio.run(run())


def test_text_stream_holds_back_stop_string_beginnings():
    class Bytes:
        def token_bytes(self, i):
            return [b"Hel", b"lo ", b"wor", b"ld", "€".encode()[:1], "€".encode()[1:]][i]

    t = TextStream(Bytes(), ["lo w"])
    assert [t.push(0), t.push(1)] == ["He", "l"] and not t.stopped  # "l", then "lo " may start "lo w"
    assert t.push(2) == "" and t.stopped
    t = TextStream(Bytes(), ["low"])
    assert [t.push(i) for i in (0, 1, 2)] == ["He", "llo ", "wor"] and not t.stopped
    t = TextStream(Bytes())
    assert t.push(4) == "" and t.push(5) == "€" and t.finish() == ""


def test_weights_bytes_counts_each_byte_once():
    """Tensors that overlap (a fused projection's mapped span holds the parts between its own) or
    are tied are counted once: the union of their byte ranges."""
    from llamaherd.engine.models import _weights_bytes

    file = torch.zeros(100, dtype=torch.uint8)
    m = torch.nn.Module()
    m.register_buffer("wqkv", file[0:60])
    m.register_buffer("wo", file[10:20])  # inside wqkv's span
    m.register_buffer("w13", file[40:100])  # overlaps it
    m.register_buffer("norm", torch.zeros(10))  # 40 bytes elsewhere
    assert _weights_bytes(m) == 140


def test_batch_loops_are_stopped_before_the_interpreter_exits():
    """A `herd run` ends with its scheduler's daemon thread still alive; the atexit hook stops and
    joins it, so the thread is never killed inside a torch or native call at finalization."""
    from llamaherd.engine import scheduler

    class Idle:  # a runner that is never asked for a step: only released when the loop ends
        released = False

        def release(self):
            self.released = True

    s = scheduler.Scheduler(runner=Idle(), n_rows=1, max_ctx=16, name="exit")
    assert s._thread.is_alive() and s in scheduler._live
    scheduler._close_all()
    assert not s._thread.is_alive() and s.runner.released
