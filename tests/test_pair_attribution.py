"""part8's pair attribution at K 1024 never lists a token's pairs: it ranks pairs through a weighted Gram of the
codes over the latents of largest bound, and certifies the ranking. Checked against the plain per-token listing
(the reference below) on codes with planted strong pairs, zeros among the values and more latents than one search
round takes."""
from __future__ import annotations

import torch

from common.pairs import pair_attribution


def reference(idx, val, V, w, top, min_tokens=3):
    """Every pair of every token, summed by pair: the definition, at O(tokens k^2) memory."""
    k = idx.shape[1]
    iu = torch.triu_indices(k, k, 1)
    a, b = idx[:, iu[0]], idx[:, iu[1]]
    fa, fb = val[:, iu[0]].double(), val[:, iu[1]].double()
    both = (fa > 0) & (fb > 0)
    lo, hi = torch.minimum(a, b)[both], torch.maximum(a, b)[both]
    contrib = ((V[lo].double() * V[hi].double()) @ w.double()) * (fa * fb)[both]
    key = lo * V.shape[0] + hi
    uniq, inv = torch.unique(key, return_inverse=True)
    total = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, contrib)
    count = torch.bincount(inv, minlength=len(uniq))
    ok = count >= min_tokens
    uniq, mean, count = uniq[ok], total[ok] / count[ok], count[ok]
    order = mean.abs().argsort(descending=True, stable=True)[:top]
    return [(int(uniq[o] // V.shape[0]), int(uniq[o] % V.shape[0]), float(mean[o]), int(count[o])) for o in order]


def codes(seed, tokens=500, n_latents=3000, k=12, dim=7, strong=0):
    g = torch.Generator().manual_seed(seed)
    idx = 10 + torch.rand(tokens, 900, generator=g).argsort(1)[:, :k]            # 900 frequent latents, then rare ones
    idx[:, -2:] = torch.randint(900, n_latents, (tokens, 2), generator=g)
    val = torch.rand(tokens, k, generator=g) * 2
    val[torch.rand(tokens, k, generator=g) < 0.1] = 0.0                          # TopK keeps some zeros
    V = torch.randn(n_latents, dim, generator=g) * 0.05
    if strong:
        V[:strong] *= 40.0                                                       # a few latents (ids < 10) dominate
        idx[: tokens // 2, :2] = torch.arange(strong)[torch.randint(0, strong, (tokens // 2, 2), generator=g)]
        idx[: tokens // 2, 1] = (idx[: tokens // 2, 0] + 1) % strong             # distinct within a row
    return idx, val, V, torch.randn(dim, generator=g)


def as_tuples(res):
    return [(p["pair"][0], p["pair"][1], p["mean_contribution"], p["tokens_both_active"]) for p in res["pairs"]]


def check_equal(got, want):
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[3] for g in got] == [w[3] for w in want]
    for g, w in zip(got, want):
        assert abs(g[2] - w[2]) <= 1e-9 * max(1.0, abs(w[2]))


def test_matches_the_per_token_listing_when_every_latent_is_searched():
    for seed in range(3):
        idx, val, V, w = codes(seed)
        res = pair_attribution(idx, val, V, w, top=10)
        assert res["latents_eligible"] > 512 and res["exact"]                   # more than one search round
        check_equal(as_tuples(res), reference(idx, val, V, w, 10))


def test_certified_early_search_is_exact():
    idx, val, V, w = codes(5, strong=6)
    res = pair_attribution(idx, val, V, w, top=5)
    assert res["exact"] and res["latents_searched"] < res["latents_eligible"]   # stopped by the bound, not the end
    assert res["bound_outside_searched"] < abs(res["pairs"][-1]["mean_contribution"])
    check_equal(as_tuples(res), reference(idx, val, V, w, 5))


def test_a_capped_search_says_it_is_not_exact_and_ranks_what_it_searched():
    idx, val, V, w = codes(7)
    res = pair_attribution(idx, val, V, w, top=10, max_latents=64)
    assert not res["exact"] and res["latents_searched"] == 64 and res["bound_outside_searched"] > 0
    # the same ranking as the definition restricted to the 64 searched latents
    f = torch.where(val > 0, val, torch.zeros_like(val))
    count = torch.bincount(idx[val > 0], minlength=V.shape[0])
    fmax = torch.zeros(V.shape[0]).scatter_reduce_(0, idx.flatten(), f.flatten(), "amax")
    b = (V.double().pow(2) @ w.double().abs()).sqrt() * fmax.double()
    elig = torch.nonzero(count >= 3).flatten()
    kept = elig[torch.argsort(b[elig], descending=True, stable=True)[:64]]
    val_kept = torch.where(torch.isin(idx, kept), val, torch.zeros_like(val))
    check_equal(as_tuples(res), reference(idx, val_kept, V, w, 10))
