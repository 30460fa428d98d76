"""The real SmolLM2-135M as a Q4_K_M file (made from its Q4_1 GGUF's dequantized weights with our
quantizer, cached beside it): the native K-quant path against the file's own float32 reference."""

import math
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import llamaherd
from llamaherd.quantize import native

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not native.available(), reason="needs the native kernels")]

PROMPTS = ["The history of the Roman Empire"]
CHAT_PROMPTS = ["Explain how a bicycle works, step by step."]


def smollm2_q4_k_m(smollm2_path: Path) -> Path:
    """SmolLM2-135M-Instruct as Q4_K_M, made once next to the Q4_1 file (not committed)."""
    from llamaherd.weights.quantized import quantized_gguf

    out = smollm2_path.with_name(smollm2_path.name.replace("Q4_1", "Q4_K_M"))
    if not out.exists():
        part = out.with_suffix(f".partial{id(out)}")
        quantized_gguf(smollm2_path, part, "q4_k", name="SmolLM2-135M-Instruct Q4_K_M")
        part.replace(out)  # atomic: a concurrent maker ends with the same file
    return out


@pytest.fixture(scope="module")
def q4_k_m(smollm2_path):
    path = smollm2_q4_k_m(smollm2_path)
    return path, llamaherd.load(path, device="cpu", quantized=False), llamaherd.load(path, device="cpu")


def test_the_file_is_llama_cpps_q4_k_m_mix_for_this_shape(q4_k_m):
    """SmolLM2's rows of 576 are not whole super-blocks: llama.cpp gives them Q5_0 (Q8_0 where Q6_K
    was meant); its w2 rows (1536) take Q4_K and Q6_K."""
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q4_k_m[0]).tensors}
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(30)} == {Q.Q4_K, Q.Q6_K}
    assert types["blk.1.attn_q.weight"] == Q.Q5_0 and types["blk.0.attn_v.weight"] == Q.Q8_0
    assert types["token_embd.weight"] == Q.Q8_0


def test_it_runs_on_the_native_kernels(q4_k_m):
    from llamaherd.engine.runner import NativeRunner

    _, _, fast = q4_k_m
    assert isinstance(fast.runner, NativeRunner)


def test_accuracy_against_the_files_own_float32_reference(q4_k_m):
    """Teacher-forced top-1 agreement >= 99%, perplexity within 1%, on held-out text."""
    _, ref, fast = q4_k_m
    text = (Path(__file__).parent / "data" / "heldout.txt").read_text()
    ids = ref.encode(text)
    want, got = ref.logits(ids), fast.logits(ids)
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    target = torch.tensor(ids[1:])

    def ppl(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1], target).item())

    assert agree >= 0.99, agree
    assert abs(ppl(got) / ppl(want) - 1) <= 0.01, (ppl(got), ppl(want))


@pytest.mark.parametrize("prompt", PROMPTS + CHAT_PROMPTS)
def test_greedy_equals_the_reference(q4_k_m, prompt):
    _, ref, fast = q4_k_m
    ids = fast.encode(prompt) if prompt in PROMPTS else fast.encode_chat([{"role": "user", "content": prompt}])
    opts = dict(temperature=0, repeat_penalty=1.0, num_predict=32)

    got = [t for c in fast.stream(ids, fast.options(**opts)) for t in c.tokens]
    # The reference's greedy pick after every prefix of that reply, in one teacher-forced forward: the
    # same check as generating with the reference, without its 32 sequential float32 steps.
    picks = ref.logits(ids + got)[len(ids) - 1:].argmax(-1).tolist()
    assert picks[:len(got)] == got
    assert len(got) == opts["num_predict"] or picks[len(got)] in ref.tokenizer.stop_ids


def test_a_prompt_gets_the_numbers_decoding_gives_it(q4_k_m, prompt_is_decoding):
    """Every projection of the Q4_K_M file (Q5_0, Q8_0, Q4_K, Q6_K and mixes of them, repacked at load)
    takes an int16 panel for a prompt's many rows (kernels/kquant.c's, blockmm.c's for a plain Q8_0)
    and sums each row as decoding does: a prompt prefilled whole and its tokens decoded one at a
    time give the same keys and logits, to the bit (test_native_decode: the same for Q4_1)."""
    from llamaherd.quantize.linear import BlockLinear

    path, _, fast = q4_k_m
    model = llamaherd.load(path, device="cpu").model  # its own cache, written behind no Llama's back
    kinds = {m.kernel_type for m in model.layers.modules() if isinstance(m, BlockLinear)}
    assert kinds and all(native.kq_has_panel(k) or native.has_panel(k) for k in kinds)
    assert any(native.kq_has_panel(k) for k in kinds)
    ids = fast.encode(PROMPTS[0] + ", from its founding to its fall, in a few words")
    assert len(ids) >= 9  # the panel's rows
    prompt_is_decoding(model, ids)
