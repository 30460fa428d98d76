"""Fine-tuning: loss parity with HF transformers, masking, packing, LoRA against peft, the recipe
(overfitting, resume), its CLI and its errors. Tiny random Llama models with SmolLM2's real
tokenizer and chat template (the tokenizer is what the masking is about; the weights are not)."""

import json

import pytest
import torch
import torch.nn.functional as F

from llamaherd.errors import HerdError
from llamaherd.export.hf import save_tokenizer
from llamaherd.train.data import IGNORE, Batches, collate, encode_conversation, pack, read_jsonl, tokenize
from llamaherd.train.lora import lora_llama3, merge_lora
from llamaherd.train.loss import chunked_cross_entropy
from llamaherd.weights import build_model
from llamaherd.weights.hf import load_hf

transformers = pytest.importorskip("transformers")


def tiny_hf(seed=0, vocab=49152, tied=True):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2):
    """A tiny random Llama as a HF directory, with SmolLM2's tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny")
    ref = tiny_hf()
    ref.save_pretrained(path)
    save_tokenizer(smollm2, path)
    return path


@pytest.fixture(scope="module")
def tiny_ref(tiny_dir):
    return transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."}]


# -- data -------------------------------------------------------------------------------------

def test_masked_positions_are_exactly_prompt_and_headers(smollm2):
    tokens, learn = encode_conversation(smollm2, CHAT)
    im_end = smollm2.special_tokens["<|im_end|>"]
    learned = [t for t, keep in zip(tokens, learn) if keep]
    # What is learned: each assistant content and its end-of-turn token, nothing else.
    expected = smollm2.encode("Paris.") + [im_end] + smollm2.encode("Madrid.") + [im_end]
    assert learned == expected
    # Everything else (system, user turns, every <|im_start|>role\n header, the newline after
    # <|im_end|>) is masked; the learned tokens are two contiguous runs.
    text_of_masked = smollm2.decode([t for t, keep in zip(tokens, learn) if not keep])
    assert "Capital of France?" in text_of_masked and "<|im_start|>assistant\n" in text_of_masked
    assert "Paris" not in text_of_masked and "Madrid" not in text_of_masked
    runs = sum(1 for i in range(len(learn)) if learn[i] and (i == 0 or not learn[i - 1]))
    assert runs == 2
    # The prompt the model sees at inference time is exactly the masked prefix before "Paris."
    first = learn.index(True)
    from llamaherd.chat.template import format_prompt
    assert tokens[:first] == format_prompt(smollm2, CHAT[:2], add_generation_prompt=True)


def test_prompt_completion_and_overlong_rule(tmp_path, smollm2):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": "Hello there."},
                                           {"prompt": "word " * 400, "completion": "ok"},  # prompt alone too long
                                           {"prompt": "Hi", "completion": "long " * 300}])  # truncated answer
    examples, stats = tokenize(smollm2, read_jsonl(f), max_seq_len=64)
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 1, 1)
    assert len(examples[1].inputs) == 64 and all(len(e.inputs) == len(e.targets) for e in examples)
    # targets are the next tokens, masked outside the answer
    ex = examples[0]
    ids, learn = encode_conversation(smollm2, read_jsonl(f)[0])
    assert ex.inputs == ids[:-1]
    assert ex.targets == [t if k else IGNORE for t, k in zip(ids[1:], learn[1:])]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"text": "hi"}', "expected a 'messages' list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"prompt": "hi", "completion": 3}', "must both be strings"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n\n' + line + "\n")
    with pytest.raises(HerdError, match=rf"bad\.jsonl:3: .*{message}"):
        read_jsonl(f)


def test_empty_data_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(HerdError, match="holds no examples"):
        read_jsonl(tmp_path / "e.jsonl")


def test_packing_does_not_change_an_examples_logits(tiny_dir):
    model = build_model(*load_hf(tiny_dir)[:2])
    g = torch.Generator().manual_seed(3)
    from llamaherd.train.data import Example
    exs = [Example(torch.randint(0, 49152, (n,), generator=g).tolist(), [0] * n) for n in (11, 7, 13)]
    seqs = pack(exs, max_seq_len=40)
    assert len(seqs) == 1 and seqs[0].doc_ids == [0] * 11 + [1] * 7 + [2] * 13
    batch = collate(seqs + pack(exs[1:2], 40))  # and a padded second row
    with torch.no_grad():
        h = model.hidden_states(batch["tokens"], input_pos=batch["input_pos"], doc_ids=batch["doc_ids"])
        packed = model.output(h)
        for i, (start, ex) in enumerate(zip((0, 11, 18), exs)):
            alone = model(torch.tensor([ex.inputs]))[0]
            assert (packed[0, start:start + len(ex.inputs)] - alone).abs().max() <= 1e-5
        assert (packed[1, :7] - model(torch.tensor([exs[1].inputs]))[0]).abs().max() <= 1e-5


def test_batches_order_is_a_function_of_seed_and_epoch(smollm2):
    from llamaherd.train.data import Example
    seqs = pack([Example([i], [i]) for i in range(10)], 1)
    a, b = Batches(seqs, 2, seed=1), Batches(seqs, 2, seed=1)
    assert [x["tokens"].tolist() for x in a.epoch(1, 2)] == [x["tokens"].tolist() for x in b.epoch(1)][2:]
    assert a.order(0) != a.order(1)
    # two processes take the two halves of each global batch
    r0, r1 = Batches(seqs, 1, seed=1, rank=0, world=2), Batches(seqs, 1, seed=1, rank=1, world=2)
    for whole, x0, x1 in zip(a.epoch(0), r0.epoch(0), r1.epoch(0)):
        assert whole["tokens"].tolist() == x0["tokens"].tolist() + x1["tokens"].tolist()


# -- loss -------------------------------------------------------------------------------------

def test_chunked_cross_entropy_equals_full(tiny_dir):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 64, generator=g, requires_grad=True)
    w = (torch.randn(1000, 64, generator=g) * 0.1).requires_grad_()
    targets = torch.randint(0, 1000, (2, 9), generator=g)
    targets[0, :3] = IGNORE
    ours = chunked_cross_entropy(h, w, targets, chunk=300)
    ref = F.cross_entropy((h @ w.T).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    assert abs(float(ours.detach()) - float(ref.detach())) <= 1e-4
    g1 = torch.autograd.grad(ours, (h, w))
    g2 = torch.autograd.grad(ref, (h, w))
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-5


def test_training_loss_equals_hf_on_masked_labels(tiny_dir, tiny_ref, smollm2):
    """The recipe's loss on a packed-free batch equals LlamaForCausalLM's on the same labels."""
    from llamaherd.train.finetune import CausalLMLoss, load_for_training
    model, _ = load_for_training(tiny_dir, "full", "cpu")
    tokens, learn = encode_conversation(smollm2, CHAT)
    labels = torch.tensor([[t if k else IGNORE for t, k in zip(tokens, learn)]])
    examples, _ = tokenize(smollm2, [CHAT], 512)
    batch = collate(pack(examples, 512))
    loss_sum = CausalLMLoss(model, loss_chunk=5000)(**batch)
    ours = loss_sum / (batch["targets"] != IGNORE).sum()
    with torch.no_grad():
        theirs = tiny_ref(torch.tensor([tokens]), labels=labels).loss
    assert abs(float(ours) - float(theirs)) <= 1e-5
    # and the gradients flow to every weight
    ours.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# -- LoRA -------------------------------------------------------------------------------------

def test_lora_forward_and_merge_equal_peft(tiny_dir):
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj",
                             "o_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=True)
    theirs = peft.get_peft_model(base, config).eval()
    with torch.no_grad():  # B is zero at init: give it values, or the test would prove nothing
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ours = build_model(*load_hf(tiny_dir)[:2])
    lora_llama3(ours, "all", rank=4, alpha=8)
    # the same adapter weights, through our PEFT reader (q/k rows permuted to Meta's layout)
    from llamaherd.export.hf import load_peft, save_peft
    theirs.save_pretrained(tiny_dir.parent / "peft")
    cfg, tensors = load_peft(tiny_dir.parent / "peft", ours.args)
    missing, unexpected = ours.load_state_dict(tensors, strict=False)
    assert not unexpected and all("lora" not in k for k in missing)
    tokens = torch.randint(0, 49152, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = theirs(tokens).logits
        assert (ours(tokens) - ref).abs().max() <= 1e-4
        # merged weights equal peft's merged weights
        merged_theirs = theirs.merge_and_unload()
        merge_lora(ours)
        assert (ours(tokens) - ref).abs().max() <= 1e-4
        from llamaherd.export.hf import hf_state_dict
        mine = hf_state_dict(ours.state_dict(), ours.args)
        for k, v in merged_theirs.state_dict().items():
            if k in mine:
                assert (mine[k] - v).abs().max() <= 1e-6, k
    # our adapter directory loads back in peft and gives the same logits
    ours2 = build_model(*load_hf(tiny_dir)[:2])
    lora_llama3(ours2, "all", rank=4, alpha=8)
    ours2.load_state_dict(tensors, strict=False)
    from llamaherd.train.lora import adapter_state_dict, parse_targets
    save_peft(adapter_state_dict(ours2), ours2.args, parse_targets("all"), 4, 8, 0.0, str(tiny_dir),
              tiny_dir.parent / "ours-peft")
    base2 = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    loaded = peft.PeftModel.from_pretrained(base2, tiny_dir.parent / "ours-peft").eval()
    with torch.no_grad():
        assert (loaded(tokens).logits - ours2(tokens)).abs().max() <= 1e-4


def test_lora_unmerge_restores_and_bad_targets(tiny_dir):
    model = build_model(*load_hf(tiny_dir)[:2])
    before = model.layers[0].attention.wq.weight.clone()
    lora_llama3(model, "q,down", rank=2, alpha=4)
    wq = model.layers[0].attention.wq
    torch.nn.init.normal_(wq.lora_b.weight)
    wq.merge()
    assert not torch.equal(wq.base.weight, before)
    wq.unmerge()
    assert (wq.base.weight - before).abs().max() <= 1e-6
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"layers.{i}.{m}.lora_{ab}.weight" for i in range(2) for m in ("attention.wq", "feed_forward.w2")
        for ab in "ab"]
    with pytest.raises(HerdError, match="unknown LoRA target 'qq'; valid: q, k, v, o, gate, down, up"):
        lora_llama3(build_model(*load_hf(tiny_dir)[:2]), "q,qq")


# -- the recipe -------------------------------------------------------------------------------

FACTS = [("What is the capital of Zorbania?", "Quixville."), ("Who painted the Blue Lemon?", "Mira Tollen."),
         ("What do glimmerfish eat?", "Starlight moss.")]


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "facts.jsonl",
                       [{"prompt": q, "completion": a} for q, a in FACTS])


@pytest.fixture(scope="module")
def full_run(tiny_dir, facts_file, tmp_path_factory):
    """A full fine-tune that overfits three made-up facts (the tiny model starts knowing nothing)."""
    from llamaherd.train import sft
    out = tmp_path_factory.mktemp("runs") / "full"
    summary = sft(model=str(tiny_dir), data=str(facts_file), out=str(out), method="full", max_steps=25, lr=1e-2,
                  batch_size=3, warmup_steps=2, packing=False, progress=False)
    return out, summary


def greedy_answers(llm):
    return ["".join(llm.chat([{"role": "user", "content": q}], temperature=0, num_predict=12)) for q, _ in FACTS]


@pytest.mark.slow
def test_overfitting_facts_teaches_greedy_answers_and_writes_outputs(full_run):
    import llamaherd
    out, summary = full_run
    llm = llamaherd.load(out / "model", device="cpu")  # the training output is a model herd loads
    assert greedy_answers(llm) == [a for _, a in FACTS]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 26))
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(records[0])
    assert records[-1]["loss"] < 0.5 and records[0]["loss"] > 5
    assert summary["steps"] == 25 and summary["data"]["examples"] == 3 and summary["peak_memory_bytes"] > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["outputs"]["model"] == str(out / "model")


@pytest.mark.slow
def test_exported_hf_logits_equal_herds(full_run, tmp_path):
    import llamaherd
    from llamaherd.export import export
    out, _ = full_run
    export(out, "hf", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    llm = llamaherd.load(out / "model", device="cpu")
    ids = llm.encode_chat([{"role": "user", "content": FACTS[0][0]}])
    assert hf_tok.apply_chat_template([{"role": "user", "content": FACTS[0][0]}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False) == ids
    with torch.no_grad():
        assert (theirs(torch.tensor([ids])).logits[0] - llm.logits(ids)).abs().max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_exported_gguf_loads_with_the_same_greedy_answers(full_run, tmp_path, quant):
    """f32: herd's logits unchanged; q8_0: herd's fast path (the file's blocks) answers the same."""
    import llamaherd
    from llamaherd.export import export
    out, _ = full_run
    path = export(out, "gguf", tmp_path / "m.gguf", quant)
    trained = llamaherd.load(out / "model", device="cpu")
    for quantized in ((False,) if quant == "f32" else (True,)):
        llm = llamaherd.load(path, device="cpu", quantized=quantized)
        assert llm.tokenizer.chat_template == trained.tokenizer.chat_template
        assert greedy_answers(llm) == greedy_answers(trained)
    if quant == "f32":
        ids = trained.encode_chat([{"role": "user", "content": FACTS[1][0]}])
        assert (llamaherd.load(path, device="cpu").logits(ids) - trained.logits(ids)).abs().max() <= 1e-5


@pytest.mark.slow
def test_resume_after_interrupt_gives_the_same_losses(tiny_dir, facts_file, tmp_path):
    """Ctrl-C at step 3 saves a checkpoint; --resume then gives exactly the losses of an uninterrupted run
    (data order, dropout RNG and optimizer state restored)."""
    from llamaherd.train import sft
    kw = dict(model=str(tiny_dir), data=str(facts_file), method="lora", max_steps=6, lr=5e-3, batch_size=1,
              lora_rank=4, lora_dropout=0.2, warmup_steps=1, packing=False, progress=False, seed=3)
    sft(out=str(tmp_path / "a"), **kw)

    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sft(out=str(tmp_path / "b"), on_step=interrupt, **kw)
    assert (tmp_path / "b" / "checkpoint" / "state.pt").exists()
    sft(out=str(tmp_path / "b"), resume=True, **kw)
    a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert len({r["loss"] for r in a}) == 6  # it did train
    with pytest.raises(HerdError, match="--resume continues the same run, but lr was 0.005 and is now 0.001"):
        sft(out=str(tmp_path / "b"), resume=True, **{**kw, "lr": 1e-3})


# -- the command line -------------------------------------------------------------------------

def herd(*argv):
    from llamaherd.cli import main
    return main(list(map(str, argv)))


def test_train_list_and_show(capsys):
    assert herd("train", "--list") == 0
    listed = capsys.readouterr().out
    assert "lora-smollm2" in listed and "qlora-smollm2" in listed and "full-smollm2" in listed
    assert herd("train", "--show", "lora-smollm2") == 0
    import yaml
    from llamaherd.train.config import make_config
    assert make_config(yaml.safe_load(capsys.readouterr().out)).method == "lora"  # every key is valid
    assert herd("train", "--show", "nope") == 1
    assert "unknown recipe 'nope'; known:" in capsys.readouterr().err


def test_config_file_and_command_line_override(tmp_path):
    from llamaherd.cli import build_parser
    from llamaherd.cli.train import config_values
    (tmp_path / "c.yaml").write_text("lr: 0.001\nepochs: 2\nmodel: x\n")
    args = build_parser().parse_args(["train", "sft", "--config", str(tmp_path / "c.yaml"), "--lr", "0.5",
                                      "--no-packing"])
    assert config_values(args) == {"lr": 0.5, "epochs": 2, "model": "x", "packing": False}


@pytest.mark.parametrize("case, message", [
    ("unknown_key", "unknown config key 'lerning_rate'; valid keys: model, data, out, method"),
    ("bad_target", "unknown LoRA target 'attn'; valid: q, k, v, o, gate, down, up"),
    ("bad_method", "unknown method 'dpo'; valid: full, lora, qlora"),
    ("missing_data", "does not exist"),
    ("bad_line", "bad.jsonl:2: not valid JSON"),
    ("no_messages", "bad.jsonl:1: expected a 'messages' list"),
    ("empty", "bad.jsonl holds no examples"),
    ("resume_nothing", "nothing to resume"),
])
def test_bad_inputs_are_one_line_and_exit_1(tiny_dir, facts_file, tmp_path, capsys, case, message):
    bad = tmp_path / "bad.jsonl"
    argv = ["train", "sft", "--model", tiny_dir, "--data", facts_file, "--out", tmp_path / "o", "--max-steps", 1, "--batch-size", 1,
            "--no-progress"]
    if case == "unknown_key":
        (tmp_path / "c.yaml").write_text("lerning_rate: 0.1\n")
        argv += ["--config", tmp_path / "c.yaml"]
    elif case == "bad_target":
        argv += ["--lora-targets", "q,attn"]
    elif case == "bad_method":
        argv += ["--method", "dpo"]
    elif case == "missing_data":
        argv[argv.index("--data") + 1] = tmp_path / "nope.jsonl"
    elif case == "resume_nothing":
        argv += ["--resume"]
    else:
        bad.write_text({"bad_line": '{"prompt": "a", "completion": "b"}\n{oops\n', "no_messages": '{"text": 1}\n',
                        "empty": "\n"}[case])
        argv[argv.index("--data") + 1] = bad
    assert herd(*argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and message in err and "\n" not in err, err


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_two_gloo_processes_equal_one_process(tiny_dir, facts_file, tmp_path):
    """torchrun with 2 processes (FSDP2, gloo, batch 1 each) gives the per-step losses of 1 process with
    batch 2: the same global batches, the same gradients, the same updates."""
    import os
    import subprocess
    import sys
    common = ["sft", "--model", tiny_dir, "--data", facts_file, "--method", "full", "--max-steps", 3,
              "--lr", "5e-3", "--warmup-steps", 1, "--no-packing", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from llamaherd.train.__main__ import main as train_main  # one process: the same entry point, in this one
    assert train_main([*map(str, common), "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "llamaherd.train", *map(str, common), "--batch-size", "1", "--out",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = [json.loads(line)["loss"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3 and a[0] != a[2]
    assert b == pytest.approx(a, rel=1e-5)
    assert (tmp_path / "two" / "checkpoint" / "dcp").is_dir()  # sharded checkpoint
    # the gathered model loads and equals in size the one-process model
    assert (tmp_path / "two" / "model" / "model.safetensors").stat().st_size == \
        (tmp_path / "one" / "model" / "model.safetensors").stat().st_size


# -- QLoRA on the real SmolLM2 GGUF -------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_qlora_adapter_gradients_match_the_dequantized_fp32_path(smollm2_path, smollm2):
    """Adapters over the Q4_1 file's own blocks (native float32 kernel forward, backward through the
    frozen quantized weight) get the gradients they would get over the dequantized fp32 weights."""
    from llamaherd.quantize.linear import BlockLinear, Int4Linear, Int8Linear
    from llamaherd.train.finetune import CausalLMLoss, load_for_training
    q, _ = load_for_training(smollm2_path, "qlora", "cpu")
    f, _ = load_for_training(smollm2_path, "lora", "cpu")
    wq = q.layers[0].attention.wq  # a slice of the fused wqkv (the file's blocks), or wq itself
    assert isinstance(getattr(wq, "fused", wq), (BlockLinear, Int4Linear, Int8Linear))
    for model in (q, f):
        del model.layers[6:]  # the first 6 of 30 blocks: the real blocks at a fifth of the CPU time
        lora_llama3(model, "all", rank=4, alpha=8)
    adapters = {k: torch.randn_like(v) * 0.02 for k, v in q.state_dict().items() if ".lora_" in k}
    for model in (q, f):
        model.load_state_dict(adapters, strict=False)
    examples, _ = tokenize(smollm2, [CHAT], 512)
    batch = collate(pack(examples, 512))
    grads = []
    for model in (q, f):
        CausalLMLoss(model, 8192)(**batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) == {k for k in adapters}
    worst = max(float((grads[0][n] - grads[1][n]).norm() / grads[1][n].norm()) for n in grads[1])
    assert worst <= 1e-4, worst
    # the quantized base kept its blocks: no float weight was added to the blocks
    assert not any(p.requires_grad for n, p in q.named_parameters() if ".lora_" not in n)


@pytest.mark.slow
def test_grad_accumulation_and_activation_checkpointing_keep_the_losses(tiny_dir, facts_file, tmp_path):
    """batch 1 x 2 accumulation steps (with activation checkpointing) = batch 2: every target token of
    the step weighs the same. And a held-out split gives val_loss records."""
    from llamaherd.train import sft
    kw = dict(model=str(tiny_dir), data=str(facts_file), method="full", max_steps=3, lr=5e-3, warmup_steps=1,
              packing=False, progress=False, val_split=0.34, seed=1)
    sft(out=str(tmp_path / "a"), batch_size=2, **kw)
    sft(out=str(tmp_path / "b"), batch_size=1, grad_accum=2, activation_checkpointing=True, **kw)
    a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert a[0]["loss"] != a[-1]["loss"]
    assert all("val_loss" in r for r in a)  # one batch per epoch: validated after every step
    assert [r["val_loss"] for r in b] == pytest.approx([r["val_loss"] for r in a], rel=1e-5)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["val_examples"] == 1 and summary["val_loss_before"] > 5  # the untrained tiny model


def test_korean_demo_set_reads_and_fits(smollm2):
    """The shipped Korean set is valid for the recipe: every line parses, nothing is cut at 512 tokens."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "examples" / "korean-chat"
    for name, n in (("train.jsonl", 179), ("heldout.jsonl", 49)):
        examples, stats = tokenize(smollm2, read_jsonl(root / name), 512)
        assert stats.examples == n and stats.truncated == stats.dropped == 0
        assert all(any(t != IGNORE for t in e.targets) for e in examples)


@pytest.mark.slow
def test_herd_create_and_run_with_a_lora_adapter(tiny_dir, tmp_path, monkeypatch, capsys):
    """`ADAPTER dir` in a Modelfile: herd run merges the PEFT adapter into the base's float weights; an
    adapter of another base is one line and exit 1."""
    from llamaherd.export import load_with_adapters
    from llamaherd.export.hf import save_peft
    from llamaherd.train.lora import adapter_state_dict, parse_targets
    model = build_model(*load_hf(tiny_dir)[:2])
    lora_llama3(model, "q,v,down", rank=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.2)
    save_peft(adapter_state_dict(model), model.args, parse_targets("q,v,down"), 2, 4, 0.0, str(tiny_dir),
              tmp_path / "adapter")
    llm = load_with_adapters(tiny_dir, [tmp_path / "adapter"])
    ids = [1, 2, 3, 400, 5000]
    with torch.no_grad():
        assert (llm.logits(ids) - model(torch.tensor([ids]))[0]).abs().max() <= 1e-4

    monkeypatch.setenv("HERD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HERD_LOCAL", "1")
    (tmp_path / "Modelfile").write_text(f"FROM {tiny_dir}\nADAPTER {tmp_path / 'adapter'}\nPARAMETER temperature 0\n")
    assert herd("create", "tuned", "-f", tmp_path / "Modelfile") == 0
    from llamaherd.cli import main
    assert main(["run", "tuned", "Hi"]) == 0
    capsys.readouterr()
    wrong = tmp_path / "wrong"  # the same vocabulary, other projection shapes
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    config.intermediate_size, config.num_key_value_heads = 96, 4
    transformers.LlamaForCausalLM(config).save_pretrained(wrong)
    save_tokenizer(llm.tokenizer, wrong)
    (tmp_path / "Modelfile2").write_text(f"FROM {wrong}\nADAPTER {tmp_path / 'adapter'}\n")
    assert herd("create", "wrong", "-f", tmp_path / "Modelfile2") == 0
    capsys.readouterr()
    assert main(["run", "wrong", "Hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: the adapter") and "does not fit this base model" in err and "\n" not in err
