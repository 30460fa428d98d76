"""LoRA adapters outside training: `herd export --format gguf-lora` (llama.cpp's adapter GGUF), a GGUF
LoRA file as a Modelfile ADAPTER, and ADAPTER applied by `herd serve` (the real engine over the store).

Oracles: the `gguf` package reads the file back, llama.cpp's own q/k permutation (convert_hf_to_gguf.py's
`LlamaModel.permute`) maps the PEFT tensors, and `peft` merges the adapter into transformers' model."""

import json

import numpy as np
import pytest
import torch

from lora_run import lora_training_output

transformers = pytest.importorskip("transformers")
TARGETS = "q,k,v,o,down"
RANK, ALPHA = 4, 8.0


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half rows -> GGUF's interleaved rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smollm2):
    """A LoRA "training output" over a tiny random Llama (HF directory with SmolLM2's tokenizer):
    train.json naming the base, and adapter/ (PEFT) with non-zero B so the update shows."""
    return lora_training_output(tmp_path_factory.mktemp("lora"), smollm2, TARGETS, RANK, ALPHA)


@pytest.fixture(scope="module")
def gguf_lora(run_dir, tmp_path_factory):
    from llamaherd.cli import main

    out = tmp_path_factory.mktemp("gguf") / "adapter.gguf"
    assert main(["export", str(run_dir), "--format", "gguf-lora", "-o", str(out)]) == 0
    return out


def test_gguf_lora_file_is_llama_cpps_format(run_dir, gguf_lora):
    import gguf
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(gguf_lora)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == ALPHA
    config = json.loads((run_dir.parent / "base" / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    peft = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "down_proj": "ffn_down", "gate_proj": "ffn_gate", "up_proj": "ffn_up"}
    expected = {}
    for key, w in peft.items():  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
        parts = key.split(".")
        layer, proj, ab = parts[4], parts[6], parts[7]
        if ab == "lora_B" and proj == "q_proj":
            w = llama_cpp_permute(w, n_head, n_head)
        elif ab == "lora_B" and proj == "k_proj":
            w = llama_cpp_permute(w, n_head, n_kv)
        expected[f"blk.{layer}.{names[proj]}.weight.lora_{ab[-1].lower()}"] = w
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected) and len(got) == 2 * 2 * len(TARGETS.split(","))
    for name, w in expected.items():
        t = got[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert tuple(int(d) for d in reversed(t.shape)) == w.shape  # GGUF lists dims fastest first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w)
    assert got["blk.0.attn_q.weight.lora_a"].shape.tolist() == [64, RANK]  # ne: (in, rank)


def test_gguf_lora_adapter_merges_as_peft_does(run_dir, gguf_lora):
    """The GGUF adapter through `load_with_adapters` (Modelfile ADAPTER) = peft's merge on
    transformers' model = the PEFT directory through the same path."""
    from peft import PeftModel

    from llamaherd.export import load_with_adapters

    base = run_dir.parent / "base"
    ids = [1, 17, 300, 4000, 25]
    hf = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = hf(torch.tensor([ids])).logits[0]
        ref = PeftModel.from_pretrained(hf, run_dir / "adapter").merge_and_unload()(torch.tensor([ids])).logits[0]
    from_gguf = load_with_adapters(base, [gguf_lora]).logits(ids)
    from_peft = load_with_adapters(base, [run_dir / "adapter"]).logits(ids)
    assert (ref - plain).abs().max() > 1e-2  # the adapter changes the model
    assert (from_gguf - ref).abs().max() <= 1e-4 and (from_peft - ref).abs().max() <= 1e-4


def test_gguf_lora_bad_input(run_dir, tmp_path, capsys):
    import gguf

    from llamaherd.cli import main
    from llamaherd.errors import HerdError
    from llamaherd.export import load_with_adapters

    assert main(["export", str(run_dir), "--format", "gguf-lora", "--quant", "q4_0", "-o", str(tmp_path / "x")]) == 1
    assert "f32 or f16" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "gguf-lora", "-o", str(tmp_path / "x.gguf")]) == 1
    assert "neither a LoRA training output nor a PEFT" in capsys.readouterr().err
    model_gguf = tmp_path / "model.gguf"  # a GGUF that is a model, not an adapter
    w = gguf.GGUFWriter(str(model_gguf), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HerdError, match="not a GGUF LoRA adapter"):
        load_with_adapters(run_dir.parent / "base", [model_gguf])


@pytest.mark.slow
def test_herd_serve_applies_adapters(run_dir, gguf_lora, tmp_path):
    """`ADAPTER` (a PEFT directory, or the GGUF LoRA file) in a Modelfile, served by the real engine
    over the store: greedy replies equal transformers + peft's, and differ from the base's."""
    from fastapi.testclient import TestClient
    from peft import PeftModel

    from llamaherd.server.app import Settings, create_app
    from llamaherd.store import Store

    base = run_dir.parent / "base"
    store = Store(tmp_path / "home")
    store.create("plain", f"FROM {base}\n", base_dir=tmp_path)
    store.create("tuned", f"FROM {base}\nADAPTER {run_dir / 'adapter'}\n", base_dir=tmp_path)
    store.create("tuned-gguf", f"FROM {base}\nADAPTER {gguf_lora}\n", base_dir=tmp_path)
    store.create("from-run", f"FROM {run_dir}\n", base_dir=tmp_path)  # a LoRA training output: base + adapter
    full_run = tmp_path / "full-run"  # a full fine-tune's output: its model/
    full_run.mkdir()
    (full_run / "train.json").write_text(json.dumps({"model_path": str(base), "method": "full"}))
    (full_run / "model").symlink_to(base, target_is_directory=True)
    store.create("from-full-run", f"FROM {full_run}\n", base_dir=tmp_path)
    app = create_app(Settings(home=tmp_path / "home", num_parallel=2), store=store)
    replies = {}
    with TestClient(app, base_url="http://localhost:11434") as client:
        for name in ("plain", "tuned", "tuned-gguf", "from-run", "from-full-run"):
            r = client.post("/api/generate", json={"model": name, "prompt": "The cat", "raw": True, "stream": False,
                                                   "options": {"temperature": 0, "num_predict": 6,
                                                               "repeat_penalty": 1.0}})  # plain greedy
            assert r.status_code == 200, r.text
            replies[name] = r.json()
    hf = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    hf = PeftModel.from_pretrained(hf, run_dir / "adapter").merge_and_unload()
    n_prompt = replies["tuned"]["prompt_eval_count"]
    for name in ("tuned", "tuned-gguf"):  # each reply token is transformers+peft's greedy choice (ties aside)
        context = replies[name]["context"]
        assert len(context) == n_prompt + replies[name]["eval_count"] > n_prompt
        with torch.no_grad():
            logits = hf(torch.tensor([context])).logits[0, n_prompt - 1:-1]
        chosen = logits.gather(1, torch.tensor(context[n_prompt:])[:, None])[:, 0]
        assert (logits.max(-1).values - chosen).max() <= 1e-3, name
    assert replies["tuned-gguf"]["context"] == replies["tuned"]["context"] == replies["from-run"]["context"]
    assert replies["from-full-run"]["context"] == replies["plain"]["context"]
    assert replies["plain"]["context"] != replies["tuned"]["context"]


def test_from_a_broken_training_output_is_one_line(tmp_path):
    from llamaherd.errors import HerdError
    from llamaherd.store import Store

    run = tmp_path / "run"
    run.mkdir()
    (run / "train.json").write_text('{"method": "lora"}')
    with pytest.raises(HerdError, match="neither model/ nor adapter/"):
        Store(tmp_path / "home").create("x", f"FROM {run}\n", base_dir=tmp_path)
    (run / "adapter").mkdir()
    (run / "train.json").write_text(json.dumps({"model_path": str(tmp_path / "gone")}))
    with pytest.raises(HerdError, match="is not on this disk"):
        Store(tmp_path / "home").create("x", f"FROM {run}\n", base_dir=tmp_path)
