"""Prompt Guard 2 plumbing on a tiny randomly initialised DebertaV2 sequence classifier built here:
scores are the softmax of the model's own logits, long texts are split into 512-token windows and
scored by their worst window, and batching (padding) does not change a score."""

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from llamaherd.safety.prompt_guard import PromptGuard  # noqa: E402


@pytest.fixture(scope="module")
def tiny_guard(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = [f"w{i}" for i in range(200)]
    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]",
                                                sep_token="[SEP]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=48, max_position_embeddings=512, num_labels=2,
                                          id2label={0: "LABEL_0", 1: "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1},
                                          pad_token_id=0)
    model = transformers.DebertaV2ForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("pg2")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def by_hand(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)[1].item()


def test_short_text_score_is_the_softmax(tiny_guard):
    pg = PromptGuard.from_pretrained(tiny_guard)
    text = "w1 w2 w3 w4"
    [score] = pg.score([text])
    assert pg.windows(text) == [[1, 5, 6, 7, 8, 2]]
    assert score == pytest.approx(by_hand(pg.model, [1, 5, 6, 7, 8, 2]), abs=1e-6)


def test_long_text_is_split_into_512_token_windows(tiny_guard):
    pg = PromptGuard.from_pretrained(tiny_guard, batch_size=3)
    text = " ".join(f"w{i % 200}" for i in range(1300))  # 1300 tokens -> 510 + 510 + 280
    windows = pg.windows(text)
    assert [len(w) for w in windows] == [512, 512, 282] and all(w[0] == 1 and w[-1] == 2 for w in windows)
    expected = max(by_hand(pg.model, w) for w in windows)
    short = "w7 w8"
    scores = pg.score([short, text, short])  # batched with padding
    assert scores[1] == pytest.approx(expected, abs=1e-5)
    assert scores[0] == pytest.approx(scores[2], abs=1e-6) == pytest.approx(by_hand(pg.model, pg.windows(short)[0]), abs=1e-5)
    results = pg.classify([short, text], threshold=0.0)
    assert [r.windows for r in results] == [1, 3] and all(r.label == "malicious" for r in results)


def test_not_a_folder_is_a_clear_error(tmp_path):
    from llamaherd.errors import HerdError

    with pytest.raises(HerdError, match="not a model folder"):
        PromptGuard.from_pretrained(tmp_path / "nope")
