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
    from llamaherd.tokenizer.chat import format_prompt
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
