"""The reward model: ranked rows and their pairs, the Bradley–Terry loss by hand, packed = alone,
scores equal transformers' LlamaForSequenceClassification on the exported directory, learning the
demo preference (held-out pairwise accuracy), LoRA merged on export, `herd reward`, bad inputs.
Tiny random Llama models with SmolLM2's real tokenizer and chat template."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llamaherd.cli import main as herd_main
from llamaherd.errors import HerdError
from llamaherd.export.hf import save_tokenizer
from llamaherd.train.data import encode_conversation
from llamaherd.train.reward import (BradleyTerryLoss, RewardModel, collate_pairs, load_reward_model,
                                    pack_preferences, preference_of, read_preferences, save_reward_model)
from llamaherd.weights import build_model, load_checkpoint
from llamaherd.weights.hf import load_hf

transformers = pytest.importorskip("transformers")

DEMO = Path(__file__).parent.parent / "examples" / "preference-demo"


def tiny_hf(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    return model


def make_tiny_dir(path, smollm2, seed=0):
    tiny_hf(seed).save_pretrained(path)
    save_tokenizer(smollm2, path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2):
    """A tiny random Llama as a HF directory, with SmolLM2's tokenizer and chat template."""
    return make_tiny_dir(tmp_path_factory.mktemp("tiny"), smollm2)


@pytest.fixture(scope="module")
def tiny_reward(tiny_dir):
    """A `RewardModel` over the tiny model, with a random head."""
    ckpt = load_checkpoint(tiny_dir)
    torch.manual_seed(1)
    return RewardModel(build_model(ckpt.args, ckpt.state_dict), ckpt.tokenizer).eval(), ckpt


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def bt_loss(reward, rows):
    """Mean -log σ(r_better - r_worse) and accuracy over every ordered pair, scoring each reply alone."""
    losses, right = [], 0
    for row in rows:
        r = reward.score([row.prompt + reply for reply in row.replies])
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                losses.append(-F.logsigmoid(torch.tensor(r[i] - r[j], dtype=torch.float64)).item())
                right += r[i] > r[j]
    return sum(losses) / len(losses), right / len(losses)


ROW3 = {"prompt": "How do I make tea?",
        "edited": "Boil water, steep the bag for three to five minutes, and enjoy.",
        "chosen": {"role": "assistant", "content": "Steep a bag in hot water."},
        "rejected": [{"role": "assistant", "content": "Figure it out."}]}


# -- data and loss ------------------------------------------------------------------------------

def test_three_way_row_gives_three_pairs_scored_at_end_of_turn(smollm2):
    row = preference_of(ROW3)
    assert [r[0]["content"] for r in row.replies] == [ROW3["edited"], ROW3["chosen"]["content"], "Figure it out."]
    plain = preference_of({**ROW3, "edited": None})
    seqs, stats = pack_preferences(smollm2, [row, plain], 512)
    assert stats == {"rows": 2, "pairs": 4, "dropped": 0, "tokens": len(seqs[0].tokens)}
    (seq,) = seqs  # both rows packed in one sequence, five documents
    assert seq.pairs == [(0, 1), (0, 2), (1, 2), (3, 4)]  # better first: edited > chosen > rejected
    im_end = smollm2.special_tokens["<|im_end|>"]
    starts = [0] + [e + 1 for e in seq.ends[:-1]]
    for doc, (start, end) in enumerate(zip(starts, seq.ends)):
        assert seq.tokens[end] == im_end and set(seq.doc_ids[start:end + 1]) == {doc}
        assert seq.positions[start:end + 1] == list(range(end + 1 - start))
        # the document is the conversation's tokens up to and including the reply's end-of-turn
        replies = row.replies + plain.replies
        tokens, _ = encode_conversation(smollm2, [{"role": "user", "content": ROW3["prompt"]}] + replies[doc])
        assert seq.tokens[start:end + 1] == tokens[:end + 1 - start]
    # a row that does not fit is dropped, not cut
    assert pack_preferences(smollm2, [row], 40)[1]["dropped"] == 1


def test_bradley_terry_loss_and_packing_equal_scoring_each_reply_alone(tiny_reward):
    reward, ckpt = tiny_reward
    rows = [preference_of(ROW3), preference_of({**ROW3, "edited": None, "prompt": "Tea?"})]
    seqs, _ = pack_preferences(ckpt.tokenizer, rows, 512)
    batch = collate_pairs(seqs + pack_preferences(ckpt.tokenizer, rows[:1], 512)[0], reward.pad_id)  # 2 rows, padded
    with torch.no_grad():
        loss, metrics = BradleyTerryLoss(reward)(**batch)
        packed = reward(**{k: v for k, v in batch.items() if k != "pairs"})
    alone = reward.score([row.prompt + reply for row in rows + rows[:1] for reply in row.replies])
    assert packed.tolist() == pytest.approx(alone, abs=1e-5)
    pairs = [(0, 1), (0, 2), (1, 2), (3, 4), (5, 6), (5, 7), (6, 7)]
    by_hand = sum(-math.log(1 / (1 + math.exp(-(alone[i] - alone[j])))) for i, j in pairs)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert metrics["accuracy"].item() == sum(alone[i] > alone[j] for i, j in pairs)
    assert metrics["margin"].item() == pytest.approx(sum(alone[i] - alone[j] for i, j in pairs), abs=1e-4)


# -- export ---------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, please, a longer answer this time."},
     {"role": "assistant", "content": "Green, the colour of fresh leaves in spring."}],
]


def test_exported_scores_equal_transformers(tiny_reward, tmp_path):
    reward, ckpt = tiny_reward
    sd = {k.removeprefix("model."): v for k, v in reward.state_dict().items() if k.startswith("model.")}
    out = save_reward_model(sd, reward.head.weight, ckpt.args, ckpt.tokenizer, tmp_path / "rm", reward.pad_id)
    ours = reward.score(CONVERSATIONS)

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    # transformers scores the last token that is not pad_token_id: a right-padded batch
    from llamaherd.train.reward import encode_scored
    docs = [encode_scored(ckpt.tokenizer, c) for c in CONVERSATIONS]
    T = max(map(len, docs))
    ids = torch.tensor([d + [hf.config.pad_token_id] * (T - len(d)) for d in docs])
    mask = torch.tensor([[1] * len(d) + [0] * (T - len(d)) for d in docs])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    assert ours == pytest.approx(theirs, abs=1e-4)
    # and our loader reads the directory back to the same scores
    assert load_reward_model(out).score(CONVERSATIONS) == pytest.approx(ours, abs=1e-5)


# -- training -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_run(tiny_dir, tmp_path_factory):
    """A full fine-tune of the tiny model's reward head and weights on the demo preference set."""
    out = tmp_path_factory.mktemp("rm") / "run"
    summary = train_demo(tiny_dir, out, method="full", lr=1e-3, max_steps=14)
    return out, summary


def train_demo(model, out, **kw):
    from llamaherd.train.reward import train_reward

    return train_reward(model=str(model), data=str(DEMO / "train.jsonl"), val_data=str(DEMO / "heldout.jsonl"),
                        out=str(out), batch_size=1, max_seq_len=256, warmup_steps=2, progress=False, **kw)


def test_reward_model_learns_the_demo_preference(demo_run):
    out, s = demo_run
    # 14 held-out rows (2 of them three-way: 18 pairs) none of whose prompts is trained on. Chance is
    # 0.5; preferring the longer reply gets 15 of the 18 (the demo has long rude replies for that).
    assert s["val_pairs"] == 18 and s["data"]["rows"] == 42 and s["data"]["pairs"] == 56
    assert s["val_accuracy"] >= 16 / 18, s
    assert s["val_loss"] < s["val_loss_before"] < 1.0
    # The exported model, read back, gives the held-out loss and accuracy the run measured.
    rm = load_reward_model(out)
    loss, accuracy = bt_loss(rm, read_preferences(DEMO / "heldout.jsonl"))
    assert loss == pytest.approx(s["val_loss"], rel=1e-3, abs=1e-4)
    assert accuracy == pytest.approx(s["val_accuracy"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 14 and {"loss", "accuracy", "margin", "lr"} <= set(metrics[0])


def test_herd_train_reward_lora_exports_merged_weights(tiny_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    assert herd_main(["train", "reward", "--model", str(tiny_dir), "--data", str(DEMO / "train.jsonl"),
                      "--val-data", str(DEMO / "heldout.jsonl"), "--out", str(out), "--method", "lora",
                      "--lr", "5e-3", "--max-steps", "2", "--lora-rank", "4", "--batch-size", "1",
                      "--max-seq-len", "256", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert "trained 2 steps (lora)" in printed and f"held-out pairwise accuracy {s['val_accuracy']:.3f} on 18 pairs" in printed
    rm = load_reward_model(out)
    base = load_hf(tiny_dir)[1]
    moved = rm.model.layers[0].attention.wq.weight - base["layers.0.attention.wq.weight"]
    assert moved.abs().max() > 0  # the adapters trained and were merged in
    assert torch.equal(rm.model.tok_embeddings.weight, base["tok_embeddings.weight"])  # frozen under LoRA
    loss, _ = bt_loss(rm, read_preferences(DEMO / "heldout.jsonl"))
    assert loss == pytest.approx(s["val_loss"], rel=1e-3, abs=1e-4)


def test_shipped_recipes_are_valid():
    import yaml

    from llamaherd.train.config import make_config, recipe_text
    from llamaherd.train.posttrain import make_loop_config
    from llamaherd.train.reward import RewardConfig

    assert make_config(yaml.safe_load(recipe_text("reward-smollm2")), RewardConfig).method == "lora"
    loop = make_loop_config(yaml.safe_load(recipe_text("loop-smollm2")))
    assert (loop.runs, loop.beta, loop.nll_coef, loop.dpo_lr) == (2, 0.1, 0.2, 1e-5)
    assert (DEMO.parent.parent / loop.data).exists() and (DEMO.parent.parent / loop.val_data).exists()


def test_herd_reward_prints_and_writes_scores(demo_run, tmp_path, capsys):
    out, _ = demo_run
    data = write_jsonl(tmp_path / "replies.jsonl", [
        {"messages": CONVERSATIONS[0]},
        {"prompt": "How do I boil an egg?", "response": "Ugh, figure it out yourself."},
        {"prompt": [{"role": "user", "content": "How do I boil an egg?"}],
         "response": "Of course! Boil it for nine minutes. Hope this helps!"}])
    assert herd_main(["reward", str(out), "--data", str(data)]) == 0
    printed = [float(x) for x in capsys.readouterr().out.split()]
    expected = load_reward_model(out).score([
        CONVERSATIONS[0],
        [{"role": "user", "content": "How do I boil an egg?"},
         {"role": "assistant", "content": "Ugh, figure it out yourself."}],
        [{"role": "user", "content": "How do I boil an egg?"},
         {"role": "assistant", "content": "Of course! Boil it for nine minutes. Hope this helps!"}]])
    assert printed == pytest.approx(expected, abs=1e-5)
    assert printed[2] > printed[1]  # polite and helpful over rude
    assert herd_main(["reward", str(out), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == pytest.approx(printed, abs=1e-5) and rows[1]["response"].startswith("Ugh")


# -- bad inputs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello!"}, "'chosen' and 'rejected' are the same reply"),
    ({"prompt": "Hi", "chosen": "Hello!"}, "missing field 'rejected'"),
    ({"chosen": "Hello!", "rejected": "Go away."}, "missing field 'prompt'"),
    ({"prompt": "Hi", "chosen": {"role": "assistant"}, "rejected": "x"}, "chosen[0] must be a message"),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b", "edited": "a"}, "'edited' and 'chosen' are the same reply"),
])
def test_bad_preference_rows_are_one_line(tiny_dir, tmp_path, capsys, record, message):
    good = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    data = write_jsonl(tmp_path / "prefs.jsonl", [good, record])
    with pytest.raises(HerdError, match=re.escape(message)):
        read_preferences(data)
    code = herd_main(["train", "reward", "--model", str(tiny_dir), "--data", str(data),
                      "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and f"{data}:2: " in err and message in err


def test_bad_scoring_inputs_are_one_line(demo_run, tiny_dir, tmp_path, capsys):
    out, _ = demo_run
    cases = [
        (["reward", str(tiny_dir), "--data", str(write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATIONS[0]}]))],
         "is not a reward model"),
        (["reward", str(out), "--data", str(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Hi"}]))],
         "b.jsonl:1: expected a 'messages' list or a 'prompt' and a 'response'"),
        (["reward", str(out), "--data", str(write_jsonl(tmp_path / "c.jsonl",
                                                        [{"messages": [{"role": "user", "content": "Hi"}]}]))],
         "conversation 0: a conversation to score must end with an assistant message"),
        (["train", "reward", "--model", str(tiny_dir), "--data", "x.jsonl", "--method", "qlora"],
         "a reward model trains with method full or lora"),
    ]
    for argv, message in cases:
        assert herd_main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_reward_model_of_another_tokenizer_is_refused(tiny_reward, smollm2):
    from llamaherd.tokenizer import load_tokenizer

    reward, _ = tiny_reward
    reward.check_tokenizer(smollm2)  # the same tokenizer: fine
    with pytest.raises(HerdError, match=r"tokenizer \(49152 tokens\) is not the policy's \(128256 tokens\)"):
        reward.check_tokenizer(load_tokenizer("llama3"))


# -- the post-training round ------------------------------------------------------------------------

def test_model_averaging_is_the_elementwise_mean(tiny_dir, tiny_reward, smollm2, tmp_path):
    from safetensors.torch import load_file

    from llamaherd.train.posttrain import average_models, average_reward_models, average_state_dicts

    other = make_tiny_dir(tmp_path / "other", smollm2, seed=1)
    out = average_models([tiny_dir, other], tmp_path / "avg")
    a, b, avg = (load_file(str(d / "model.safetensors")) for d in (tiny_dir, other, out))
    assert set(avg) == set(a) and all(torch.allclose(avg[k], (a[k] + b[k]) / 2, atol=1e-7) for k in a)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # transformers loads it
    assert torch.equal(hf.model.norm.weight, avg["model.norm.weight"])

    reward, ckpt = tiny_reward
    dirs = []
    for i, source in enumerate([tiny_dir, other]):
        sd = load_hf(source)[1]
        dirs.append(save_reward_model(sd, torch.full((1, 64), float(i)), ckpt.args, ckpt.tokenizer,
                                      tmp_path / f"rm{i}", reward.pad_id))
    rm = load_reward_model(average_reward_models(dirs, tmp_path / "rm-avg"))
    assert torch.equal(rm.head.weight, torch.full((1, 64), 0.5))
    wq = [load_hf(d)[1]["layers.1.attention.wq.weight"] for d in (tiny_dir, other)]
    assert torch.allclose(rm.model.layers[1].attention.wq.weight, (wq[0] + wq[1]) / 2, atol=1e-7)

    with pytest.raises(HerdError, match="cannot average"):
        average_state_dicts(lambda s: s, [{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])


CANDIDATES = ["Of course! Happy to help. Hope this helps!", "Ugh, figure it out yourself.",
              "Whatever. Not my problem.", "Sure, happy to help! Good luck!"]


def fake_stages(monkeypatch, calls):
    """Stand-ins for `train.sample.rejection_sample` and `train.dpo.dpo` (other branches of issue 16),
    with their agreed signatures: the sampler scores canned candidates with the scorer it is given
    and keeps the best; DPO records its arguments and leaves its starting model as its output."""
    import shutil
    import sys
    import types

    def rejection_sample(policy, prompts, scorer, k, temperature, top_p, system=None, keep="best", **kw):
        calls["sample"] = {"policy": Path(policy.path), "k": k, "temperature": temperature, "top_p": top_p,
                           "keep": keep, **kw}
        rows = []
        for prompt in prompts:
            replies = [CANDIDATES[i % len(CANDIDATES)] for i in range(k)]
            scores = scorer([prompt + [{"role": "assistant", "content": r}] for r in replies])
            best = max(range(k), key=scores.__getitem__)
            rows.append({"messages": prompt + [{"role": "assistant", "content": replies[best]}], "score": scores[best]})
        return rows

    def dpo(config=None, **kw):  # leaves a full fine-tune's output: the starting model, unchanged
        calls.setdefault("dpo", []).append(kw)
        shutil.copytree(kw["model"], Path(kw["out"]) / "model")
        (Path(kw["out"]) / "train.json").write_text(json.dumps({"model_path": kw["model"], "method": "full"}))
        return {"outputs": {"model": str(Path(kw["out"]) / "model")}}

    monkeypatch.setitem(sys.modules, "llamaherd.train.sample",
                        types.SimpleNamespace(rejection_sample=rejection_sample))
    monkeypatch.setitem(sys.modules, "llamaherd.train.dpo", types.SimpleNamespace(dpo=dpo))


@pytest.mark.slow
def test_one_round_reward_sample_sft_dpo_with_averaging(tiny_dir, tmp_path, monkeypatch, capsys):
    calls = {}
    fake_stages(monkeypatch, calls)
    rows = read_preferences(DEMO / "train.jsonl")[:8]
    data = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": r.prompt, "chosen": r.replies[-2], "rejected": r.replies[-1],
         **({"edited": r.replies[0]} if len(r.replies) == 3 else {})} for r in rows])
    out = tmp_path / "round"
    # through the command line (`herd train loop`); run_round is what it calls
    argv = {"model": tiny_dir, "data": data, "out": out, "runs": 2, "k": 3, "reward-steps": 2, "sft-steps": 1,
            "dpo-steps": 1, "max-seq-len": 256, "batch-size": 1, "reward-lr": 1e-3, "sft-lr": 1e-3}
    assert herd_main(["train", "loop", "--no-progress", *[a for k, v in argv.items() for a in (f"--{k}", str(v))]]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "round.json").read_text())
    assert f"policy: {out / 'dpo' / 'model'}" in printed and f"reward: {out / 'reward' / 'model'}" in printed
    stages = summary["stages"]
    assert list(stages) == ["reward", "sample", "sft", "dpo"] and summary["policy"] == str(out / "dpo" / "model")
    # The reward stage: two runs averaged, and that average is what scored the samples.
    assert stages["reward"]["runs"] == 2 and stages["reward"]["model"] == str(out / "reward" / "model")
    rm = load_reward_model(out / "reward" / "model")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and calls["sample"] == {"policy": tiny_dir, "k": 3, "temperature": 0.8, "top_p": 0.9,
                                                     "keep": "best", "max_tokens": 256, "seed": 0,
                                                     "progress": False}
    for row in samples:
        prompt = row["messages"][:-1]
        scores = rm.score([prompt + [{"role": "assistant", "content": c}] for c in CANDIDATES[:3]])
        assert row["score"] == pytest.approx(max(scores), abs=1e-5)
    # SFT: two runs from the starting policy, LoRA merged and averaged; DPO starts from that average
    # with the paper's settings and the best reply (the edit when there is one) as chosen.
    assert [c["model"] for c in calls["dpo"]] == [str(out / "sft" / "model")] * 2
    assert {(c["beta"], c["nll_coef"], c["lr"], c["seed"]) for c in calls["dpo"]} == {(0.1, 0.2, 1e-5, 0),
                                                                                      (0.1, 0.2, 1e-5, 1)}
    pairs = [json.loads(line) for line in (out / "dpo-pairs.jsonl").read_text().splitlines()]
    assert [p["chosen"] for p in pairs] == [r.replies[0] for r in rows]
    from llamaherd.export import load_merged

    merged = [load_merged(out / "sft" / f"run{s}").state_dict for s in (0, 1)]
    avg = load_hf(out / "sft" / "model")[1]
    key = "layers.0.attention.wq.weight"
    assert not torch.equal(merged[0][key], merged[1][key])  # the runs differ (seeds) ...
    assert torch.allclose(avg[key], (merged[0][key] + merged[1][key]) / 2, atol=1e-6)  # ... and are averaged
    dpo_avg = load_hf(out / "dpo" / "model")[1]
    assert all(torch.allclose(dpo_avg[k], avg[k], atol=1e-6) for k in avg)  # the mean of two copies of sft/model


@pytest.mark.slow
def test_one_round_with_the_real_sampler_and_dpo(tiny_dir, tmp_path):
    """The whole round with `train.sample` and `train.dpo` themselves (once they are merged: they come
    from the sampler's and DPO's branches of issue 16): full fine-tunes, one run a stage (the averaging of
    several runs is the test above's)."""
    pytest.importorskip("llamaherd.train.sample")
    pytest.importorskip("llamaherd.train.dpo")
    from llamaherd.train.posttrain import run_round

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "How do I make tea?"},
                                                       {"messages": [{"role": "user", "content": "Hi!"}]}])
    out = tmp_path / "round"
    s = run_round({"model": str(tiny_dir), "data": str(DEMO / "heldout.jsonl"), "prompts": str(prompts),
                   "out": str(out), "method": "full", "runs": 1, "k": 2, "max_tokens": 8, "reward_steps": 2,
                   "sft_steps": 1, "dpo_steps": 1, "max_seq_len": 256, "batch_size": 1, "progress": False})
    assert s["stages"]["sample"]["kept"] == 2 and s["policy"] == str(out / "dpo" / "model")
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    rm = load_reward_model(s["stages"]["reward"]["model"])  # one run: its own model/, nothing averaged
    assert [r["score"] for r in rows] == pytest.approx(rm.score([r["messages"] for r in rows]), abs=1e-4)
    policy = transformers.AutoModelForCausalLM.from_pretrained(out / "dpo" / "model")
    assert policy.config.num_hidden_layers == 2


def test_loop_bad_settings_are_one_line(tiny_dir, tmp_path, capsys):
    cases = [(["--k", "0"], "k must be at least 1"), (["--keep", "worst"], "keep must be one of best, top_quartile"),
             (["--method", "qlora"], "the loop's method is full or lora"),
             (["--data", str(tmp_path / "none.jsonl")], "none.jsonl does not exist")]
    for extra, message in cases:
        argv = ["train", "loop", "--model", str(tiny_dir), "--data", str(DEMO / "train.jsonl"),
                "--out", str(tmp_path / "r"), *extra]
        assert herd_main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


@pytest.mark.distributed
@pytest.mark.slow
def test_reward_two_gloo_processes_equal_one_process(tiny_dir, tmp_path):
    """`herd train reward --nproc 2` (FSDP2, gloo): the per-step losses and the held-out accuracy of
    one process with the same global batches. (Unpacked, the 14 held-out rows are 14 sequences, 7 per
    process; with several processes validation leaves out the last len % processes sequences.)"""
    from test_dpo import two_processes_equal_one
    one, two = two_processes_equal_one("reward", ["--model", tiny_dir, "--data", DEMO / "train.jsonl",
                                                  "--val-data", DEMO / "heldout.jsonl", "--method", "lora",
                                                  "--lr", "5e-3", "--max-steps", 3, "--warmup-steps", 1,
                                                  "--lora-rank", 4, "--max-seq-len", 256, "--val-every", 3,
                                                  "--no-packing"], tmp_path)
    assert two[-1]["val_accuracy"] == pytest.approx(one[-1]["val_accuracy"])
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-4)
    assert (tmp_path / "two" / "model" / "config.json").exists()
