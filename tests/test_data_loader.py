"""PackedDocuments: prepared shards read back as packed pre-training windows."""

from __future__ import annotations

import numpy as np
import pytest

from llamaherd.data import IGNORE, PackedDocuments
from llamaherd.data.shards import ShardWriter

BOS, EOS = 1000, 1001


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared folder of 40 documents with distinct token values (doc d: 10*d + 0..len-1)."""
    import json

    out = tmp_path_factory.mktemp("prepared")
    writer = ShardWriter(out, shard_tokens=60)
    docs = []
    for d in range(40):
        tokens = 10 * d + np.arange(1 + d % 7)
        writer.write(tokens)
        docs.append(tokens)
    shards = writer.close()
    (out / "report.json").write_text(json.dumps({"shards": shards, "tokenizer": {"bos_id": BOS, "eos_id": EOS}}))
    return out, docs


def stream_of(loader, docs, epoch=0):
    order = np.random.default_rng([loader.seed, epoch]).permutation(len(docs))
    return np.concatenate([np.concatenate([[BOS], docs[d], [EOS]]) for d in order])


def test_windows_cover_the_packed_stream_with_boundaries(prepared):
    out, docs = prepared
    loader = PackedDocuments(out, seq_len=16, split="all")
    windows = list(loader.windows())
    assert len(windows) == len(loader) > 5
    stream = stream_of(loader, docs)
    assert np.array_equal(np.concatenate([w.tokens for w in windows]), stream[:16 * len(windows)])
    for k, w in enumerate(windows):
        following = stream[16 * k + 1:16 * k + 17]
        starts_doc = following == BOS
        assert np.array_equal(w.targets[~starts_doc], following[~starts_doc])  # the next token...
        assert (w.targets[starts_doc] == IGNORE).all()  # ...except across a document boundary
        new_doc = np.concatenate([[False], w.tokens[1:] == BOS])
        assert np.array_equal(w.doc_ids, np.cumsum(new_doc))  # one id per document in the window


def test_ranks_resume_and_epochs(prepared):
    out, _ = prepared
    whole = [w.tokens for w in PackedDocuments(out, seq_len=8, split="all").windows()]
    ranks = [[w.tokens for w in PackedDocuments(out, seq_len=8, split="all", rank=r, world_size=2).windows()]
             for r in (0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(whole[0::2], ranks[0]))
    assert all(np.array_equal(a, b) for a, b in zip(whole[1::2], ranks[1]))
    resumed = [w.tokens for w in PackedDocuments(out, seq_len=8, split="all").windows(start=5)]
    assert all(np.array_equal(a, b) for a, b in zip(whole[5:], resumed)) and len(resumed) == len(whole) - 5
    other_epoch = [w.tokens for w in PackedDocuments(out, seq_len=8, split="all").windows(epoch=1)]
    assert not all(np.array_equal(a, b) for a, b in zip(whole, other_epoch))
    batch = next(PackedDocuments(out, seq_len=8, split="all").batches(4))
    assert batch.tokens.shape == batch.targets.shape == batch.doc_ids.shape == (4, 8)
    assert np.array_equal(batch.tokens, np.stack(whole[:4]))


def test_train_and_val_split_the_documents(prepared):
    out, docs = prepared
    train = PackedDocuments(out, seq_len=8, val_fraction=0.25)
    val = PackedDocuments(out, seq_len=8, split="val", val_fraction=0.25)
    assert 0 < len(val.doc_end) < len(train.doc_end)
    assert len(val.doc_end) + len(train.doc_end) == len(docs)
    first = lambda loader: {int(loader.shards[s][0][a]) // 10 for s, a in zip(loader.doc_shard, loader.doc_start)}
    assert not first(train) & first(val)
