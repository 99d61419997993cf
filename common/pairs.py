"""Exact pair attribution (part8, the feature browser): which pairs of primary features drive a direction of the
NFM's pooled bi-interaction vector, e.g. a secondary (integration) feature's pre-activation, ranked by their mean
exact contribution over the tokens where both fire, with a certificate that no unsearched pair can enter the
ranking (tests/test_pair_attribution.py checks it against brute force).
"""
from __future__ import annotations

import torch

PAIR_SEARCH_LATENTS = 8192      # pair attribution: the most latents searched densely (tokens x 8192 float64)


def secondary_direction(nfm, sec, unorm, s: int) -> torch.Tensor:
    """d pre-activation of secondary feature s / d pooled vector p [dim]: the secondary SAE reads
    u = W_1 p + b_1 (normalised by unorm), so its pre-activation W_enc[s] . ((u - shift) / scale - b_dec) + b_enc
    is affine in p. W_1 is the NFM's; a PolySAE's is [2 I; 0] (its pairwise cross terms; common/poly.py)."""
    W1 = (nfm.hidden_per_pooled() if hasattr(nfm, "hidden_per_pooled") else nfm.mlp1.weight).detach().cpu()
    return (sec.W_enc[s].detach().cpu() / unorm.scale.cpu()) @ W1


@torch.no_grad()
def pair_attribution(idx, val, V, w, top: int, min_tokens: int = 3, max_latents: int = PAIR_SEARCH_LATENTS) -> dict:
    """Rank primary pairs (i<j) by their mean exact contribution f_i f_j sum_d V[i,d] V[j,d] w[d] over the tokens
    where both fire; pairs seen together on fewer than min_tokens tokens are left out (a mean of one token is noise).

    At K 1024 a token holds 523,776 pairs, so the pairs are never listed per token. The totals are a weighted Gram
    of the codes instead, (V diag(w) V^T) * (F^T F) over the tokens F, computed for the latents of largest bound
    first: |mean_ij| <= b_i b_j with b_i = max f_i * sqrt(sum_d |w_d| V[i,d]^2) (Cauchy-Schwarz), so once
    b_first * b_next is below the top-th |mean| found, no pair outside the searched latents can enter the ranking
    and it is exact. The search doubles up to max_latents; "exact" records whether that certificate was reached."""
    idx, on = idx.long(), val > 0                                                # [tokens, k]
    f = torch.where(on, val, torch.zeros_like(val)).double()
    Vd, wd = V.detach().double().cpu(), w.detach().double().cpu()
    n_lat = Vd.shape[0]
    count = torch.bincount(idx[on], minlength=n_lat)                             # tokens each latent fires on
    fmax = torch.zeros(n_lat, dtype=torch.float64).scatter_reduce_(0, idx.flatten(), f.flatten(), "amax")
    bound = (Vd.pow(2) @ wd.abs()).sqrt() * fmax                                 # [n_latents]
    elig = torch.nonzero(count >= min_tokens).flatten()
    order = elig[torch.argsort(bound[elig], descending=True, stable=True)]
    n, m = len(order), min(len(order), 512, max_latents)
    while True:
        pairs, tau = _pairs_among(order[:m], idx, f, Vd, wd, top, min_tokens)
        outside = float(bound[order[0]] * bound[order[m]]) if m < n else 0.0
        if m == n or outside < tau or m >= max_latents:
            break
        m = min(n, 2 * m, max_latents)
    return {"pairs": pairs, "exact": m == n or outside < tau, "latents_searched": m, "latents_eligible": n,
            "bound_outside_searched": outside}


def _pairs_among(lat, idx, f, Vd, wd, top: int, min_tokens: int) -> tuple[list[dict], float]:
    """The top pairs within the latents `lat` (dense over them) and the top-th |mean| (0 if fewer pairs)."""
    m, tokens = len(lat), idx.shape[0]
    col = torch.full((Vd.shape[0],), -1, dtype=torch.long)
    col[lat] = torch.arange(m)
    c = col[idx]                                                                 # [tokens, k]: column or -1
    keep = (c >= 0) & (f > 0)
    F = torch.zeros(tokens, m, dtype=torch.float64)
    F[torch.nonzero(keep)[:, 0], c[keep]] = f[keep]                              # [tokens, m]
    B = (F > 0).double()
    Vw, Vl = Vd[lat] * wd, Vd[lat]                                               # [m, dim]
    keys, means, counts = [], [], []
    for s in range(0, m, 1024):
        blk = slice(s, min(m, s + 1024))
        N = B[:, blk].T @ B                                                      # [blk, m]: tokens both fire
        mean = (Vw[blk] @ Vl.T) * (F[:, blk].T @ F) / N.clamp(min=1)
        ok = (N >= min_tokens) & (lat[blk, None] < lat[None, :])                 # each unordered pair once
        if not ok.any():
            continue
        a = mean.abs()[ok]
        thr = a.topk(min(top, len(a))).values[-1]
        r, q = torch.nonzero(ok & (mean.abs() >= thr), as_tuple=True)
        keys.append(lat[blk][r] * Vd.shape[0] + lat[q])
        means.append(mean[r, q])
        counts.append(N[r, q])
    if not keys:
        return [], 0.0
    key, mean, cnt = torch.cat(keys), torch.cat(means), torch.cat(counts)
    by_key = torch.argsort(key)
    key, mean, cnt = key[by_key], mean[by_key], cnt[by_key]
    best = mean.abs().argsort(descending=True, stable=True)[:top]                # ties: the lower pair first
    tau = float(mean[best[-1]].abs()) if len(best) == top else 0.0
    base = Vd.shape[0]
    return [{"pair": [int(key[o] // base), int(key[o] % base)], "mean_contribution": float(mean[o]),
             "tokens_both_active": int(cnt[o])} for o in best], tau
