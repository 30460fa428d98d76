"""The sampler's shortcut (`generate.candidates`, `generate.draw`) draws from exactly the
distribution `logits_to_probs` defines over the whole vocabulary."""

import pytest
import torch

from llamaherd.generate import SamplingOptions, candidates, draw, logits_to_probs, make_generator, sample

V = 49152


def spread(probs: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """candidates' (probs, ids) as probabilities over the whole vocabulary."""
    if ids is None:
        return probs.float()
    full = torch.zeros(V)
    full[ids] = probs.float()
    return full


@pytest.mark.parametrize("scale", [0.5, 4.0])  # flat (the full fallback) to peaked
@pytest.mark.parametrize("top_p,min_p", [(0.0, 0.0), (0.5, 0.0), (0.9, 0.0), (0.95, 0.05), (1.0, 0.01)])
@pytest.mark.parametrize("top_k", [0, 40])
def test_candidates_equal_the_whole_vocabulary_filter(scale, top_p, min_p, top_k):
    g = torch.Generator().manual_seed(int(scale * 100) + top_k)
    logits = torch.randn(V, generator=g) * scale
    for temperature in (0.7, 1.3):
        opts = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        if top_k:
            values, ids = torch.topk(logits, top_k)
            expected = spread(logits_to_probs(values, opts), ids)
        else:
            expected = logits_to_probs(logits, opts)
        got = spread(*candidates(logits, opts))
        # The same tokens, up to one at the top-p boundary: logits_to_probs sums its sorted
        # probabilities in float32, candidates in float64; where the mass before a token is within
        # rounding of top_p, they may decide it differently (when no two tokens tie).
        assert int(((got > 0) != (expected > 0)).sum()) <= (1 if scale >= 2.0 else 20)
        assert (got - expected).abs().sum() < 1e-3
        assert got.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_nucleus_beyond_the_first_floor_is_found():
    # 2,000 tokens of p ~ 5e-4 each (below the first floor of 1e-3, distinct: no ties) hold the mass
    logits = torch.full((V,), -30.0)
    logits[:2000] = torch.linspace(0.0, 0.2, 2000)
    opts = SamplingOptions(temperature=1.0, top_k=0, top_p=0.9)
    got = spread(*candidates(logits, opts))
    assert (got - logits_to_probs(logits, opts)).abs().sum() < 1e-5
    assert 1700 <= int((got > 0).sum()) <= 1850  # ~0.9 of the 2,000, the likeliest


def test_draw_follows_the_probabilities_and_never_a_zero():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    g = make_generator(0)
    draws = [draw(probs, g) for _ in range(4000)]
    assert set(draws) <= {1, 3, 4}
    for i in (1, 3, 4):
        assert draws.count(i) / len(draws) == pytest.approx(float(probs[i]), abs=0.03)
    assert draw(torch.tensor([0.0, 0.0, 1.0]), g) == 2


def test_sample_top_p_alone_draws_from_the_nucleus_in_proportion():
    logits = torch.full((V,), -10.0)
    logits[[5, 900, 40000]] = torch.tensor([3.0, 2.0, 1.0])
    opts = SamplingOptions(temperature=1.0, top_k=0, top_p=0.8, repeat_penalty=1.0)
    nucleus = logits_to_probs(logits, opts)
    assert set(nucleus.nonzero().flatten().tolist()) == {5, 900}
    g = make_generator(1)
    draws = [sample(logits, [], opts, g) for _ in range(3000)]
    assert set(draws) <= {5, 900}
    assert draws.count(5) / len(draws) == pytest.approx(float(nucleus[5]), abs=0.03)
    again = [sample(logits, [], opts, make_generator(1)) for _ in range(5)]
    assert len(set(again)) == 1  # same seed, same draw
