"""The Llama 3 tiktoken tokenizer as a Hugging Face byte-level BPE (`tokenizer.json`).

A model pre-trained with `--tokenizer llama3` is saved as a Hugging Face directory, and GGUF export
rebuilds its vocabulary from a `tokenizers` BPE; both need the tokenizer in that form. The
conversion is the one Meta's Llama 3 `tokenizer.json` was made by (transformers'
`TikTokenConverter`): each token's merges are the splits into two tokens of lower rank, ordered by
the token's rank; Meta's split pattern runs before the byte-level mapping, and `ignore_merges`
takes a whole word that is a token as it is, as tiktoken does. Encodings are the same ids.
"""

from __future__ import annotations

from .bpe import HFTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def hf_from_tiktoken(tokenizer) -> HFTokenizer:
    """A `Llama3Tokenizer` as an `HFTokenizer` with the same ids, BOS, EOS and stop tokens.

    Args:
        tokenizer: a `llama3.Llama3Tokenizer`.
    Returns:
        The equivalent byte-level BPE tokenizer.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from .llama3 import PAT_STR

    n_base = tokenizer.n_words - len(tokenizer.special_tokens)
    ranks = {tokenizer.model.decode_single_token_bytes(i): i for i in range(n_base)}
    byte_char = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(((ranks[a], ranks[b], rank, a, b) for a, b in splits))
    merges.sort(key=lambda m: m[2])  # stable: within a token, by its parts' ranks
    bpe = models.BPE(vocab={text(t): r for t, r in ranks.items()}, merges=[(text(a), text(b)) for *_, a, b in merges],
                     ignore_merges=True)
    hf = Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    return HFTokenizer(hf, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, add_bos=tokenizer.add_bos,
                       chat_template=tokenizer.chat_template, stop_ids=tokenizer.stop_ids)
