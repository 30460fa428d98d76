"""Whole-model parity with HF transformers' LlamaForCausalLM (the oracle) on tiny random configs,
with weights going through our own HF and Meta loaders."""

import json

import pytest
import torch

from llamaherd.config import ModelArgs, RopeScaling
from llamaherd.errors import FormatError
from llamaherd.model import rope_frequencies
from llamaherd.weights import build_model, check_state_dict
from llamaherd.weights.hf import load_hf
from llamaherd.weights.keymaps import FROM_HF, map_key, permute_hf_to_meta, permute_meta_to_hf
from llamaherd.weights.meta import load_meta

transformers = pytest.importorskip("transformers")

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}

CONFIGS = {
    "gqa-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-untied": dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
    "mha-llama31-rope": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                             rope_scaling=LLAMA31_ROPE),
    "gqa-llama31-rope-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_scaling=LLAMA31_ROPE),
}


def hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
               max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=False)
    cfg.update(overrides)
    config = transformers.LlamaConfig(**cfg)
    model = transformers.LlamaForCausalLM(config).eval()
    # Random, not-small weights everywhere (the default init leaves norms at 1).
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 0.08).add_(1.0 if p.ndim == 1 else 0.0)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf_through_hf_loader(tmp_path, name):
    ref = hf_model(**CONFIGS[name])
    ref.save_pretrained(tmp_path)
    args, sd, _ = load_hf(tmp_path)
    assert args.tie_embeddings == CONFIGS[name]["tie_word_embeddings"]
    assert (args.rope_scaling is not None) == ("rope_scaling" in CONFIGS[name])
    model = build_model(args, sd)
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1)).tolist()
    ours = model(torch.tensor(tokens)).detach()
    assert (ours - hf_logits(ref, tokens)).abs().max() <= 1e-4


def test_kv_cache_decoding_matches_full_forward(tmp_path):
    ref = hf_model(**CONFIGS["gqa-llama31-rope-tied"])
    ref.save_pretrained(tmp_path)
    model = build_model(*load_hf(tmp_path)[:2])
    tokens = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    full = hf_logits(ref, tokens.tolist())[0]
    model.setup_cache(max_batch=1, max_seq_len=64)
    with torch.no_grad():
        got = [model(tokens[:, :10], torch.arange(10)[None])[0]]
        for i in range(10, 30):
            got.append(model(tokens[:, i:i + 1], torch.tensor([[i]]))[0])
    assert (torch.cat(got) - full).abs().max() <= 1e-4


def test_batched_rows_at_different_positions(tmp_path):
    """Two sequences decoded together, each at its own position, equal each decoded alone."""
    ref = hf_model(**CONFIGS["gqa-tied"])
    ref.save_pretrained(tmp_path)
    model = build_model(*load_hf(tmp_path)[:2])
    a = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(4))
    model.setup_cache(max_batch=4, max_seq_len=32)
    with torch.no_grad():
        model(a[:, :-1], torch.arange(11)[None], rows=torch.tensor([2]))
        model(b[:, :-1], torch.arange(6)[None], rows=torch.tensor([0]))
        both = model(torch.cat([a[:, -1:], b[:, -1:]]), torch.tensor([[11], [6]]), rows=torch.tensor([2, 0]))
    assert (both[0, -1] - hf_logits(ref, a.tolist())[0, -1]).abs().max() <= 1e-4
    assert (both[1, -1] - hf_logits(ref, b.tolist())[0, -1]).abs().max() <= 1e-4


def test_packed_documents_do_not_attend_to_each_other(tmp_path):
    ref = hf_model(**CONFIGS["gqa-untied"])
    ref.save_pretrained(tmp_path)
    model = build_model(*load_hf(tmp_path)[:2])
    a = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(5))
    b = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(6))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 9 + [1] * 6])
    pos = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        out = model(packed, pos, doc_ids=doc_ids)
    assert (out[0, :9] - hf_logits(ref, a.tolist())[0]).abs().max() <= 1e-4
    assert (out[0, 9:] - hf_logits(ref, b.tolist())[0]).abs().max() <= 1e-4


def test_loss_matches_hf(tmp_path):
    ref = hf_model(**CONFIGS["gqa-tied"])
    ref.save_pretrained(tmp_path)
    model = build_model(*load_hf(tmp_path)[:2])
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(7))
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    with torch.no_grad():
        ours = model(tokens, targets=targets)
        theirs = ref(tokens, labels=tokens).loss  # HF shifts the labels itself
    assert abs(float(ours) - float(theirs)) <= 1e-5


def meta_checkpoint(ref, directory, n_shards=1, multiple_of=32):
    """Write `ref` (a HF model) as Meta's params.json + consolidated.NN.pth, split like fairscale."""
    cfg = ref.config
    sd = {}
    for name, tensor in ref.state_dict().items():
        key = map_key(name, FROM_HF)
        if key is not None:
            sd[key] = tensor.clone()
    for k in list(sd):  # HF -> Meta rotary layout, the real direction of HF's own converter inverted
        if k.endswith("wq.weight"):
            sd[k] = permute_hf_to_meta(sd[k], cfg.num_attention_heads)
        elif k.endswith("wk.weight"):
            sd[k] = permute_hf_to_meta(sd[k], cfg.num_key_value_heads)
    sd.setdefault("output.weight", sd["tok_embeddings.weight"].clone())
    params = dict(dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                  n_kv_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size, multiple_of=multiple_of,
                  norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_parameters["rope_theta"]
                  if getattr(cfg, "rope_parameters", None) else cfg.rope_theta)
    directory.mkdir(exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    from llamaherd.weights.meta import _shard_dim
    for i in range(n_shards):
        shard = {}
        for k, t in sd.items():
            dim = _shard_dim(k)
            shard[k] = t if dim is None or t.ndim < 2 else t.chunk(n_shards, dim=dim)[i].clone()
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")


@pytest.mark.parametrize("n_shards", [1, 2])
def test_logits_match_hf_through_meta_loader(tmp_path, n_shards):
    ref = hf_model(**CONFIGS["gqa-untied"])
    meta_checkpoint(ref, tmp_path / "meta", n_shards)
    args, sd, _ = load_meta(tmp_path / "meta")
    assert args.hidden_dim == 192  # Meta's multiple_of rule reproduces intermediate_size
    model = build_model(args, sd)
    tokens = torch.randint(0, 300, (1, 33), generator=torch.Generator().manual_seed(8)).tolist()
    assert (model(torch.tensor(tokens)).detach() - hf_logits(ref, tokens)).abs().max() <= 1e-4


def test_rope_frequencies_match_hf_llama3_scaling():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                      max_position_embeddings=131072,
                                      rope_scaling={**LLAMA31_ROPE, "original_max_position_embeddings": 8192})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_frequencies(128, 500000.0, RopeScaling())
    assert torch.allclose(ours, inv_freq.float(), rtol=1e-6, atol=0)


def test_permutations_are_inverse():
    w = torch.randn(8 * 6, 10)
    assert torch.equal(permute_hf_to_meta(permute_meta_to_hf(w, 8), 8), w)


def test_presets_and_config_constructors():
    assert ModelArgs.from_name("llama3.1-8b").rope_scaling.factor == 8.0
    assert ModelArgs.from_name("llama3.2-1b").tie_embeddings
    smol = ModelArgs.from_name("smollm2-135m")
    assert (smol.n_heads, smol.n_kv_heads, smol.head_dim) == (9, 3, 64)
    # Meta's params.json for Llama 3 8B gives hidden_dim 14336.
    meta8b = ModelArgs.from_params(dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                        multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                                        rope_theta=500000.0, use_scaled_rope=True))
    assert meta8b.hidden_dim == 14336 and meta8b.rope_scaling == RopeScaling()
    assert 8.0e9 < ModelArgs.from_name("llama3-8b").n_params < 8.1e9
    with pytest.raises(FormatError, match="unknown model preset"):
        ModelArgs.from_name("gpt-5")
    with pytest.raises(FormatError, match="multiple of"):
        ModelArgs(n_heads=9, n_kv_heads=2)


def test_wrong_shape_and_unknown_tensors_are_named(tmp_path):
    ref = hf_model(**CONFIGS["gqa-tied"])
    ref.save_pretrained(tmp_path)
    args, sd, _ = load_hf(tmp_path)
    bad = dict(sd)
    bad["layers.1.attention.wk.weight"] = bad["layers.1.attention.wk.weight"][:-1]
    with pytest.raises(FormatError, match=r"layers\.1\.attention\.wk\.weight.*shape"):
        check_state_dict(bad, args)
    missing = {k: v for k, v in sd.items() if k != "layers.2.ffn_norm.weight"}
    with pytest.raises(FormatError, match=r"missing tensor 'layers\.2\.ffn_norm\.weight'"):
        check_state_dict(missing, args)
    with pytest.raises(FormatError, match="unexpected tensor 'model.layers.0.mystery'"):
        map_key("model.layers.0.mystery", FROM_HF)
