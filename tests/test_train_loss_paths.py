"""The training loss's fast paths give plain torch's numbers: the fused cross-entropy forming its
logits blocks in a reused workspace (softmax in place, the weight gradient summed inside its
matmul), and the tied embedding lookup whose gradient is added into the loss's (V, D) one.
The reference is torch itself: F.embedding, full logits, F.cross_entropy."""

import torch
import torch.nn.functional as F

from llamaherd.train.loss import IGNORE, TiedLink, Workspace, chunked_cross_entropy, tied_lookup

V, D = 5000, 64


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    t = torch.randint(0, V, (n,), generator=g)
    t[::7] = IGNORE
    return h, w, t


def test_fused_loss_in_a_reused_workspace_equals_full_logits():
    """One workspace through calls of different sizes (grown, then reused with the last call's
    numbers in it), each over many blocks (16 tokens each: the weight gradient summed in place)."""
    workspace = Workspace()
    for n, seed in ((300, 0), (120, 1), (300, 2)):
        h, w, t = _data(n, seed)
        ref = F.cross_entropy(h @ w.T, t, ignore_index=IGNORE, reduction="sum")
        gh, gw = torch.autograd.grad(2 * ref, (h, w))
        plain = chunked_cross_entropy(h, w, t, chunk=10)
        ph, pw = torch.autograd.grad(2 * plain, (h, w))
        loss = chunked_cross_entropy(h, w, t, chunk=10, workspace=workspace)
        (2 * loss).backward()
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
        assert torch.allclose(h.grad, gh, atol=1e-4) and torch.allclose(w.grad, gw, atol=1e-4)
        # the workspace changes where the logits are formed, not a number
        assert loss.item() == plain.item() and torch.equal(h.grad, ph) and torch.equal(w.grad, pw)
    assert workspace.buffer.numel() == 16 * V  # one block's logits, never more


def test_tied_lookup_gradient_equals_a_plain_embedding_and_accumulates():
    """Tied weight: lookup -> a layer -> the fused loss through the same weight. The weight's
    gradient (the loss's with the lookup's rows added in place, tokens repeated) equals F.embedding
    with full-logit cross-entropy; a second backward adds to it as autograd does."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    proj = torch.randn(D, D, generator=g, requires_grad=True)
    tokens = torch.randint(0, 40, (2, 50), generator=g)  # 40 distinct ids over 100 positions
    targets = torch.randint(0, V, (2, 50), generator=g)
    targets[:, :5] = IGNORE

    def plain():
        h = torch.tanh(F.embedding(tokens, w) @ proj)
        return F.cross_entropy((h @ w.T).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")

    def tied():
        link = TiedLink()
        h = torch.tanh(tied_lookup(w, tokens, link) @ proj)
        return chunked_cross_entropy(h, w, targets, chunk=300, workspace=Workspace(), link=link)

    ref_w, ref_p = torch.autograd.grad(plain() / 90, (w, proj))
    for k in (1, 2):  # one backward, then a second accumulating into .grad
        (tied() / 90).backward()
        assert w.grad.layout == torch.strided
        assert torch.allclose(w.grad, k * ref_w, atol=1e-5) and torch.allclose(proj.grad, k * ref_p, atol=1e-5)
    # Two linked forwards in one backward, and another use of the weight beside them: each adds
    # its share (the loss hands its gradient to its own lookup, never to autograd directly).
    w.grad = proj.grad = None
    ref_w2, ref_p2 = torch.autograd.grad((plain() + plain()) / 90 + w.square().sum(), (w, proj))
    ((tied() + tied()) / 90 + w.square().sum()).backward()
    assert torch.allclose(w.grad, ref_w2, atol=1e-5) and torch.allclose(proj.grad, ref_p2, atol=1e-5)
    # Without a loss handing over its gradient, the lookup gives its own, as F.embedding's.
    w.grad = None
    tied_lookup(w, tokens, TiedLink()).pow(2).sum().backward()
    (expected,) = torch.autograd.grad(F.embedding(tokens, w).pow(2).sum(), (w,))
    assert torch.allclose(w.grad, expected, atol=1e-6)


def test_causal_lm_loss_tied_path_equals_the_plain_lookup():
    """The recipe's loss module on a tied tiny preset: its tied path and the plain one (what FSDP2
    runs) give the same loss and gradients, every parameter."""
    from llamaherd.train.finetune import CausalLMLoss
    from llamaherd.train.pretrain import build_from_preset

    model = build_from_preset("tiny", 3000, "cpu", seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    wrapper = CausalLMLoss(model, 8192)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3000, (2, 48), generator=g)
    targets = torch.randint(0, 3000, (2, 48), generator=g)
    doc_ids = (torch.arange(48) >= 20).long().expand(2, 48)
    input_pos = torch.cat([torch.arange(20), torch.arange(28)]).expand(2, 48)
    results = {}
    for linked in (True, False):
        wrapper.link_tied = linked
        loss = wrapper(tokens, targets, doc_ids, input_pos)
        (loss / 96).backward()
        results[linked] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    assert results[True][0] == results[False][0]
    for name, grad in results[True][1].items():
        assert torch.allclose(grad, results[False][1][name], atol=1e-7), name
