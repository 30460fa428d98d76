"""Pre-training (`herd train pretrain`, `herd train scaling`): the tiny preset learns a small text,
packed windows keep documents apart, 2 FSDP2 processes equal 1, resume equals an uninterrupted
run, continued pre-training starts where the model was, bad inputs are one line, and the scaling
fit finds a known optimum.

The corpus is made here: documents of sentences drawn from a small seeded grammar (so a held-out
document is new text of the same language), tokenized by a 512-token byte-level BPE trained on it,
through `herd data prepare` (its filters off: they are tested in test_data.py). That a packed
sequence gives each document the logits it has alone is tested on the model in
tests/test_model_train.py (`test_packed_documents_in_chunks_equal_each_document_alone`); here it is
tested through the loader's windows and the positions the recipe derives from them.
"""

import json
import random

import numpy as np
import pytest
import torch

from llamaherd.errors import HerdError
from llamaherd.train.pretrain import WindowBatches, build_from_preset, pretrain

SUBJECTS = ["the cat", "a dog", "the old farmer", "my sister", "the small bird", "a tired teacher", "our neighbour",
            "the baker"]
VERBS = ["sees", "likes", "finds", "carries", "follows", "paints"]
OBJECTS = ["the red ball", "a wooden box", "the river", "an apple", "the green door", "a long letter"]
PLACES = ["in the garden", "near the house", "after dinner", "at the market", "every morning"]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
                     for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(s[0].upper() + s[1:] for s in sentences))
    return docs


def make_tokenizer(path, texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True}))
    return path


def prepare(root, texts, tokenizer):
    from llamaherd.data.pipeline import prepare as prepare_data

    root.mkdir()
    with open(root / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    prepare_data([root / "docs.jsonl"], root / "prepared", tokenizer=str(tokenizer), progress=False, langid=False,
                 gopher_quality=None, gopher_repetition=None, c4=None, badwords=None, exact_dedup=False,
                 minhash=False, line_dedup=False, kl=False)
    return root / "prepared"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(prepared folder, its tokenizer folder, a folder of the same text with another tokenizer)."""
    root = tmp_path_factory.mktemp("corpus")
    texts = documents(400)
    tokenizer = make_tokenizer(root / "tok", texts, 512)
    other = make_tokenizer(root / "tok300", texts, 300)
    return prepare(root / "a", texts, tokenizer), tokenizer, prepare(root / "b", texts, other)


COMMON = dict(preset="tiny", lr=3e-3, warmup_steps=5, batch_size=8, max_seq_len=64, val_split=0.1, progress=False)


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return out, pretrain(data=str(corpus[0]), out=str(out), max_steps=60, val_every=30, **COMMON)


def test_tiny_preset_learns_the_text_and_writes_a_model_herd_loads(tiny_run, corpus):
    """60 steps of 8 x 64 tokens: the held-out loss falls from above ln(vocabulary) to below 1.5 nats."""
    import llamaherd
    out, s = tiny_run
    assert s["val_loss_before"] > 5.5
    assert [v["step"] for v in s["validation"]] == [30, 60]
    assert s["val_loss"] < 1.5, s["validation"]  # 1.07 here (1.35 at step 30)
    assert s["val_perplexity"] == pytest.approx(np.exp(s["val_loss"]))
    vocab = json.loads((corpus[0] / "report.json").read_text())["tokenizer"]["vocab_size"]
    assert s["steps"] == 60 and s["tokens"] == 60 * 8 * 64 and s["parameters"] == 98624 + vocab * 64  # tied
    llm = llamaherd.load(out / "model", device="cpu")  # the output is a model like any training output
    ids = llm.tokenizer.encode("The cat sees")
    nxt = int(llm.logits(ids)[-1].argmax())
    assert llm.tokenizer.decode([nxt]).strip() in {"the", "a", "an", "th", "t"}
    train = json.loads((out / "train.json").read_text())
    assert train["preset"] == "tiny" and train["model_path"] == str((out / "model").resolve())


def test_exported_gguf_has_the_trained_logits(tiny_run, tmp_path):
    import llamaherd
    from llamaherd.export import export
    out, _ = tiny_run
    path = export(out, "gguf", tmp_path / "tiny.gguf", "f32")
    trained, exported = llamaherd.load(out / "model", device="cpu"), llamaherd.load(path, device="cpu")
    ids = trained.tokenizer.encode("A dog finds an apple at the market.")
    assert (exported.logits(ids) - trained.logits(ids)).abs().max() <= 1e-5


def test_a_packed_window_gives_each_document_its_logits_alone(corpus):
    model = build_from_preset("tiny", 512, "cpu", seed=1)
    from llamaherd.data.loader import PackedDocuments
    # a window holding a document's end, at least one whole document and the next one's start
    batch = next(b for b in WindowBatches(PackedDocuments(corpus[0], 128, split="all"), 1).epoch(0)
                 if b["doc_ids"].max() >= 2)
    tokens, doc_ids, pos = batch["tokens"], batch["doc_ids"], batch["input_pos"]
    with torch.no_grad():
        packed = model(tokens, pos, doc_ids=doc_ids)[0]
        for d in doc_ids.unique():
            span = (doc_ids[0] == d).nonzero()[:, 0]
            alone = model(tokens[:, span])[0]  # positions 0.. and plain causal attention
            assert pos[0, span].tolist() == list(range(len(span)))
            assert (packed[span] - alone).abs().max() <= 1e-5


def test_resume_after_interrupt_equals_an_uninterrupted_run(corpus, tmp_path):
    kw = dict(data=str(corpus[0]), max_steps=6, val_split=0.0, **{k: v for k, v in COMMON.items() if k != "val_split"})
    pretrain(out=str(tmp_path / "a"), **kw)

    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(out=str(tmp_path / "b"), on_step=interrupt, **kw)
    pretrain(out=str(tmp_path / "b"), resume=True, **kw)
    a = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert b == a and len(set(a)) == 6


def test_continued_pretraining_starts_from_the_model(tiny_run, corpus, tmp_path):
    """--model: the float weights go on training; the held-out loss before is the model's last one."""
    out, s = tiny_run
    cont = pretrain(model=str(out / "model"), data=str(corpus[0]), out=str(tmp_path / "c"), max_steps=2,
                    **{k: v for k, v in COMMON.items() if k != "preset"})
    assert cont["val_loss_before"] == pytest.approx(s["val_loss"], abs=1e-4)
    assert cont["steps"] == 2 and (tmp_path / "c" / "model" / "model.safetensors").exists()


def herd(*argv):
    from llamaherd.cli import main
    return main(list(map(str, argv)))


@pytest.mark.parametrize("case, message", [
    ("unknown_preset", "unknown preset 'huge'; known: tiny, mini, small, 20m, 100m"),
    ("empty_data", "holds no prepared data (report.json): run `herd data prepare` first"),
    ("missing_data", "does not exist"),
    ("tokenizer_mismatch", "was tokenized with"),
    ("model_mismatch", "was tokenized with"),
    ("both", "give either --preset (random initialisation) or --model"),
    ("tokens_and_steps", "give a token budget (--tokens) or --max-steps, not both"),
])
def test_bad_inputs_are_one_line_and_exit_1(case, message, corpus, tiny_run, tmp_path, capsys):
    data, tokenizer, other = corpus
    argv = ["train", "pretrain", "--preset", "tiny", "--data", data, "--out", tmp_path / "o", "--max-steps", 1,
            "--no-progress"]
    if case == "unknown_preset":
        argv[3] = "huge"
    elif case == "empty_data":
        (tmp_path / "empty").mkdir()
        argv[5] = tmp_path / "empty"
    elif case == "missing_data":
        argv[5] = tmp_path / "nope"
    elif case == "tokenizer_mismatch":
        argv[5] = other  # tokenized with the 300-token BPE; the model would get the 512 one
        argv += ["--tokenizer", tokenizer]
    elif case == "model_mismatch":
        argv[2:4] = ["--model", tiny_run[0] / "model"]
        argv[5] = other
    elif case == "both":
        argv += ["--model", tiny_run[0] / "model"]
    else:
        argv += ["--tokens", 1000]
    assert herd(*argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_two_gloo_processes_equal_one_process(corpus, tmp_path):
    """torchrun with 2 processes (FSDP2, gloo, batch 2 each) gives the per-step losses and validation
    loss of 1 process with batch 4: the same windows per global batch, the same updates."""
    import os
    import subprocess
    import sys
    from llamaherd.train.__main__ import main as train_main
    common = ["pretrain", "--preset", "tiny", "--data", corpus[0], "--max-steps", 3, "--lr", "3e-3",
              "--warmup-steps", 1, "--max-seq-len", 64, "--val-split", 0.1, "--val-windows", 4, "--no-progress"]
    assert train_main([*map(str, common), "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "llamaherd.train", *map(str, common), "--batch-size", "2", "--out",
                          str(tmp_path / "two")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two"))
    assert len(a) == len(b) == 3 and a[0]["loss"] != a[2]["loss"]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-5)
    assert (tmp_path / "two" / "model" / "model.safetensors").stat().st_size == \
        (tmp_path / "one" / "model" / "model.safetensors").stat().st_size


# -- scaling ----------------------------------------------------------------------------------

def test_isoflop_fit_recovers_a_known_optimum():
    """Losses from a Chinchilla-form law L = E + A / N^a + B / D^b with D = C / (6 N): its optimum is
    N_opt = G (C / 6)^(b / (a + b)), G = (a A / (b B))^(1 / (a + b)); the IsoFLOP parabolas and the
    power law through their minima must find it."""
    from llamaherd.train.scaling import fit_grid
    E, A, B, a, b = 1.7, 400.0, 900.0, 0.34, 0.28
    G = (a * A / (b * B)) ** (1 / (a + b))

    def optimum(c):
        return G * (c / 6) ** (b / (a + b))

    runs = []
    for c in (1e15, 1e16, 1e17, 1e18):
        for n in optimum(c) * np.exp(np.linspace(-1.0, 1.0, 7)):
            runs.append({"flops": c, "params": n, "val_loss": E + A / n ** a + B / (c / (6 * n)) ** b})
    result = fit_grid(runs)
    for budget in result["budgets"]:
        assert budget["inside"] and budget["n_opt"] == pytest.approx(optimum(budget["flops"]), rel=0.03)
    assert result["law"]["alpha"] == pytest.approx(b / (a + b), abs=0.005)
    assert result["law"]["k"] * 1e17 ** result["law"]["alpha"] == pytest.approx(optimum(1e17), rel=0.03)


def test_isoflop_fit_without_a_minimum_says_so():
    from llamaherd.train.scaling import fit_grid, fit_isoflop
    assert fit_isoflop([1e5, 1e6, 1e7], [3.0, 2.6, 1.5]) is None  # falling faster and faster: no minimum
    assert fit_grid([{"flops": 1.0, "params": n, "val_loss": l}
                     for n, l in ((1e5, 3.0), (1e6, 2.6), (1e7, 1.5))])["law"] is None
    with pytest.raises(HerdError, match="at least 3 model sizes"):
        fit_isoflop([1e5, 1e6], [2.0, 1.0])


@pytest.mark.slow
def test_scaling_command_writes_json_and_plot(corpus, tmp_path, capsys):
    """A small grid end to end: 3 presets x 2 budgets (a few steps each)."""
    assert herd("train", "scaling", "--data", corpus[0], "--out", tmp_path, "--flops", "2e8,6e8",
                "--max-seq-len", 64, "--no-progress") == 0
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert [len(b["runs"]) for b in result["budgets"]] == [3, 3]
    assert all(r["val_loss"] > 0 and r["tokens"] > 0 for b in result["budgets"] for r in b["runs"])
    assert "C = 2e+08 FLOPs" in capsys.readouterr().out
    if "plot" in result["outputs"]:
        assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


# -- the Llama 3 tokenizer as a tokenizer.json ---------------------------------------------------

def test_llama3_tiktoken_converts_to_the_same_bpe():
    """What a `--tokenizer llama3` model saves: the tiktoken BPE as a `tokenizers` BPE with the same
    ids. Checked on Llama 3's first 6,000 ranks (a BPE's first ranks are a BPE: a token only merges
    lower ranks), so the test stays fast; the whole 128k vocabulary converts the same way."""
    from llamaherd.tokenizer import load_tokenizer
    from llamaherd.tokenizer.convert import hf_from_tiktoken
    from llamaherd.tokenizer.llama3 import Llama3Tokenizer
    full = load_tokenizer("llama3")
    small = Llama3Tokenizer({full.model.decode_single_token_bytes(i): i for i in range(6000)})
    hf = hf_from_tiktoken(small)
    assert hf.n_words == small.n_words == 6256 and (hf.bos_id, hf.eos_id) == (small.bos_id, small.eos_id)
    assert hf.stop_ids == small.stop_ids
    texts = [" ".join(documents(3, seed=5)), "Ça va? 안녕하세요 世界 1234567 don't  \n\n  tabs\t\tx   ",
             "def f(x):\n    return x**2  # 2024-01-01\r\n", "<|eot_id|> is text here"]
    for text in texts:
        assert hf.encode(text) == small.encode(text)
        assert hf.decode(hf.encode(text)) == text


def test_training_cross_entropy_gradients_equal_full_logits_also_under_bf16_autocast():
    """The training path of `chunked_cross_entropy` (gradients formed in the forward, blocks of
    tokens): loss and gradients of F.cross_entropy on full logits; under bf16 autocast (what CUDA
    training runs) with many blocks, the same to bf16 precision and float32 gradients."""
    import torch.nn.functional as F
    from llamaherd.train.loss import chunked_cross_entropy
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    w = torch.randn(5000, 64, requires_grad=True)
    t = torch.randint(0, 5000, (300,))
    t[::7] = -100
    ref = F.cross_entropy(h @ w.T, t, ignore_index=-100, reduction="sum")
    gh, gw = torch.autograd.grad(2 * ref, (h, w))
    loss = chunked_cross_entropy(h, w, t, chunk=10)  # 16 tokens per block: 19 blocks
    (2 * loss).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(h.grad, gh, atol=1e-4) and torch.allclose(w.grad, gw, atol=1e-4)
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, t, chunk=10)
    (2 * loss).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    assert w.grad.dtype == h.grad.dtype == torch.float32
    assert ((h.grad - gh).norm() / gh.norm()) < 0.03 and ((w.grad - gw).norm() / gw.norm()) < 0.03
