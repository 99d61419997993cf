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
