"""The model as a training and compiling module, on tiny random models (CPU, seconds): the training
forward and the cached decode step under `torch.compile(fullgraph=True)`, packed documents, fused
projections that LoRA can still wrap, and FSDP2 (`fully_shard`) per block over gloo."""

import os

import pytest
import torch
from torch import nn

from llamaherd import model as model_module
from llamaherd.config import ModelArgs
from llamaherd.model import FusedSlice, Transformer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96, max_seq_len=64)


def tiny(seed: int = 0, args: ModelArgs = ARGS) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=0.1)
    return model


def batch(seed: int = 1, B: int = 2, T: int = 24):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (B, T), generator=g)
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[0, :5] = -100  # a masked prompt
    doc_ids = torch.cat([torch.zeros(B, 10, dtype=torch.long), torch.ones(B, T - 10, dtype=torch.long)], dim=1)
    input_pos = torch.cat([torch.arange(10), torch.arange(T - 10)]).expand(B, T)
    return tokens, targets, doc_ids, input_pos


@pytest.mark.slow
def test_training_forward_compiles_and_matches_eager():
    """Packed documents, positions restarting per document, masked targets: loss and gradients."""
    model = tiny()
    tokens, targets, doc_ids, input_pos = batch()
    kwargs = dict(input_pos=input_pos, targets=targets, doc_ids=doc_ids)
    eager = model(tokens, **kwargs)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = torch.compile(model, fullgraph=True)(tokens, **kwargs)
    loss.backward()
    assert (loss - eager).abs().item() <= 1e-5
    assert max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), eager_grads)) <= 1e-5


@pytest.mark.slow
def test_cached_decode_step_compiles_and_matches_eager():
    """A decode step of two cache rows at different positions, keys written into the cache."""
    model = tiny().eval()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    step = torch.compile(model, fullgraph=True)
    outs, keys = [], []
    with torch.no_grad():
        for fn in (model, step):
            model.setup_cache(max_batch=3, max_seq_len=32)
            model(tokens[:, :8], torch.arange(8).expand(2, 8), rows=torch.tensor([2, 0]))  # prefill, eager
            # row 0 feeds its token again at position 7, row 2 moves on to position 8
            outs.append(fn(tokens[:, 8:], torch.tensor([[8], [7]]), rows=torch.tensor([2, 0])))
            keys.append(model.layers[1].attention.cache.k.clone())
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert (keys[0] - keys[1]).abs().max() <= 1e-5


def test_cached_forward_equals_training_forward():
    model = tiny().eval()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(1, 16)
        first = model(tokens[:, :7], torch.arange(7)[None], n_keys=7)
        rest = [model(tokens[:, i:i + 1], torch.tensor([[i]]), n_keys=i + 1) for i in range(7, 12)]
    assert (torch.cat([first, *rest], dim=1) - full).abs().max() <= 1e-5


def test_packed_documents_in_chunks_equal_each_document_alone(monkeypatch):
    """The block-causal mask is built a chunk of queries at a time (never T x T); the chunking
    must not show."""
    monkeypatch.setattr(model_module, "DOC_CHUNK", 4)  # 24 tokens: 6 chunks
    model = tiny()
    tokens, _, doc_ids, input_pos = batch()
    with torch.no_grad():
        packed = model(tokens, input_pos, doc_ids=doc_ids)
        alone = torch.cat([model(tokens[:, :10]), model(tokens[:, 10:])], dim=1)
    assert (packed - alone).abs().max() <= 1e-5


def test_loss_ignores_minus_100():
    model = tiny()
    tokens, targets, _, _ = batch()
    with torch.no_grad():
        logits = model(tokens)
        loss = model(tokens, targets=targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert abs(float(loss) - float(expected)) <= 1e-6


class LoRA(nn.Module):
    """A minimal LoRA wrapper, as a fine-tuning library would put around wq."""

    def __init__(self, base: nn.Module, r: int = 4):
        super().__init__()
        self.base = base
        self.a = nn.Linear(base.in_features, r, bias=False)
        self.b = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.b.weight, std=0.5)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def fuse_float(model: Transformer) -> None:
    """Fuse a float model's projections (what `pack_gguf_tensors` does to a GGUF's at load)."""
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        for parent, names, fuse in ((attn, ("wq", "wk", "wv"), attn.fuse), (ffn, ("w1", "w3"), ffn.fuse)):
            parts = [getattr(parent, n) for n in names]
            fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False)
            fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]))
            fuse(fused)


def test_fused_projections_stay_wrappable():
    model = tiny().eval()
    tokens = batch()[0]
    with torch.no_grad():
        plain = model(tokens)
        fuse_float(model)
        attn = model.layers[0].attention
        assert isinstance(attn.wq, FusedSlice) and attn.wqkv is not None
        assert "layers.0.attention.wq.weight" not in model.state_dict()  # each weight once
        fused = model(tokens)
        assert (fused - plain).abs().max() <= 1e-5
        attn.wq = LoRA(attn.wq)  # wrapping one part turns the fused matmul off for that layer
        model.layers[1].feed_forward.w3 = LoRA(model.layers[1].feed_forward.w3)
        wrapped = model(tokens)
        assert (wrapped - plain).abs().max() > 1e-3
        attn.wq.b.weight.zero_()
        model.layers[1].feed_forward.w3.b.weight.zero_()
        assert (model(tokens) - plain).abs().max() <= 1e-5


def test_meta_device_model_gets_its_rope_table():
    with torch.device("meta"):
        model = Transformer(ARGS)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.rope, tiny().rope)
    assert model.rope.shape == (ARGS.max_seq_len, ARGS.head_dim // 2, 2)


def _fsdp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = tiny()
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tokens, targets, doc_ids, input_pos = batch(seed=10 + rank)  # each rank its own data
        losses = []
        for _ in range(2):
            loss = model(tokens, input_pos, targets=targets, doc_ids=doc_ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        queue.put((rank, losses))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_fully_shard_per_block_trains_like_one_process():
    """Two gloo processes, each block sharded (FSDP2), each rank its own batch: the same losses as
    one process stepping on the mean of the two batches' gradients."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fsdp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [batch(seed=10 + r) for r in range(2)]
    expected = {0: [], 1: []}
    for _ in range(2):
        for r, (tokens, targets, doc_ids, input_pos) in enumerate(data):
            loss = model(tokens, input_pos, targets=targets, doc_ids=doc_ids) / 2
            loss.backward()
            expected[r].append(2 * loss.item())
        optimizer.step()
        optimizer.zero_grad()
    for r in range(2):
        assert results[r] == pytest.approx(expected[r], abs=1e-5)
