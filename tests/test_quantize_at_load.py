"""Quantize at load: a float (Hugging Face) checkpoint into GGUF blocks for the native kernels,
`llamaherd.load(dir, quantize=...)`, `herd run DIR --quantize`, `herd create -q`."""

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import llamaherd
from llamaherd.errors import HerdError
from llamaherd.quantize import native
from test_kquant import tiny_args, write_tiny_gguf

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the native kernels (a C compiler, AVX2)")
DIM = 256  # rows of whole K-quant super-blocks


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama as a Hugging Face directory (safetensors, config, tokenizer), written by our
    exporter from the float weights of a tiny f32 GGUF."""
    from llamaherd.export.hf import save_hf
    from llamaherd.weights import load_checkpoint

    tmp = tmp_path_factory.mktemp("qload")
    ckpt = load_checkpoint(write_tiny_gguf(tmp / "tiny-f32.gguf", DIM, quant="f32"))
    return save_hf(ckpt.state_dict, ckpt.args, ckpt.tokenizer, tmp / "hf")


def logits(llm, tokens):
    llm.model.setup_cache(1, 64)
    with torch.no_grad():
        return llm.model(torch.tensor([tokens]), torch.arange(len(tokens))[None])[0]


TOKENS = list(range(40, 80))


def test_q4_k_at_load_is_the_q4_k_m_file_of_the_same_weights(hf_dir, tmp_path):
    """Quantizing at load gives the blocks a Q4_K_M GGUF of the same weights holds: the same numbers."""
    from llamaherd.engine.runner import NativeRunner, make_runner
    from llamaherd.weights import load_checkpoint

    at_load = llamaherd.load(hf_dir, device="cpu", quantize="q4_k")
    assert isinstance(make_runner(at_load.model), NativeRunner)
    kinds = {type(layer.attention.wqkv).__name__ for layer in at_load.model.layers}
    assert kinds == {"BlockLinear"}
    ckpt = load_checkpoint(hf_dir)
    path = write_tiny_gguf(tmp_path / "q4_k_m.gguf", DIM)  # the same random weights, through save_gguf
    assert torch.equal(load_checkpoint(path).state_dict["layers.0.attention_norm.weight"],
                       ckpt.state_dict["layers.0.attention_norm.weight"])
    from_file = llamaherd.load(path, device="cpu")
    assert torch.equal(logits(at_load, TOKENS), logits(from_file, TOKENS))


def test_q8_0_at_load_follows_the_float_model(hf_dir):
    ref, q8 = llamaherd.load(hf_dir, device="cpu"), llamaherd.load(hf_dir, device="cpu", quantize="q8_0")
    want, got = logits(ref, TOKENS), logits(q8, TOKENS)
    err = (got - want).abs().max()
    assert err < 0.05 * want.abs().max()  # 8-bit weights through 4 random layers: a few % of the range
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err  # positions whose best token is clearly ahead
    assert clear.sum() >= 10 and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_a_bad_quantization_is_one_clear_error(hf_dir):
    with pytest.raises(HerdError, match=r"unknown quantization 'q3_k': use one of q8_0, q4_0, q4_k"):
        llamaherd.load(hf_dir, device="cpu", quantize="q3_k")


def herd(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (a subprocess would spend most of its time importing torch)."""
    from llamaherd.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_herd_run_and_create_quantize(hf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    monkeypatch.setenv("HERD_HOST", "127.0.0.1:9")  # no server: nothing answers there
    code, _, err = herd(capsys, "run", hf_dir, "ab", "--quantize", "q9")
    assert code == 1 and err.strip().splitlines() == ["Error: unknown quantization 'q9': use one of q8_0, q4_0, q4_k"]
    code, said, err = herd(capsys, "run", hf_dir, "ab", "--raw", "--quantize", "q4_k", "--num-predict", "4",
                           "--temperature", "0")
    assert code == 0 and said.strip(), err
    (tmp_path / "Modelfile").write_text(f"FROM {hf_dir}\nPARAMETER temperature 0\n")
    code, _, err = herd(capsys, "create", "tinyq", "-f", tmp_path / "Modelfile", "-q", "Q4_K_M")
    assert code == 0, err
    from llamaherd.store import Store

    stored = Store(tmp_path).resolve("tinyq")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(stored.path).tensors}
    assert types["blk.0.attn_q.weight"] == Q.Q4_K and types["blk.3.attn_v.weight"] == Q.Q6_K
    code, again, err = herd(capsys, "run", "tinyq", "ab", "--raw", "--num-predict", "4", "--local")
    assert code == 0, err
    assert again == said  # the stored Q4_K_M file is what --quantize q4_k makes at load


def test_api_create_quantize(hf_dir, tmp_path, monkeypatch):
    """/api/create's `quantize`, as Ollama's: the new model's weights stored as that quantization;
    an unknown type is a 400 before anything starts."""
    from fastapi.testclient import TestClient

    from llamaherd.server.app import Settings, create_app
    from llamaherd.store import Store
    from test_server_api import FakeEngine

    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    store = Store()
    (tmp_path / "Modelfile").write_text(f"FROM {hf_dir}\n")
    store.create("tinyf", (tmp_path / "Modelfile").read_text(), base_dir=tmp_path)
    app = create_app(Settings(), engine=FakeEngine(), store=store)
    with TestClient(app, base_url="http://localhost:11434", client=("127.0.0.1", 50000)) as c:
        bad = c.post("/api/create", json={"model": "tq", "from": "tinyf", "quantize": "q2_K", "stream": False})
        assert bad.status_code == 400 and "unknown quantization 'q2_K'" in bad.json()["error"]
        r = c.post("/api/create", json={"model": "tq", "from": "tinyf", "quantize": "q4_K_M", "stream": False})
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(store.resolve("tq").path).tensors}
    assert types["blk.1.attn_q.weight"] == Q.Q4_K and types["blk.2.ffn_down.weight"] == Q.Q6_K
