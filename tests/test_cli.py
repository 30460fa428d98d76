"""`herd run` as a user runs it: a real process, real model, and every bad input as one clear line."""

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time

import pytest
import torch

from llamaherd.cli import build_parser


def herd(*args, input=None, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "llamaherd", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=timeout, env={**os.environ, **(env or {})})


def assert_clean_error(proc, *fragments):
    """Exit non-zero with exactly one line on stderr naming the problem, and no traceback."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_help_lists_run_and_its_options():
    text = build_parser().format_help()
    assert "run" in text
    proc = herd("run", "--help")
    assert proc.returncode == 0
    for option in ("--raw", "--system", "--temperature", "--top-k", "--top-p", "--seed", "--num-predict",
                   "--num-ctx", "--verbose"):
        assert option in proc.stdout


def test_run_answers_paris(smollm2_path):
    proc = herd("run", smollm2_path, "What is the capital of France?", "--temperature", "0", "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert proc.stdout.strip().count("\n") <= 3  # only the reply on stdout
    for stat in ("load duration:", "prompt eval count:", "prompt eval rate:", "eval count:", "eval rate:"):
        assert stat in proc.stderr


def test_run_raw_seed_and_num_predict(smollm2_path):
    args = ("run", smollm2_path, "Once upon a time", "--raw", "--seed", "7", "--temperature", "0.9",
            "--num-predict", "12")
    first, second = herd(*args), herd(*args)
    assert first.returncode == 0 and first.stdout == second.stdout and first.stdout.strip()


def _read_until(fd, needle: bytes, timeout=240) -> bytes:
    out, end = b"", time.time() + timeout
    while needle not in out:
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {needle!r}; got {out[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return out


def test_interactive_chat_in_a_terminal(smollm2_path):
    """Like `ollama run`: history, /set parameter, \"\"\" multi-line input, /clear, /bye."""
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "run", str(smollm2_path)],
                            stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    try:
        _read_until(main, b">>> ")
        os.write(main, b"/set parameter temperature 0\n")
        assert b"Set parameter 'temperature'" in _read_until(main, b">>> ")
        os.write(main, b"/set parameter num_predict 24\n")
        _read_until(main, b">>> ")
        os.write(main, b'"""What is the capital\nof France?"""\n')
        assert b"Paris" in _read_until(main, b">>> ")
        os.write(main, b"/set parameter bogus x\n")
        assert b"Error" in _read_until(main, b">>> ")
        os.write(main, b"/clear\n")
        assert b"Cleared" in _read_until(main, b">>> ")
        os.write(main, b"/bye\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main)


# -- bad input: one clear line on stderr, non-zero exit, never a traceback --------------------------

def test_missing_path():
    assert_clean_error(herd("run", "/nonexistent/model.gguf", "hi"), "not found")


def test_truncated_gguf(smollm2_path, tmp_path):
    bad = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    assert_clean_error(herd("run", bad, "hi"), "truncated.gguf")


def test_corrupt_gguf_header(tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    assert_clean_error(herd("run", bad, "hi"), "not a valid GGUF file")


def test_not_a_model_file(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert_clean_error(herd("run", bad, "hi"), "not a GGUF file")


def _tiny_gguf(path, arch="llama", tensor_type=None):
    """A tiny GGUF written with the `gguf` package: a 1-layer llama with a byte-level tokenizer."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    tokens = [bytes([b]).decode("latin-1") for b in range(255)] + ["ab"]
    w.add_token_list(tokens)
    w.add_token_types([1] * 256)
    w.add_token_merges(["a b"])
    rng = np.random.default_rng(0)

    def t(name, *shape):
        data = rng.standard_normal(shape, dtype=np.float32)
        if tensor_type is not None and len(shape) == 2:  # raw blocks of a type we cannot read
            block, size = gguf.GGML_QUANT_SIZES[tensor_type]
            w.add_tensor(name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=tensor_type)
        else:
            w.add_tensor(name, data)

    t("token_embd.weight", 256, 64)
    t("output_norm.weight", 64)
    for n, shape in (("attn_norm", (64,)), ("ffn_norm", (64,)), ("attn_q", (64, 64)), ("attn_k", (32, 64)),
                     ("attn_v", (32, 64)), ("attn_output", (64, 64)), ("ffn_gate", (128, 64)),
                     ("ffn_up", (128, 64)), ("ffn_down", (64, 128))):
        t(f"blk.0.{n}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_runs(tmp_path):
    """The writer above is valid: the same file with a supported architecture runs."""
    proc = herd("run", _tiny_gguf(tmp_path / "tiny.gguf"), "ab", "--raw", "--num-predict", "3", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr


def test_unsupported_architecture(tmp_path):
    assert_clean_error(herd("run", _tiny_gguf(tmp_path / "gemma.gguf", arch="gemma"), "hi"),
                       "unsupported architecture 'gemma'")


def test_unsupported_tensor_type(tmp_path):
    import gguf
    path = _tiny_gguf(tmp_path / "iq.gguf", tensor_type=gguf.GGMLQuantizationType.IQ4_NL)
    assert_clean_error(herd("run", path, "hi"), "unsupported GGUF tensor type IQ4_NL")


def _tiny_hf(directory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_hf_directory_without_tokenizer(tmp_path):
    assert_clean_error(herd("run", _tiny_hf(tmp_path / "hf"), "hi"), "no tokenizer found")


def test_truncated_safetensors(tmp_path):
    directory = _tiny_hf(tmp_path / "hf")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert_clean_error(herd("run", directory, "hi"), "model.safetensors", "not a valid safetensors file")


def test_meta_checkpoint_with_pickled_code_is_refused(tmp_path):
    """A .pth that would run code when unpickled is refused by weights_only loading."""
    directory = tmp_path / "meta"
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps(dict(dim=64, n_layers=1, n_heads=4, vocab_size=256)))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"tok_embeddings.weight": Evil()}, directory / "consolidated.00.pth")
    shutil.copy(__file__, directory / "tokenizer.model")  # any file: loading stops before the tokenizer
    assert_clean_error(herd("run", directory, "hi"), "consolidated.00.pth")
    assert not marker.exists()


def test_meta_directory_without_weights(tmp_path):
    directory = tmp_path / "meta"
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps(dict(dim=64, n_layers=1, n_heads=4, vocab_size=256)))
    assert_clean_error(herd("run", directory, "hi"), "no consolidated.*.pth")


def test_bad_option_value(smollm2_path):
    assert_clean_error(herd("run", smollm2_path, "hi", "--num-ctx", "999999"), "num_ctx")
