"""DPO (`herd train dpo`): the loss against TRL's `DPOTrainer`, the formatting-token mask, packing,
the LoRA reference, a run that learns a held-out preference, and bad inputs. Tiny random Llama models
with SmolLM2's real tokenizer and chat template."""

import functools
import json
import math

import pytest
import torch

from llamaherd.errors import HerdError
from llamaherd.export.hf import save_tokenizer
from llamaherd.train.data import IGNORE
from llamaherd.train.dpo import (DPOConfig, DPOLoss, PairBatches, collate_pairs, encode_response,
                                 keep_rated, pair_of, precompute_reference, read_pairs, sequence_logps,
                                 tokenize_pairs)
from llamaherd.train.lora import adapters_off, lora_llama3
from llamaherd.weights import build_model
from llamaherd.weights.hf import load_hf

transformers = pytest.importorskip("transformers")

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
PAIRS = [  # (prompt, chosen, rejected): responses of different lengths, so per-sequence means matter
    (PROMPT, "Paris.", "It is Lyon, I think, or maybe Marseille."),
    ([{"role": "user", "content": "2 + 2?"}], "4, of course: two and two make four.", "5."),
    ([{"role": "user", "content": "Say hi."}], "Hi!", "No."),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (and the machine is shared); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_hf(seed=0, vocab=49152):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    return model


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smollm2):
    """Two tiny random Llamas (policy, reference) as HF directories with SmolLM2's tokenizer."""
    dirs = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"tiny{seed}")
        tiny_hf(seed).save_pretrained(path)
        save_tokenizer(smollm2, path)
        dirs.append(path)
    return dirs


@functools.lru_cache(maxsize=4)
def _weights(path):
    return load_hf(path)[:2]


def herd_model(path):
    """A fresh herd model of a tiny directory (its weights read once; tests never change them in place)."""
    args, sd = _weights(path)
    return build_model(args, dict(sd))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def examples_of(tokenizer, pairs, mask=True):
    from llamaherd.train.dpo import Pair
    items = [Pair(p, [{"role": "assistant", "content": c}], [{"role": "assistant", "content": r}])
             for p, c, r in pairs]
    examples, stats = tokenize_pairs(tokenizer, items, 512, mask)
    assert stats.pairs == len(pairs)
    return examples


# -- the formatting-token mask ----------------------------------------------------------------

def test_masked_positions_are_exactly_end_of_turn_and_headers(smollm2):
    """SmolLM2 (ChatML) and Llama 3: in a response, the formatting tokens are the end-of-turn token and,
    between two messages, what the template writes up to the next content; nothing of the content."""
    from llamaherd.tokenizer import _default_llama3
    one = [{"role": "assistant", "content": "Hello there!"}]
    two = one + [{"role": "assistant", "content": "Bye."}]
    cases = [
        (smollm2, one, ["<|im_end|>"]),
        (smollm2, two, ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n", "<|im_end|>"]),
        (_default_llama3(), one, ["<|eot_id|>"]),
        (_default_llama3(), two, ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n",
                                  "<|eot_id|>"]),
    ]
    from llamaherd.chat.template import format_prompt
    for tok, response, expected in cases:
        tokens, is_response, is_format = encode_response(tok, PROMPT, response)
        assert [tok.decode([t]) for t, f in zip(tokens, is_format) if f] == expected
        assert not any(f and not r for r, f in zip(is_response, is_format))  # formatting ⊂ response
        # the response starts right after the generation prompt, and its content is all that is scored
        start = len(format_prompt(tok, PROMPT, add_generation_prompt=True))
        assert is_response.index(True) == start and not any(is_response[:start])
        content = tok.decode([t for t, r, f in zip(tokens, is_response, is_format) if r and not f])
        assert content == "".join(m["content"] for m in response)


def test_mask_changes_only_the_scored_targets(smollm2):
    on = examples_of(smollm2, PAIRS[:1], mask=True)[0].chosen
    off = examples_of(smollm2, PAIRS[:1], mask=False)[0].chosen
    assert on.inputs == off.inputs and on.targets == off.targets
    dropped = [t for t, a, b in zip(on.targets, on.scored, off.scored) if b and not a]
    assert dropped == [smollm2.special_tokens["<|im_end|>"]]
    assert sum(off.scored) == sum(t != IGNORE for t in off.targets)  # off: every response target


# -- the loss against TRL ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def trl_trainer(tiny_dirs, tmp_path_factory):
    """TRL's DPOTrainer over the tiny policy (seed 0) and a different reference (seed 1)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dirs[0])
    policy = transformers.LlamaForCausalLM.from_pretrained(tiny_dirs[0], dtype=torch.float32)
    ref = transformers.LlamaForCausalLM.from_pretrained(tiny_dirs[1], dtype=torch.float32)
    data = datasets.Dataset.from_list([{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS])
    # bf16=False: TRL's default autocasts the reference model to bf16 (herd trains in fp32 on the CPU).
    args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=0.1, report_to=[], bf16=False,
                         per_device_train_batch_size=len(PAIRS), use_cpu=True, logging_steps=1)
    return trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)


def trl_loss(trainer, smollm2, pairs, loss_type, weights=None):
    """TRL's `_compute_loss` on our tokens: rows [chosen...; rejected...], completion = the response."""
    rows = []
    for side in (1, 2):
        for p in pairs:
            tokens, is_response, _ = encode_response(smollm2, p[0], [{"role": "assistant", "content": p[side]}])
            rows.append((tokens, is_response))
    T = max(len(t) for t, _ in rows)
    inputs = {"input_ids": torch.tensor([t + [0] * (T - len(t)) for t, _ in rows]),
              "attention_mask": torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t, _ in rows]),
              "completion_mask": torch.tensor([[int(r) for r in m] + [0] * (T - len(m)) for _, m in rows])}
    trainer.loss_types, trainer.loss_weights = loss_type, weights or [1.0] * len(loss_type)
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs, return_outputs=False))


def herd_loss(tiny_dirs, smollm2, pairs, loss_type="sigmoid", nll_coef=0.0, mask=False, packing=True, share=True):
    """Our loss (mean over pairs) with the seed-1 model's log-probs as the precomputed reference."""
    examples = examples_of(smollm2, pairs, mask)
    precompute_reference(herd_model(tiny_dirs[1]), examples, 2, 512, True, "cpu")
    wrapper = DPOLoss(herd_model(tiny_dirs[0]), beta=0.1, nll_coef=nll_coef, loss_type=loss_type, loss_chunk=5000)
    batch = collate_pairs(examples, packing, 1024, share_prompt=share)
    loss, metrics = wrapper(**batch)
    return loss / len(pairs), {k: float(v) / len(pairs) for k, v in metrics.items()}, wrapper


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_equals_trl_with_the_mask_off_and_no_nll(tiny_dirs, smollm2, trl_trainer, loss_type):
    ours, _, _ = herd_loss(tiny_dirs, smollm2, PAIRS, loss_type)
    theirs = trl_loss(trl_trainer, smollm2, PAIRS, [loss_type])
    assert abs(float(ours) - theirs) <= 1e-5 * max(1.0, abs(theirs)), (float(ours), theirs)
    if loss_type == "sigmoid":
        assert abs(theirs - math.log(2)) > 1e-3  # policy and reference differ: not the trivial log 2


def test_nll_term_equals_trl_sft_for_one_pair_and_the_papers_mean_for_several(tiny_dirs, smollm2, trl_trainer):
    """With nll_coef 0.2 and one pair, ours equals TRL's loss_type=["sigmoid", "sft"], loss_weights=[1, 0.2].
    With several pairs TRL's "sft" term is the mean NLL over all chosen *tokens* of the batch, so long
    responses weigh more; the Llama 3 paper's NLL term (after Pang et al., 2024) is each chosen
    *sequence's* length-normalised NLL, so ours is the mean over pairs of per-sequence means, checked
    here against a hand computation from the same log-probabilities (and shown to differ from TRL's)."""
    for pair in PAIRS[:2]:
        ours, _, _ = herd_loss(tiny_dirs, smollm2, [pair], nll_coef=0.2)
        theirs = trl_loss(trl_trainer, smollm2, [pair], ["sigmoid", "sft"], [1.0, 0.2])
        assert abs(float(ours) - theirs) <= 1e-5
    ours, metrics, wrapper = herd_loss(tiny_dirs, smollm2, PAIRS, nll_coef=0.2)
    # by hand: per-token log-probs of each chosen response from the full logits, no packing
    seq_means, token_sum, token_count = [], 0.0, 0
    for ex in examples_of(smollm2, PAIRS, mask=False):
        with torch.no_grad():
            logp = wrapper.model(torch.tensor([ex.chosen.inputs]))[0].log_softmax(-1)
        picked = [-float(logp[i, t]) for i, t in enumerate(ex.chosen.targets) if t != IGNORE]
        seq_means.append(sum(picked) / len(picked))
        token_sum, token_count = token_sum + sum(picked), token_count + len(picked)
    paper, trl_style = sum(seq_means) / len(seq_means), token_sum / token_count
    assert abs(paper - trl_style) > 1e-3  # the two normalisations differ on these lengths
    assert abs(metrics["chosen_nll"] - paper) <= 1e-5
    assert abs(float(ours) - (metrics["dpo_loss"] + 0.2 * paper)) <= 1e-5
    trl_sft = trl_loss(trl_trainer, smollm2, PAIRS, ["sigmoid", "sft"], [1.0, 0.2])
    assert abs(trl_sft - (metrics["dpo_loss"] + 0.2 * trl_style)) <= 1e-5  # TRL: the token-level mean


def test_masked_log_probs_equal_a_hand_sum_over_the_content_tokens(tiny_dirs, smollm2):
    model = herd_model(tiny_dirs[0])
    examples = examples_of(smollm2, PAIRS, mask=True)
    with torch.no_grad():
        s = sequence_logps(model, collate_pairs(examples, True, 1024), 5000)
        for p, ex in enumerate(examples):
            for side, seq in enumerate((ex.chosen, ex.rejected)):
                logp = model(torch.tensor([seq.inputs]))[0].log_softmax(-1)
                eot = smollm2.special_tokens["<|im_end|>"]
                want = sum(float(logp[i, t]) for i, t in enumerate(seq.targets) if t not in (IGNORE, eot))
                assert abs(float(s["logps"][p, side]) - want) <= 1e-4


def test_packed_equals_unpacked_loss_and_gradients(tiny_dirs, smollm2):
    """Unpacked (one padded row per side), packed (chosen and rejected as two documents) and packed
    with the prompt shared (one document per pair, the replies as two branches of it) agree."""
    grads, losses = [], []
    for packing, share in ((False, False), (True, False), (True, True)):
        loss, metrics, wrapper = herd_loss(tiny_dirs, smollm2, PAIRS, nll_coef=0.2, mask=True, packing=packing,
                                           share=share)
        loss.backward()
        losses.append((float(loss), metrics))
        grads.append(torch.cat([p.grad.flatten() for p in wrapper.model.parameters()]))
    for (loss, metrics), grad in zip(losses[1:], grads[1:]):
        assert abs(loss - losses[0][0]) <= 1e-5
        assert all(abs(metrics[k] - losses[0][1][k]) <= 1e-5 for k in metrics)
        assert (grad - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max()
    # packed: all three pairs in one row, chosen and rejected as neighbouring documents
    examples = examples_of(smollm2, PAIRS)
    batch = collate_pairs(examples, True, 1024)
    assert batch["tokens"].shape[0] == 1 and batch["doc_ids"].max() == 5
    assert collate_pairs(examples, False, 1024)["tokens"].shape[0] == 6
    # shared: three documents, each prompt once (less its last token, which opens both branches)
    shared = collate_pairs(examples, True, 1024, share_prompt=True)
    doc, branch = shared["doc_ids"][0].unbind(-1)
    assert doc.max() == 2 and set(branch.tolist()) == {0, 1, 2}
    prompts = sum(int((branch[doc == d] == 0).sum()) for d in range(3))
    assert shared["tokens"].shape[1] == batch["tokens"].shape[1] - prompts
    assert all(e.chosen.inputs[:n] == e.rejected.inputs[:n] and e.chosen.targets[n] != IGNORE
               for e, n in ((e, int(((branch == 0) & (doc == d)).sum())) for d, e in enumerate(examples)))


def test_lora_reference_is_the_base_with_adapters_off(tiny_dirs, smollm2):
    model = herd_model(tiny_dirs[0])
    batch = collate_pairs(examples_of(smollm2, PAIRS), True, 1024)
    with torch.no_grad():
        base = sequence_logps(model, batch, 5000)["logps"]
    lora_llama3(model, "all", rank=4, alpha=8)
    wrapper = DPOLoss(model)
    loss, metrics = wrapper(**batch)  # at the start policy == reference: margin 0, loss log 2 (+ NLL)
    assert abs(float(metrics["reward_margin"])) <= 1e-6 and abs(float(metrics["dpo_loss"]) / 3 - math.log(2)) <= 1e-6
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05)
        moved = sequence_logps(model, batch, 5000)["logps"]
        assert (moved - base).abs().max() > 1e-2  # the adapters now change the policy...
        assert (wrapper.reference_logps(batch) - base).abs().max() <= 1e-5  # ...not the reference
        with adapters_off(model):
            assert (sequence_logps(model, batch, 5000)["logps"] - base).abs().max() <= 1e-5
    assert all(m.enabled for m in model.modules() if hasattr(m, "enabled"))


# -- the recipe -------------------------------------------------------------------------------

THINGS = ["the sea", "a cat", "my garden", "the moon", "old books", "rain", "coffee", "a bridge", "winter",
          "music", "the city", "a river", "bread", "trains", "the stars", "a forest", "snow", "chess"]


def polite_pairs(things):
    """A learnable preference: a polite reply over a rude one, whatever the topic."""
    return [{"prompt": [{"role": "user", "content": f"Tell me about {t}."}],
             "chosen": [{"role": "assistant", "content": f"Thank you for asking! I like {t} a lot."}],
             "rejected": [{"role": "assistant", "content": f"Go away, {t} is boring."}],
             "rating": "better"} for t in things]


@pytest.fixture(scope="module")
def dpo_run(tiny_dirs, tmp_path_factory):
    """LoRA DPO on 14 topics; 4 held-out topics give the validation metrics before and after."""
    from llamaherd.cli import main
    data = tmp_path_factory.mktemp("prefs")
    train = write_jsonl(data / "train.jsonl", polite_pairs(THINGS[:14]) + [
        {**polite_pairs(["tea"])[0], "rating": "marginally better"}])  # filtered out by min_rating
    val = write_jsonl(data / "val.jsonl", polite_pairs(THINGS[14:]))
    out = data / "run"
    rc = main(["train", "dpo", "--model", str(tiny_dirs[0]), "--data", str(train), "--val-data", str(val),
               "--out", str(out), "--method", "lora", "--lr", "5e-3", "--max-steps", "12", "--batch-size", "4",
               "--warmup-steps", "1", "--lora-rank", "8", "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "summary.json").read_text())


def test_dpo_raises_the_held_out_margin_and_keeps_the_chosen_nll(dpo_run):
    """The held-out reward margin (β × the chosen-over-rejected log-ratio gain) starts at 0 (policy ==
    reference) and rises; with the NLL term the held-out chosen NLL rises by at most 2% (it may fall)."""
    out, summary = dpo_run
    before, after = summary["val_before"], summary["val_after"]
    assert before["val_reward_margin"] == pytest.approx(0, abs=1e-6)
    assert after["val_reward_margin"] > 0.5 and after["val_reward_accuracy"] == 1.0
    assert after["val_chosen_nll"] <= before["val_chosen_nll"] * 1.02
    assert summary["data"]["filtered_by_rating"] == 1 and summary["data"]["pairs"] == 14
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 12 and {"loss", "reward_margin", "reward_accuracy", "chosen_nll"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]
    assert (out / "adapter" / "adapter_config.json").exists()


def test_full_fine_tune_precomputes_the_reference(tiny_dirs, tmp_path):
    from llamaherd.train.dpo import dpo
    train = write_jsonl(tmp_path / "t.jsonl", polite_pairs(THINGS[:4]))
    summary = dpo(model=str(tiny_dirs[0]), data=str(train), out=str(tmp_path / "o"), method="full", lr=1e-3,
                  max_steps=2, batch_size=2, warmup_steps=0, progress=False)
    first = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["reward_margin"] == pytest.approx(0, abs=1e-5)  # step 1: the policy is the reference
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (tmp_path / "o" / "model" / "config.json").exists() and summary["steps"] == 2


def test_pair_batches_replay_and_cover(smollm2):
    examples = examples_of(smollm2, PAIRS * 3)
    a, b = PairBatches(examples, 2, 512, seed=1), PairBatches(examples, 2, 512, seed=1)
    assert len(a) == 4
    assert [x["tokens"].tolist() for x in a.epoch(1, 2)] == [x["tokens"].tolist() for x in b.epoch(1)][2:]
    val = PairBatches(examples, 4, 512, shuffle=False, drop_last=False)
    assert [int(x["n_pairs"]) for x in val.epoch(0)] == [4, 4, 1]


# -- data and bad inputs ----------------------------------------------------------------------

def test_pair_forms_and_rating_filter():
    p = pair_of({"prompt": "Hi", "chosen": "Hello!", "rejected": {"role": "assistant", "content": "Go."},
                 "rating": "Significantly Better"})
    assert p.prompt == [{"role": "user", "content": "Hi"}] and p.chosen == [{"role": "assistant", "content": "Hello!"}]
    assert p.rating == "significantly better"
    rated = [pair_of({"prompt": "a", "chosen": "b", "rejected": "c", "rating": r})
             for r in ("significantly better", "better", "slightly better", "marginally better")]
    unrated = pair_of({"prompt": "a", "chosen": "b", "rejected": "c"})
    assert len(keep_rated(rated + [unrated], "better")) == 3
    assert len(keep_rated(rated, "any")) == 4 and len(keep_rated(rated, "significantly better")) == 1
    assert DPOConfig().beta == 0.1 and DPOConfig().nll_coef == 0.2 and DPOConfig().lr == 1e-5


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "a", "chosen": "b"}, "missing 'rejected'"),
    ({"chosen": "b", "rejected": "c"}, "missing 'prompt'"),
    ({"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"},
     "'chosen' must hold assistant messages only"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "rating": "awesome"}, "unknown rating 'awesome'"),
    ({"prompt": [], "chosen": "b", "rejected": "c"}, "'prompt' must be a string, a message or a non-empty list"),
])
def test_bad_pairs_are_one_line_naming_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}, record])
    with pytest.raises(HerdError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("extra, data, message", [
    ([], '{"prompt": "a", "chosen": "b", "rejected": "b"}\n', "p.jsonl:1: 'chosen' and 'rejected' are identical"),
    ([], '{"prompt": "a", "chosen": "b", "rejected": "c", "rating": "slightly better"}\n',
     "no pair of"),
    (["--beta", "0"], None, "beta must be positive"),
    (["--loss-type", "kto"], None, "unknown loss_type 'kto'; valid: sigmoid, hinge, ipo"),
    (["--min-rating", "great"], None, "unknown min_rating 'great'"),
])
def test_cli_bad_inputs_are_one_line_and_exit_1(tiny_dirs, tmp_path, capsys, extra, data, message):
    from llamaherd.cli import main
    path = tmp_path / "p.jsonl"
    path.write_text(data or '{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    argv = ["train", "dpo", "--model", str(tiny_dirs[0]), "--data", str(path), "--out", str(tmp_path / "o"),
            "--max-steps", "1", "--batch-size", "1", "--no-progress", *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and message in err and "\n" not in err, err


def test_cli_help_and_shipped_recipe(capsys):
    from llamaherd.cli import main
    import yaml
    from llamaherd.train.config import make_config
    with pytest.raises(SystemExit):
        main(["train", "dpo", "--help"])
    text = capsys.readouterr().out
    assert "--beta" in text and "--nll-coef" in text and "--mask-format-tokens" in text and "--lora-rank" in text
    assert main(["train", "--show", "dpo-smollm2"]) == 0
    cfg = make_config(yaml.safe_load(capsys.readouterr().out), cls=DPOConfig)
    assert (cfg.beta, cfg.lr, cfg.nll_coef, cfg.mask_format_tokens) == (0.1, 1e-5, 0.2, True)


# -- several processes, resume, QLoRA --------------------------------------------------------------

def two_processes_equal_one(verb, argv, out):
    """`python -m llamaherd.train VERB` in this process with --batch-size 2, then under torchrun with 2
    gloo processes and --batch-size 1 each: the same global batches, so the same per-step losses.
    Returns both runs' metrics records."""
    import os
    import subprocess
    import sys
    from llamaherd.train.__main__ import main as train_main
    argv = [verb, *map(str, argv), "--no-progress"]
    assert train_main([*argv, "--batch-size", "2", "--out", str(out / "one")]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "llamaherd.train", *argv, "--batch-size", "1", "--out", str(out / "two")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    runs = [[json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert len(runs[0]) == len(runs[1]) and runs[0][0]["loss"] != runs[0][-1]["loss"]
    assert [r["loss"] for r in runs[1]] == pytest.approx([r["loss"] for r in runs[0]], rel=1e-5)
    return runs


@pytest.mark.distributed
@pytest.mark.slow
def test_dpo_two_gloo_processes_equal_one_process(tiny_dirs, tmp_path):
    """LoRA DPO under FSDP2 (the reference: the sharded model with its adapters off), validation
    split over the processes: the losses and held-out metrics of one process."""
    train = write_jsonl(tmp_path / "t.jsonl", polite_pairs(THINGS[:8]))
    val = write_jsonl(tmp_path / "v.jsonl", polite_pairs(THINGS[14:18]))
    one, two = two_processes_equal_one("dpo", ["--model", tiny_dirs[0], "--data", train, "--val-data", val,
                                               "--method", "lora", "--lr", "5e-3", "--max-steps", 3,
                                               "--warmup-steps", 1, "--lora-rank", 4, "--val-every", 3], tmp_path)
    assert two[-1]["val_reward_margin"] == pytest.approx(one[-1]["val_reward_margin"], rel=1e-4, abs=1e-6)
    assert (tmp_path / "two" / "adapter" / "adapter_config.json").exists()
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["pairs_seen"] == 6


@pytest.mark.slow
def test_dpo_resume_equals_an_uninterrupted_run(tiny_dirs, tmp_path):
    """Ctrl-C after step 2 keeps a checkpoint; --resume gives exactly the losses and metrics of a run
    never stopped (pair order, adapters, optimizer restored)."""
    from llamaherd.train.dpo import dpo
    train = write_jsonl(tmp_path / "t.jsonl", polite_pairs(THINGS[:6]))
    kw = dict(model=str(tiny_dirs[0]), data=str(train), method="lora", lr=5e-3, max_steps=4, batch_size=2,
              warmup_steps=1, lora_rank=4, progress=False, seed=5)
    dpo(out=str(tmp_path / "a"), **kw)

    def interrupt(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dpo(out=str(tmp_path / "b"), on_step=interrupt, **kw)
    dpo(out=str(tmp_path / "b"), resume=True, **kw)
    a, b = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("a", "b"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "reward_margin", "chosen_nll"):
        assert [r[key] for r in b] == [r[key] for r in a], key
    assert len({r["loss"] for r in a}) == 4  # it did train


@pytest.fixture(scope="module")
def tiny_q8_gguf(tiny_dirs, smollm2, tmp_path_factory):
    """The tiny policy as a Q8_0 GGUF with SmolLM2's tokenizer."""
    from llamaherd.export.gguf import save_gguf
    args, sd = _weights(tiny_dirs[0])
    return save_gguf(dict(sd), args, smollm2, tmp_path_factory.mktemp("q8") / "tiny-q8_0.gguf", quant="q8_0")


@pytest.mark.slow
def test_qlora_dpo_trains_adapters_over_the_quantized_blocks(tiny_q8_gguf, tmp_path):
    """QLoRA DPO: adapters over the file's Q8_0 blocks, the reference = those blocks with the adapters
    off. Its losses are LoRA's over the same file dequantized to float32 (the same numbers, other kernels)."""
    from llamaherd.train.dpo import dpo
    from llamaherd.train.finetune import load_for_training
    train = write_jsonl(tmp_path / "t.jsonl", polite_pairs(THINGS[:4]))
    runs = {}
    for method in ("qlora", "lora"):
        dpo(model=str(tiny_q8_gguf), data=str(train), out=str(tmp_path / method), method=method, lr=5e-3,
            max_steps=3, batch_size=2, warmup_steps=0, lora_rank=4, progress=False)
        runs[method] = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    q, f = runs["qlora"], runs["lora"]
    assert q[0]["reward_margin"] == pytest.approx(0, abs=1e-6) and q[-1]["reward_margin"] > 0
    assert [r["loss"] for r in q] == pytest.approx([r["loss"] for r in f], rel=1e-3)
    assert (tmp_path / "qlora" / "adapter" / "adapter_config.json").exists()
    from llamaherd.quantize.linear import BlockLinear, Int4Linear, Int8Linear
    model, _ = load_for_training(tiny_q8_gguf, "qlora", "cpu")  # what qlora trains over: the file's blocks
    wq = model.layers[0].attention.wq
    assert isinstance(getattr(wq, "fused", wq), (BlockLinear, Int4Linear, Int8Linear))


def test_response_losses_of_a_frozen_output_equal_the_chunked_ones():
    """The fused path (gradients formed in the forward, scaled in the backward) gives the chunked
    cross-entropy's per-token losses and, under any upstream weights, its gradients."""
    from llamaherd.train.dpo import response_losses
    from llamaherd.train.loss import chunked_token_losses
    g = torch.Generator().manual_seed(0)
    output = torch.nn.Linear(16, 300, bias=False)
    output.weight.requires_grad_(False)
    targets = torch.randint(0, 300, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    results = []
    for fused in (True, False):
        h = torch.randn(37, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        losses = (response_losses(h, output, targets, chunk=1) if fused  # blocks of 27 tokens
                  else chunked_token_losses(h, output.weight, targets, chunk=64))
        (losses * upstream).sum().backward()
        results.append((losses.detach(), h.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
