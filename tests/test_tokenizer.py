"""Tokenizer parity: Llama 3 against quicktok's independent encoder, GGUF BPE against transformers
and tiktoken, and incremental detokenization against whole-sequence decode."""

import base64
import json
import struct

import pytest
import tiktoken

from llamaherd.errors import FormatError, HerdError
from llamaherd.tokenizer import Tokenizer, load_tokenizer
from llamaherd.tokenizer.bpe import byte_decoder, gguf_metadata, tokenizer_from_gguf, tokenizer_from_hf
from llamaherd.tokenizer.llama3 import PAT_STR, Llama3Tokenizer, load_quicktok_ranks
from llamaherd.tokenizer.stream import StreamDecoder

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 12:30, isn't it? I'm sure they'll've...",
    "안녕하세요, 세계! 한국어 토큰화 테스트입니다.",
    "日本語のテキスト：東京は晴れです。カタカナとひらがな。",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "مرحبا بالعالم، هذا اختبار.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\r\n",
    "Emoji: 😀👍🏽🇰🇷👨‍👩‍👧‍👦 and ☕️",
    "digits 12345 3.14159 1,000,000 0x1F 2024-01-01",
    "whitespace  runs   of\t\ttabs\n\n\nnewlines   \n  trailing   ",
    "            leading spaces",
    " " * 300 + "x" + "\n" * 50,
    "<|im_start|>user\nhi<|im_end|> <|eot_id|>",
    "",
]


# --- Llama 3 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer("llama3")


@pytest.fixture(scope="module")
def reference():
    # quicktok's own C++ BPE over the same ranks: an implementation independent of tiktoken.
    import quicktok
    return quicktok.get_encoding("llama3")


def test_llama3_basics(llama3):
    assert isinstance(llama3, Tokenizer)
    assert llama3.encode("Hello world") == [9906, 1917]
    assert llama3.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert llama3.n_words == 128256
    assert (llama3.bos_id, llama3.eos_id, llama3.add_bos) == (128000, 128001, True)
    assert llama3.stop_ids == {128001, 128008, 128009}
    assert llama3.chat_template is None


def test_llama3_special_token_names(llama3):
    names = {i: s for s, i in llama3.special_tokens.items()}
    assert len(names) == 256 and min(names) == 128000 and max(names) == 128255
    assert [names[128000 + i] for i in range(12)] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
        "<|python_tag|>", "<|reserved_special_token_2|>"]
    assert names[128255] == "<|reserved_special_token_246|>"


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_matches_reference(llama3, reference, text):
    ids = llama3.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert llama3.decode(ids) == text
    assert b"".join(llama3.token_bytes(i) for i in ids) == text.encode()


def test_llama3_special_text(llama3, reference):
    text = "a<|eot_id|>b<|begin_of_text|>"
    plain = llama3.encode(text)
    assert 128009 not in plain and 128000 not in plain
    assert plain == reference.encode_ordinary(text)
    assert llama3.decode(plain) == text
    assert llama3.encode(text, allow_special=True) == [64, 128009, 65, 128000]
    assert llama3.encode("<|eot_id|>", allow_special=True) == [128009]
    assert llama3.token_bytes(128009) == b"<|eot_id|>"
    with pytest.raises(HerdError, match="outside the vocabulary"):
        llama3.token_bytes(128256)


def test_llama3_long_runs(llama3, reference):
    # Runs over 25k chars are cut before tiktoken sees them (tiktoken#195): same as encoding the
    # pieces one by one.
    for run in ("a" * 30_000, " " * 30_000, "\n" * 26_000):
        text = run + "y"
        pieces = [text[:25_000], text[25_000:]]
        ids = llama3.encode(text)
        assert ids == [i for p in pieces for i in reference.encode_ordinary(p)]
        assert llama3.decode(ids) == text
    # Short runs go through whole.
    text = "a" + " " * 5000 + "b"
    assert llama3.encode(text) == reference.encode_ordinary(text)


def test_meta_tokenizer_model(tmp_path, llama3, llama3_vocab_path):
    ranks = load_quicktok_ranks(llama3_vocab_path)
    assert len(ranks) == 128_000
    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r
                               for t, r in sorted(ranks.items(), key=lambda kv: kv[1])))
    for spec in (model, tmp_path):  # the file, or a checkpoint folder holding it
        tok = load_tokenizer(spec)
        assert isinstance(tok, Llama3Tokenizer)
        assert tok.n_words == llama3.n_words and tok.special_tokens == llama3.special_tokens
        for text in TEXTS:
            assert tok.encode(text, allow_special=True) == llama3.encode(text, allow_special=True)


def test_load_errors(tmp_path, llama3_vocab_path):
    with pytest.raises(HerdError, match="no tokenizer found at"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(HerdError, match="no tokenizer found at"):
        load_tokenizer(tmp_path)  # an empty folder
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x08\x01\x12\x05hello \xff\xfe not base64\n")  # e.g. a SentencePiece proto
    with pytest.raises(FormatError, match="not a tiktoken BPE file"):
        load_tokenizer(garbage)
    garbage.write_bytes(base64.b64encode(b"a") + b" 0\n" + base64.b64encode(b"b") + b" 5\n")
    with pytest.raises(FormatError, match="dense range"):
        load_tokenizer(garbage)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"model": "nope"}')
    with pytest.raises(FormatError, match="not a valid tokenizer.json"):
        load_tokenizer(bad_json)
    truncated = tmp_path / "llama3.vocab"
    truncated.write_bytes(llama3_vocab_path.read_bytes()[:1000])
    with pytest.raises(FormatError, match="truncated"):
        load_quicktok_ranks(truncated)
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(FormatError):
        load_tokenizer(fake_gguf)


# --- GGUF: the real SmolLM2 file -----------------------------------------------------------------

def test_smollm2_metadata(smollm2):
    assert isinstance(smollm2, Tokenizer)
    assert smollm2.n_words == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.add_bos) == (1, 2, False)
    assert smollm2.special_tokens["<|im_start|>"] == 1 and smollm2.special_tokens["<|im_end|>"] == 2
    assert smollm2.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert smollm2.chat_template.startswith("{% for message in messages %}")


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_matches_transformers(smollm2, hf_smollm2, text):
    special = smollm2.encode(text, allow_special=True)
    assert special == hf_smollm2.encode(text, add_special_tokens=False)
    plain = smollm2.encode(text)
    assert plain == hf_smollm2.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert smollm2.decode(special) == hf_smollm2.decode(special) == text
    assert b"".join(smollm2.token_bytes(i) for i in plain) == text.encode()


def test_smollm2_special_text(smollm2):
    assert smollm2.encode("<|im_start|>", allow_special=True) == [1]
    assert 1 not in smollm2.encode("<|im_start|>")
    assert smollm2.encode("hi", bos=True, eos=True) == [1, *smollm2.encode("hi"), 2]
    assert smollm2.token_bytes(1) == b"<|im_start|>"
    with pytest.raises(HerdError, match="outside the vocabulary"):
        smollm2.token_bytes(49152)


def test_smollm_pre_splits_every_digit(smollm2, hf_smollm2):
    # llama.cpp's `smollm` pre-tokenizer (and SmolLM2's tokenizer.json) isolate each \p{N} char,
    # vulgar fractions and Arabic digits included. transformers' GGUF loader skips that step, so
    # compare with its tokenizer given the pre-tokenizer from SmolLM2's tokenizer.json.
    from tokenizers import Tokenizer as RawTokenizer
    ref = RawTokenizer.from_str(hf_smollm2.backend_tokenizer.to_str())
    ref.pre_tokenizer = RawTokenizer.from_str(json.dumps({
        "version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}]}})).pre_tokenizer
    for text in ("½ cup, ٣ apples, Ⅻ o'clock", "v 12345 x1y22", *TEXTS):
        assert smollm2.encode(text, allow_special=True) == ref.encode(text, add_special_tokens=False).ids
    assert [smollm2.decode([i]) for i in smollm2.encode("12345")] == list("12345")


def test_gguf_errors():
    with pytest.raises(FormatError, match="no tokenizer"):
        tokenizer_from_gguf({"general.architecture": "llama"})
    with pytest.raises(FormatError, match="SentencePiece"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(FormatError, match="'qwen35'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen35",
                             "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []})


# --- GGUF: tiny synthetic vocabularies, against tiktoken and tokenizer.json ----------------------

GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SYNTHETIC_SPECIALS = ["<|begin_of_text|>", "<|eot_id|>"]


def _bpe(ranks, token, max_rank):
    # tiktoken's merge loop, limited to ranks below `max_rank`: how `token` was built.
    parts = [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(((r, i) for r, i in pairs if r is not None and r < max_rank),
                      default=(None, None))
        if rank is None:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


@pytest.fixture(scope="module")
def tiny_ranks(llama3, llama3_vocab_path):
    """A few hundred Llama 3 ranks: the bytes, the tokens of TEXTS, and what they are built from."""
    full = load_quicktok_ranks(llama3_vocab_path)
    keep, todo = {t for t, r in full.items() if r < 256}, set()
    for text in TEXTS[:8]:
        todo.update(llama3.token_bytes(i) for i in llama3.encode(text))
    while todo:
        token = todo.pop()
        if token not in keep:
            keep.add(token)
            todo.update(_bpe(full, token, full[token]))
    return {t: i for i, t in enumerate(sorted(keep, key=full.__getitem__))}


def _gguf_fields(ranks, pre):
    """GGUF metadata for `ranks`, as llama.cpp's converter writes it (merges from every split)."""
    spell = {b: c for c, b in byte_decoder().items()}
    text = {t: "".join(spell[b] for b in t) for t in ranks}
    merges = sorted((ranks[t], ranks[t[:k]], ranks[t[k:]], f"{text[t[:k]]} {text[t[k:]]}")
                    for t in ranks if len(t) > 1 for k in range(1, len(t))
                    if t[:k] in ranks and t[k:] in ranks)
    tokens = sorted(ranks, key=ranks.__getitem__)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [text[t] for t in tokens] + SYNTHETIC_SPECIALS,
        "tokenizer.ggml.token_type": [1] * len(tokens) + [3] * len(SYNTHETIC_SPECIALS),
        "tokenizer.ggml.merges": [m[-1] for m in merges],
        "tokenizer.ggml.bos_token_id": len(tokens),
        "tokenizer.ggml.eos_token_id": len(tokens) + 1,
    }


def _tokenizer_json(fields, pre_tokenizer, ignore_merges):
    """The same vocabulary as a Hugging Face tokenizer.json (the shape of Llama 3's / GPT-2's)."""
    tokens = fields["tokenizer.ggml.tokens"]
    n = len(tokens) - len(SYNTHETIC_SPECIALS)
    return {
        "version": "1.0",
        "added_tokens": [{"id": n + i, "content": s, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, s in enumerate(SYNTHETIC_SPECIALS)],
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "special_tokens": {"<|begin_of_text|>": {
                               "id": "<|begin_of_text|>", "ids": [n], "tokens": ["<|begin_of_text|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "ignore_merges": ignore_merges, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens[:n])},
                  "merges": [m.split(" ") for m in fields["tokenizer.ggml.merges"]]},
    }


LLAMA3_PRE_JSON = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
GPT2_PRE_JSON = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": True}


@pytest.mark.parametrize("pre, pat_str, pre_json, ignore_merges", [
    ("llama-bpe", PAT_STR, LLAMA3_PRE_JSON, True),
    ("gpt2", GPT2_PAT_STR, GPT2_PRE_JSON, False),
])
def test_synthetic_gguf(tmp_path, tiny_ranks, pre, pat_str, pre_json, ignore_merges):
    fields = _gguf_fields(tiny_ranks, pre)
    ours = tokenizer_from_gguf(fields)
    n = len(tiny_ranks)
    ref = tiktoken.Encoding(name="tiny", pat_str=pat_str, mergeable_ranks=tiny_ranks,
                            special_tokens={s: n + i for i, s in enumerate(SYNTHETIC_SPECIALS)})
    (tmp_path / "tokenizer.json").write_text(json.dumps(_tokenizer_json(fields, pre_json, ignore_merges)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"},
         "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    hf = load_tokenizer(tmp_path)

    assert ours.n_words == hf.n_words == ref.n_vocab == n + 2
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (n, n + 1, pre == "llama-bpe")
    assert (hf.bos_id, hf.eos_id, hf.add_bos) == (n, n + 1, True)  # BOS via the post-processor
    assert ours.stop_ids == hf.stop_ids == {n + 1}
    assert hf.chat_template.startswith("{{ bos_token }}")
    for text in TEXTS:
        ids = ref.encode(text, allowed_special="all")
        assert ours.encode(text, allow_special=True) == hf.encode(text, allow_special=True) == ids
        assert ours.encode(text) == hf.encode(text) == ref.encode_ordinary(text)
        assert ours.decode(ids) == text
        assert b"".join(ours.token_bytes(i) for i in ids) == text.encode()


# --- Incremental detokenization ------------------------------------------------------------------

STREAM_TEXTS = ["안녕하세요, 세계! 반갑습니다.", "Emoji: 😀👍🏽🇰🇷👨‍👩‍👧‍👦 ☕️ done", "日本語とEnglish 混在 🎉",
                "<|eot_id|> and <|im_end|> as text"]


def _is_utf8(data):
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("which", ["llama3", "smollm2"])
def test_stream_decoder(request, which):
    tok = request.getfixturevalue(which)
    # Characters split over several tokens, or the test proves nothing.
    assert not all(_is_utf8(tok.token_bytes(i)) for i in tok.encode("".join(STREAM_TEXTS)))
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        stream = StreamDecoder(tok)
        chunks = [stream.push(i) for i in ids]
        assert all("\ufffd" not in c for c in chunks)
        assert "".join(chunks) + stream.flush() == tok.decode(ids) == text


def test_stream_decoder_flush(llama3):
    stream = StreamDecoder(llama3)
    ids = llama3.encode("😀")
    assert len(ids) > 1
    assert stream.push(ids[0]) == ""  # an incomplete character is held back
    assert stream.flush() == "\ufffd"  # and replaced only at the end of the stream
    assert stream.push(llama3.special_tokens["<|eot_id|>"]) == "<|eot_id|>"
