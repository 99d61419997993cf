"""Statistics with documents as the unit: tokens of one document are correlated, so resampling and tests
treat each held-out document as one observation (the reference ran t-tests over millions of tokens as if
independent).

  ratio_of_sums_ci   sum over docs / sum over docs (a mean per token, or a ratio of two variants' means),
                     CI by the percentile bootstrap over docs
  paired_difference  two variants measured on the same tokens: mean difference per token with a bootstrap CI
                     over documents, and a paired t-test over the per-document means
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def _boot_indices(n_docs: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_docs, size=(n_boot, n_docs))


def ratio_of_sums_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
                     ) -> tuple[float, float, float]:
    """Point estimate sum(num)/sum(den) and its bootstrap CI, resampling documents (entries of num/den).

    With den a token count this is a per-token mean; with den another variant's per-document sums it is a
    ratio of two means on the same tokens (e.g. KL of a variant / KL of its random baseline)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    point = num.sum() / den.sum()
    b = _boot_indices(len(num), n_boot, seed)
    boots = num[b].sum(1) / np.maximum(den[b].sum(1), 1e-300)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(point), float(lo), float(hi)


def paired_difference(sum_a, sum_b, count, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """a - b per token on the same tokens: bootstrap CI over documents and a paired t-test on document means."""
    sum_a, sum_b, count = (np.asarray(v, float) for v in (sum_a, sum_b, count))
    diff, lo, hi = ratio_of_sums_ci(sum_a - sum_b, count, n_boot, seed, alpha)
    ok = count > 0
    mean_a, mean_b = sum_a[ok] / count[ok], sum_b[ok] / count[ok]
    t, p = stats.ttest_rel(mean_a, mean_b) if ok.sum() > 1 else (float("nan"), float("nan"))
    rel = diff / (sum_b.sum() / count.sum()) if sum_b.sum() != 0 else float("nan")
    return {"difference_per_token": diff, "ci": [lo, hi], "relative_to_b": rel, "t_over_documents": float(t),
            "p_over_documents": float(p), "n_documents": int(ok.sum())}


# ------------------------------------------------------------------------------------- two-way ANOVA

def _rss(X: np.ndarray, y: np.ndarray) -> tuple[float, int, np.ndarray, np.ndarray]:
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    r = y - X @ beta
    return float(r @ r), int(np.linalg.matrix_rank(X)), beta, X


def _dummies(labels: np.ndarray) -> np.ndarray:
    """Treatment coding, first level (in sorted order) as reference: [n, n_levels - 1]."""
    levels = np.unique(labels)
    return (labels[:, None] == levels[None, 1:]).astype(float)


def two_way_anova(y, a, b, block=None) -> dict:
    """Type II two-way ANOVA of y on factors a, b (2 levels each or more), their interaction, and an optional
    additive blocking factor (e.g. the prompt). The same sums of squares as statsmodels'
    `anova_lm(ols("y ~ C(a) * C(b) [+ C(block)]").fit(), typ=2)`: every term is tested against the model
    holding all terms that do not contain it.

    Returns per term SS, df, F, p and partial eta^2 = SS / (SS + SS_residual); and, for 2 x 2 designs, the
    interaction contrast (mu_11 - mu_10) - (mu_01 - mu_00) with its t-based 95% CI."""
    from scipy import stats as sps

    y = np.asarray(y, float)
    a, b = np.asarray(a), np.asarray(b)
    one = np.ones((len(y), 1))
    A, B = _dummies(a), _dummies(b)
    AB = np.einsum("ni,nj->nij", A, B).reshape(len(y), -1)
    blk = _dummies(np.asarray(block)) if block is not None else np.zeros((len(y), 0))
    terms = {"A": A, "B": B, "A:B": AB, "block": blk} if block is not None else {"A": A, "B": B, "A:B": AB}

    def design(names):
        return np.hstack([one] + [terms[t] for t in names])

    full_names = list(terms)
    rss_full, rank_full, beta, X = _rss(design(full_names), y)
    df_resid = len(y) - rank_full
    ms_resid = rss_full / df_resid
    out = {}
    for t in full_names:
        others = [o for o in full_names if o != t and not (t in ("A", "B") and o == "A:B")]
        with_t = others + [t]
        rss_without, rank_without, *_ = _rss(design(others), y)
        rss_with, rank_with, *_ = _rss(design(with_t), y)
        ss, df = rss_without - rss_with, rank_with - rank_without
        f = (ss / df) / ms_resid
        out[t] = {"ss": ss, "df": df, "F": f, "p": float(sps.f.sf(f, df, df_resid)), "partial_eta_sq": ss / (ss + rss_full)}
    out["residual"] = {"ss": rss_full, "df": df_resid}
    if AB.shape[1] == 1:
        Xf = design(full_names)
        cov = ms_resid * np.linalg.pinv(Xf.T @ Xf)
        j = 1 + A.shape[1] + B.shape[1]                      # the A:B column
        est, se = float(beta[j]), float(np.sqrt(cov[j, j]))
        t_crit = sps.t.ppf(0.975, df_resid)
        out["interaction_contrast"] = {"estimate": est, "se": se, "ci": [est - t_crit * se, est + t_crit * se],
                                       "levels": {"a": np.unique(a).tolist(), "b": np.unique(b).tolist()}}
    return out


def benjamini_hochberg(p) -> np.ndarray:
    """BH-adjusted p-values (q-values): q_(i) = min_{j >= i} p_(j) m / j, capped at 1."""
    p = np.asarray(p, float)
    m = len(p)
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def two_way_anova_many(Y, a, b) -> dict:
    """two_way_anova (type II, no block) for every column of Y [n, m] at once: the design is shared, so each
    model's residual-maker matrix is built once. Returns arrays [m] per term: ss, F, p, partial_eta_sq, and
    the overall F of the full model against the intercept (for ranking by any effect)."""
    from scipy import stats as sps

    Y = np.asarray(Y, float)
    a, b = np.asarray(a), np.asarray(b)
    n = Y.shape[0]
    one = np.ones((n, 1))
    A, B = _dummies(a), _dummies(b)
    AB = np.einsum("ni,nj->nij", A, B).reshape(n, -1)

    def rss(*parts):
        X = np.hstack((one,) + parts)
        R = Y - X @ np.linalg.pinv(X) @ Y
        return (R * R).sum(0), int(np.linalg.matrix_rank(X))

    rss_full, r_full = rss(A, B, AB)
    rss_ab, r_ab = rss(A, B)
    rss_a, r_a = rss(A)
    rss_b, r_b = rss(B)
    rss_0 = ((Y - Y.mean(0)) ** 2).sum(0)
    df_resid = n - r_full
    ms_resid = np.maximum(rss_full / df_resid, 1e-300)
    out = {}
    for name, ss, df in (("A", rss_b - rss_ab, r_ab - r_b), ("B", rss_a - rss_ab, r_ab - r_a),
                         ("A:B", rss_ab - rss_full, r_full - r_ab), ("overall", rss_0 - rss_full, r_full - 1)):
        f = (ss / df) / ms_resid
        out[name] = {"ss": ss, "df": df, "F": f, "p": sps.f.sf(f, df, df_resid),
                     "partial_eta_sq": ss / np.maximum(ss + rss_full, 1e-300)}
    out["residual_df"] = df_resid
    return out
