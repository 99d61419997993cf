"""Per-feature statistics of trained NFM / joint weights and of their contributions on data.

  Gini(w)            a = |w| sorted ascending, n entries: 2 sum_j j a_(j) / (n sum a) - (n + 1) / n  (0 = even,
                     -> 1 = one entry); 0 for an all-zero vector (as the original study's inspector)
  effective rank(w)  exp(H(p)), p = |w| / sum |w|: the effective number of entries in use (1 for all-zero)
  L0(w)              number of entries with |w| > 1e-8
  per-feature contribution on held-out tokens (mean over all tokens, so rare features weigh less):
    direct / linear  f_i ||W_dec[i]|| and f_i ||W_lin[i]|| (the output each path adds for feature i)
    interaction      ||q(f) - q(f without i)|| (NFM.interaction_leave_one_out)
"""
from __future__ import annotations

import math

import numpy as np
import torch


def gini(w: torch.Tensor) -> torch.Tensor:
    """Row-wise Gini of |w| [n_rows, n] -> [n_rows]."""
    a = w.abs().double().sort(dim=-1).values
    n = a.shape[-1]
    total = a.sum(-1)
    j = torch.arange(1, n + 1, dtype=torch.float64)
    g = 2 * (a * j).sum(-1) / (n * total.clamp_min(1e-300)) - (n + 1) / n
    return torch.where(total > 1e-12, g.clamp(0, 1), torch.zeros_like(g))


def effective_rank(w: torch.Tensor) -> torch.Tensor:
    a = w.abs().double()
    total = a.sum(-1, keepdim=True)
    p = a / total.clamp_min(1e-300)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.where(total.squeeze(-1) > 1e-12, h.exp(), torch.ones_like(h))


def l0(w: torch.Tensor) -> torch.Tensor:
    return (w.abs() > 1e-8).sum(-1)


@torch.no_grad()
def feature_contributions(nfm, idx: torch.Tensor, val: torch.Tensor, n_features: int, W_dec: torch.Tensor | None = None,
                          max_elems: int = 1 << 24) -> dict[str, torch.Tensor]:
    """Mean per-token contribution of each feature through each path, plus activation frequency. CPU out."""
    dev = nfm.V.device
    k, d = idx.shape[1], nfm.cfg.d
    chunk = max(1, max_elems // (k * max(d, nfm.cfg.dim)))
    out = {name: torch.zeros(n_features, dtype=torch.float64) for name in ("linear", "interaction", "direct", "freq")}
    lin_norm = nfm.W_lin.norm(dim=1)
    dec_norm = W_dec.norm(dim=1) if W_dec is not None else None
    for s in range(0, idx.shape[0], chunk):
        i, v = idx[s:s + chunk].to(dev), val[s:s + chunk].to(dev)
        flat, act = i.reshape(-1).cpu(), (v > 0).reshape(-1).cpu()
        out["freq"].index_add_(0, flat, act.double())
        out["linear"].index_add_(0, flat, (v * lin_norm[i]).reshape(-1).double().cpu())
        out["interaction"].index_add_(0, flat, nfm.interaction_leave_one_out(i, v).reshape(-1).double().cpu())
        if dec_norm is not None:
            out["direct"].index_add_(0, flat, (v * dec_norm[i]).reshape(-1).double().cpu())
    n = idx.shape[0]
    res = {k_: v_ / n for k_, v_ in out.items()}
    if W_dec is None:
        del res["direct"]
    return res


def top_overlap(a: torch.Tensor, b: torch.Tensor, top: int) -> dict:
    ta, tb = set(a.topk(top).indices.tolist()), set(b.topk(top).indices.tolist())
    return {"top": top, "shared": len(ta & tb), "jaccard": len(ta & tb) / len(ta | tb)}


def coactivation(idx: torch.Tensor, val: torch.Tensor, feature: int, n_features: int) -> torch.Tensor:
    """Fraction of tokens on which `feature` and each other feature are both active: [n_features]."""
    rows = ((idx == feature) & (val > 0)).any(1)
    i, v = idx[rows], val[rows]
    c = torch.bincount(i[v > 0], minlength=n_features).double()
    c[feature] = 0
    return c / idx.shape[0]


def corr_with_ci(x: np.ndarray, y: np.ndarray, alpha: float = 0.05) -> dict:
    """Pearson and Spearman r with Fisher-z confidence intervals (Bonett-Wright standard error for Spearman)."""
    from scipy import stats

    n = len(x)
    out = {}
    for name, (r, p) in (("pearson", stats.pearsonr(x, y)), ("spearman", stats.spearmanr(x, y))):
        out[name] = {"r": float(r), "ci": fisher_ci(float(r), n, name == "spearman", alpha), "p": float(p), "n": n}
    return out


def fisher_ci(r: float, n: int, spearman: bool = False, alpha: float = 0.05) -> list[float]:
    """Fisher-z confidence interval of a correlation r over n pairs (Bonett-Wright standard error for Spearman)."""
    from scipy import stats

    z = stats.norm.ppf(1 - alpha / 2)
    se = math.sqrt((1 + r * r / 2) / (n - 3)) if spearman else 1 / math.sqrt(n - 3)
    zr = math.atanh(max(min(r, 0.999999), -0.999999))
    return [math.tanh(zr - z * se), math.tanh(zr + z * se)]


@torch.no_grad()
def max_abs_cosine(E: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, float]:
    """Per row of E [n, d]: the largest |cos| to any *other* row, and the mean |cos| over all off-diagonal
    pairs, computed in row chunks so no n x n matrix is held (memory O(chunk * n)). The rows are normalised in
    float64 and multiplied in float32 (cosines to ~1e-6; the sums are float64): at the paper's 50,000 x 3,200
    decoders the float64 Gram is 3x slower on a CPU (8e12 multiply-adds per model)."""
    U = torch.nn.functional.normalize(E.double(), dim=1).float()
    n = U.shape[0]
    best = torch.empty(n, dtype=torch.float64)
    total = 0.0
    for s in range(0, n, chunk):
        c = (U[s:s + chunk] @ U.T).abs_()                                # [chunk, n]
        rows = torch.arange(c.shape[0])
        c[rows, rows + s] = 0.0                                          # drop self-similarity
        best[s:s + chunk] = c.max(1).values.double()
        total += float(c.sum(dtype=torch.float64))
    return best, total / (n * (n - 1))


def gmm_bic(x: np.ndarray, iters: int = 300, seed: int = 0) -> dict:
    """1- vs 2-component Gaussian mixture on 1-D data by EM; BIC = -2 log L + p log n (lower is better).
    delta_bic = BIC(1) - BIC(2): > 10 is strong evidence for two components (Kass & Raftery); two_modes also
    asks that the fitted mixture density have two peaks."""
    x = np.asarray(x, float)
    n = len(x)
    mu1, sd1 = x.mean(), max(x.std(), 1e-9)
    ll1 = float(np.sum(-0.5 * ((x - mu1) / sd1) ** 2 - np.log(sd1 * math.sqrt(2 * math.pi))))
    bic1 = -2 * ll1 + 2 * math.log(n)
    mu = np.quantile(x, [0.25, 0.75]).astype(float)
    sd = np.full(2, max(x.std() / 2, 1e-6))
    w = np.array([0.5, 0.5])
    floor = max(1e-6, 1e-3 * x.std())
    for _ in range(iters):
        dens = w * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
        tot = np.maximum(dens.sum(1, keepdims=True), 1e-300)
        r = dens / tot
        nk = np.maximum(r.sum(0), 1e-12)
        w, mu = nk / n, (r * x[:, None]).sum(0) / nk
        sd = np.maximum(np.sqrt((r * (x[:, None] - mu) ** 2).sum(0) / nk), floor)
    dens = w * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    ll2 = float(np.log(np.maximum(dens.sum(1), 1e-300)).sum())
    bic2 = -2 * ll2 + 5 * math.log(n)
    order = np.argsort(mu)
    # A 2-component fit also wins BIC on a skewed single-peaked distribution, so "two modes" additionally
    # requires the fitted mixture density itself to have two local maxima.
    grid = np.linspace(x.min(), x.max(), 2000)
    dens = (w * np.exp(-0.5 * ((grid[:, None] - mu) / sd) ** 2) / sd).sum(1)
    peaks = int(((dens[1:-1] > dens[:-2]) & (dens[1:-1] > dens[2:])).sum())
    return {"bic_one": bic1, "bic_two": bic2, "delta_bic": bic1 - bic2, "mixture_density_peaks": peaks,
            "two_modes": bool(bic1 - bic2 > 10 and peaks >= 2),
            "means": mu[order].tolist(), "stds": sd[order].tolist(), "weights": w[order].tolist()}


SEED_THRESHOLD = 0.2        # original_study.md §8.3: "s_i < 0.2 ('low'/'diffuse') vs s_i > 0.2"


def seed_ratios(W_dec: torch.Tensor, W_lin: torch.Tensor, V: torch.Tensor) -> tuple[np.ndarray, dict]:
    """(s_i = ||W_dec[i]||^2 [m], {ratio name: [m]}) over the m features with s_i > 1e-6 (see seed_bimodality)."""
    s = W_dec.detach().double().pow(2).sum(1)
    keep = s > 1e-6
    R, L, I = s[keep].sqrt(), W_lin.detach().double()[keep].norm(dim=1), V.detach().double()[keep].norm(dim=1)
    T = (R + L + I).clamp_min(1e-300)
    return s[keep].numpy(), {"nfm_total": ((L + I) / T).numpy(), "linear": (L / T).numpy(),
                             "interaction": (I / T).numpy(), "residual": (R / T).numpy()}


def seed_bimodality(W_dec: torch.Tensor, W_lin: torch.Tensor, V: torch.Tensor, threshold: float = SEED_THRESHOLD) -> dict:
    """The original study's squared-norm analysis (part17_bimodal_gram_inspection.py, original_study.md §8.3), in
    its own terms, for a joint model's rows W_dec, W_lin [n, d] and V [n, dim]: for each feature with
    s_i = ||W_dec[i]||^2 > 1e-6, the plain weight norms R_i = ||W_dec[i]||, L_i = ||W_lin[i]||, I_i = ||V[i]||,
    T_i = R_i + L_i + I_i and the ratios nfm_total (L + I) / T, linear L / T, interaction I / T, residual R / T;
    the group means below / above `threshold` with a Student t-test (equal variances) per ratio, and the
    Spearman rho of s with each ratio (Fisher-z CI); and 'modes', the 1- vs 2-component mixture test of s
    (gmm_bic), the study's 'bimodal' claim. Meaningful only for unconstrained decoders (--recipe reference): with
    unit-norm rows every s_i is 1. Built in, as the notes say (§14.7): R_i = sqrt(s_i), so rho(s, residual) is
    near +1 by construction and nfm_total = 1 - residual mirrors it."""
    from scipy import stats

    sk, ratios = seed_ratios(W_dec, W_lin, V)
    low, high = sk < threshold, sk > threshold
    out = {"threshold": threshold, "n_features": int(sk.size), "n_low": int(low.sum()), "n_high": int(high.sum()),
           "squared_norm_mean": float(sk.mean()) if sk.size else None,
           "all_unit_norm": bool(np.all(np.abs(sk - 1) < 1e-5)), "ratios": {}}
    for name, r in ratios.items():
        row = {"mean_low": float(r[low].mean()) if low.any() else None,
               "mean_high": float(r[high].mean()) if high.any() else None}
        if low.sum() > 1 and high.sum() > 1:
            t, p = stats.ttest_ind(r[low], r[high], equal_var=True)
            row.update(t=float(t), p=float(p))
        if sk.size > 3 and not out["all_unit_norm"]:      # equal norms (up to rounding): no ranking to test
            rho, p_rho = stats.spearmanr(sk, r)
            row.update(spearman_rho=float(rho), spearman_p=float(p_rho),
                       spearman_rho_ci=fisher_ci(float(rho), int(sk.size), spearman=True))
        out["ratios"][name] = row
    # the study's "bimodal" claim, tested on these squared norms (its own evidence was a histogram, §8.3)
    out["modes"] = gmm_bic(sk) if sk.size >= 10 and not out["all_unit_norm"] else None
    return out
