"""Aggregate serving throughput: `herd serve` vs llama.cpp's `llama-server`, same GGUF, one run.

    python benchmarks/bench_serve.py --llama-server /path/to/llama-server [--streams 1 4 8 16]

For each number of concurrent clients, every client sends one greedy completion request
(`/v1/completions`, temperature 0, `max_tokens` 96, a prompt of its own) at the same moment, over
a connection it opened before the clock started; the
figure is the generated tokens of all clients (from `usage`) divided by the wall time until the last
one is done, the best of --rounds rounds (3 by default, for each server alike); the ratio of each
round to the other server's round beside it is shown too. llama-server runs with `-t 2 -np 8` (or
`--parallel`) and a context of 8 × 1024; herd serve with HERD_NUM_THREADS=2 and its default 16
rows. The script starts both on free loopback ports and warms each up with one request; then the
rounds alternate between them (an idle server takes no CPU), so that the machine's slow and fast
phases fall on both alike.

It also checks what continuous batching must not change: herd's output for each prompt at every
concurrency is compared with its output alone (column `same`).

Build llama-server from the llama.cpp sources vendored in the llama-cpp-python sdist (~10 min):
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake --build build -j2 --target llama-server
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 96
PROMPTS = [  # text to continue; distinct so that no two requests share a prefix
    "The history of the printing press begins", "In the middle of the ocean there is an island where",
    "A good recipe for bread needs", "The first computers were built", "My grandmother used to tell me",
    "The rules of chess are simple:", "When the train finally arrived at the station,",
    "Photosynthesis is the process by which", "The city council met on Tuesday to discuss",
    "Learning a new language as an adult", "The spacecraft drifted silently past",
    "Every morning the baker opened his shop", "The theory of evolution explains",
    "Deep in the forest, the old wolf", "To install the software, first",
    "The most important invention of the twentieth century",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up within {timeout} s")


def complete(client: httpx.Client, url: str, model: str, prompt: str) -> tuple[str, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 0}
    r = client.post(url + "/v1/completions", json=body)
    r.raise_for_status()
    data = r.json()
    return data["choices"][0]["text"], data["usage"]["completion_tokens"]


def clients(url: str, n: int) -> list[httpx.Client]:
    """n HTTP clients, each with an open connection to the server. Made before the clock starts: a
    new httpx client costs ~30 ms of CPU (its SSL context), which a round's requests would
    otherwise spend on the measured machine's two cores, beside the server they measure."""
    made = [httpx.Client(timeout=900) for _ in range(n)]
    for c in made:
        c.get(url + "/v1/models").raise_for_status()
    return made


def run_round(url: str, model: str, n: int) -> tuple[float, list[str]]:
    """n concurrent requests, one per client; (aggregate tokens/s, the texts)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    conns = clients(url, n)
    try:
        with ThreadPoolExecutor(n) as pool:
            t0 = time.perf_counter()
            results = list(pool.map(lambda c, p: complete(c, url, model, p), conns, prompts))
            wall = time.perf_counter() - t0
    finally:
        for c in conns:
            c.close()
    return sum(k for _, k in results) / wall, [t for t, _ in results]


def start_herd(model: Path, threads: int, home: Path) -> tuple[subprocess.Popen, str]:
    from llamaherd.store import Store

    Store(home).create("bench", f"FROM {model}")
    port = free_port()
    env = {**os.environ, "HERD_HOST": f"127.0.0.1:{port}", "HERD_HOME": str(home), "HERD_KEEP_ALIVE": "-1",
           "HERD_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def start_llama_server(binary: str, model: Path, threads: int, parallel: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([binary, "-m", str(model), "-t", str(threads), "-tb", str(threads),
                             "-np", str(parallel), "-c", str(parallel * 1024), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the SmolLM2-135M-Instruct Q4_1 model)")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="llama.cpp's llama-server binary (omit to measure herd alone)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="llama-server slots (-np)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3, help="rounds at each concurrency; the best is reported")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "bench_serve.json"))
    args = parser.parse_args()
    if args.model:
        model = Path(args.model)
    else:
        from llamaherd.fetch import smollm2_gguf
        model = smollm2_gguf()

    # Both servers are up (an idle one takes no CPU) and the rounds alternate between them, in
    # turn order swapped every round: this machine's speed drifts by up to ±35% over minutes, and a
    # server measured alone would get whatever phase its minutes fell in.
    starters = {"llamaherd": lambda home: (*start_herd(model, args.threads, home), "bench")}
    if args.llama_server:
        starters["llama-server"] = lambda home: (
            *start_llama_server(args.llama_server, model, args.threads, args.parallel), "model")
    results: dict[str, dict[int, float]] = {name: {} for name in starters}
    ratios: dict[int, list[float]] = {}
    same: dict[int, bool] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, start in starters.items():
            proc, url, model_name = start(Path(stack.enter_context(tempfile.TemporaryDirectory())))
            stack.callback(proc.wait, 30)
            stack.callback(proc.terminate)
            servers[name] = (proc, url, model_name)
        for name, (proc, url, model_name) in servers.items():
            wait_ready(url, proc)
            with httpx.Client(timeout=900) as client:
                complete(client, url, model_name, "Warm up:")
        _, url, model_name = servers["llamaherd"]
        with httpx.Client(timeout=900) as client:
            alone = {p: complete(client, url, model_name, p)[0] for p in PROMPTS}
        for n in args.streams:
            for i in range(args.rounds):
                names = list(servers) if i % 2 == 0 else list(servers)[::-1]
                rates = {}
                for name in names:
                    _, url, model_name = servers[name]
                    rates[name], texts = run_round(url, model_name, n)
                    results[name][n] = max(results[name].get(n, 0.0), rates[name])
                    if name == "llamaherd":
                        same[n] = same.get(n, True) and all(
                            t == alone[PROMPTS[j % len(PROMPTS)]] for j, t in enumerate(texts))
                if "llama-server" in rates:
                    ratios.setdefault(n, []).append(rates["llamaherd"] / rates["llama-server"])
            print(f"{n:3d} streams: " + ", ".join(f"{name} {results[name][n]:.1f}" for name in servers)
                  + " tokens/s", file=sys.stderr, flush=True)

    versus = "llama-server" in results
    print(f"{'streams':>8s} " + " ".join(f"{n:>14s}" for n in results)
          + ("   ratio   ratio a round (min-max)" if versus else "") + "   same as alone")
    for n in args.streams:
        row = f"{n:8d} " + " ".join(f"{results[name][n]:14.1f}" for name in results)
        if versus:
            row += (f"   {results['llamaherd'][n] / results['llama-server'][n]:5.2f}x"
                    f"   {min(ratios[n]):5.2f}-{max(ratios[n]):.2f}x          ")
        print(row + f"   {'yes' if same[n] else 'NO'}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model), "threads": args.threads, "max_tokens": MAX_TOKENS,
                               "tokens_per_s": results, "round_ratios": ratios, "same_as_alone": same}, indent=2))


if __name__ == "__main__":
    main()
