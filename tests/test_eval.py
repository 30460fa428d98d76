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


def _herd(*args: str) -> tuple[int, str, str]:
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    p = subprocess.run([sys.executable, "-m", "llamaherd", "eval", *args], capture_output=True, text=True,
                       env=env, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_cli_bad_inputs_one_line(tmp_path):
    code, out, err = _herd("whatever.gguf", "--task", "no_such_task")
    assert code == 1 and err.count("\n") == 1 and err.startswith("Error: unknown task 'no_such_task'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "choices": ["a", "b"], "answer": 0}\n{oops\n', encoding="utf-8")
    code, out, err = _herd("whatever.gguf", "--task", str(bad))
    assert code == 1 and err.count("\n") == 1 and f"{bad}:2: not valid JSON" in err
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("not weights", encoding="utf-8")
    code, out, err = _herd(str(not_a_model), "--task", "ko_mc")
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
