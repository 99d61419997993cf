"""Statistics with the independent unit as the unit: tokens of one document are correlated, so resampling and
tests over held-out text treat each document as one observation (the reference ran t-tests over millions of
tokens as if independent); in the clamping experiment the units are the bucket *words* and the *prompts*.

  ratio_of_sums_ci       sum over docs / sum over docs (a mean per token, or a ratio of two variants' means),
                         CI by the percentile bootstrap over docs
  paired_difference      two variants measured on the same tokens: mean difference per token with a bootstrap
                         CI over documents, and a paired t-test over the per-document means
  two_way_anova          type-II 2-way ANOVA (+ optional block) of one response; two_way_anova_many for many
  benjamini_hochberg     BH-FDR q-values
  crossed_contrasts      words x prompts (Clark 1973): every word (item) is measured under every prompt
                         (subject), factors A and B vary between words. By-word test (F1: the 2x2 ANOVA on each
                         word's mean over prompts), by-prompt test (F2: each prompt's contrast over words, tested
                         across prompts), min F' = F1 F2 / (F1 + F2); the headline p is the largest of the three
  permutation_anova_many the type-II F of A, B and A x B (+ block) for many responses, with permutation p-values:
                         the 2x2 labels permuted within blocks, p = (1 + #{F_perm >= F}) / (1 + n_perm)

Interaction contrasts always use the *declared* level order (levels_a[0], levels_a[1]; levels_b[0], levels_b[1]):
    contrast(A:B) = (m00 - m01) - (m10 - m11),  contrast(A) = (m00 + m01 - m10 - m11) / 2,
    contrast(B) = (m00 - m01 + m10 - m11) / 2,  m_ij = mean of cell (levels_a[i], levels_b[j]).
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


def _dummies(labels: np.ndarray, levels=None) -> np.ndarray:
    """Treatment coding with the first level as reference: [n, n_levels - 1]. `levels` gives the declared
    order; without it the sorted order is used (for blocks, whose order does not matter)."""
    levels = list(levels) if levels is not None else list(np.unique(labels))
    return (labels[:, None] == np.asarray(levels[1:], dtype=object)[None, :]).astype(float)


def _declared(labels: np.ndarray, levels) -> list:
    levels = list(levels) if levels is not None else list(np.unique(labels))
    unknown = set(np.unique(labels).tolist()) - set(levels)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the declared levels {levels}")
    return levels


def two_way_anova(y, a, b, block=None, levels_a=None, levels_b=None) -> dict:
    """Type II two-way ANOVA of y on factors a, b (2 levels each or more), their interaction, and an optional
    additive blocking factor (e.g. the prompt). The same sums of squares as statsmodels'
    `anova_lm(ols("y ~ C(a) * C(b) [+ C(block)]").fit(), typ=2)`: every term is tested against the model
    holding all terms that do not contain it.

    Returns per term SS, df, F, p and partial eta^2 = SS / (SS + SS_residual); and, for 2 x 2 designs, the
    interaction contrast (m00 - m01) - (m10 - m11) in the declared level order (levels_a, levels_b; sorted
    order when not given) with its t-based 95% CI."""
    from scipy import stats as sps

    y = np.asarray(y, float)
    a, b = np.asarray(a), np.asarray(b)
    la, lb = _declared(a, levels_a), _declared(b, levels_b)
    one = np.ones((len(y), 1))
    A, B = _dummies(a, la), _dummies(b, lb)
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
        # with the declared first levels as reference, the A:B coefficient is m11 - m10 - m01 + m00
        Xf = design(full_names)
        cov = ms_resid * np.linalg.pinv(Xf.T @ Xf)
        j = 1 + A.shape[1] + B.shape[1]                      # the A:B column
        est, se = float(beta[j]), float(np.sqrt(cov[j, j]))
        t_crit = sps.t.ppf(0.975, df_resid)
        out["interaction_contrast"] = {"estimate": est, "se": se, "ci": [est - t_crit * se, est + t_crit * se],
                                       "levels": {"a": la, "b": lb},
                                       "definition": "(m00 - m01) - (m10 - m11), m_ij = mean of (levels a[i], b[j])"}
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


def two_way_anova_many(Y, a, b, block=None) -> dict:
    """two_way_anova (type II, optional additive block) for every column of Y [n, m] at once: the design is
    shared, so each model's residual-maker matrix is built once. Returns arrays [m] per term: ss, F, p,
    partial_eta_sq, and the overall F of the A x B model (+ block) against the block-only model (for ranking
    by any effect)."""
    from scipy import stats as sps

    Y = np.asarray(Y, float)
    a, b = np.asarray(a), np.asarray(b)
    n = Y.shape[0]
    base = np.hstack([np.ones((n, 1)), _dummies(np.asarray(block)) if block is not None else np.zeros((n, 0))])
    A, B = _dummies(a), _dummies(b)
    AB = np.einsum("ni,nj->nij", A, B).reshape(n, -1)

    def rss(*parts):
        X = np.hstack((base,) + parts)
        R = Y - X @ (np.linalg.pinv(X) @ Y)
        return (R * R).sum(0), int(np.linalg.matrix_rank(X))

    rss_full, r_full = rss(A, B, AB)
    rss_ab, r_ab = rss(A, B)
    rss_a, r_a = rss(A)
    rss_b, r_b = rss(B)
    rss_0, r_0 = rss()
    df_resid = n - r_full
    ms_resid = np.maximum(rss_full / df_resid, 1e-300)
    out = {}
    for name, ss, df in (("A", rss_b - rss_ab, r_ab - r_b), ("B", rss_a - rss_ab, r_ab - r_a),
                         ("A:B", rss_ab - rss_full, r_full - r_ab), ("overall", rss_0 - rss_full, r_full - r_0)):
        f = (ss / df) / ms_resid
        out[name] = {"ss": ss, "df": df, "F": f, "p": sps.f.sf(f, df, df_resid),
                     "partial_eta_sq": ss / np.maximum(ss + rss_full, 1e-300)}
    out["residual_df"] = df_resid
    return out


# ------------------------------------------------------------------------- permutation tests (part8)

def permute_within_blocks(block: np.ndarray, n_perm: int, seed: int) -> np.ndarray:
    """[n_perm, n] index arrays, each a uniformly random permutation of the rows that moves rows only within
    their block (the identity blocking when block is None). Row i's labels under permutation p are
    labels[perm[p, i]]."""
    n = len(block)
    rng = np.random.default_rng(seed)
    perms = np.tile(np.arange(n), (n_perm, 1))
    for blk in np.unique(block):
        rows = np.nonzero(block == blk)[0]
        perms[:, rows] = rows[rng.permuted(np.tile(np.arange(len(rows)), (n_perm, 1)), axis=1)]
    return perms


def _balanced_within_blocks(cell: np.ndarray, block: np.ndarray) -> bool:
    """Every block holds the same number of rows of each of the 4 cells (then A, B, A:B and block are
    orthogonal, every sum of squares comes from cell means, and within-block permutations keep it so)."""
    for blk in np.unique(block):
        counts = np.bincount(cell[block == blk], minlength=4)
        if counts.min() == 0 or counts.min() != counts.max():
            return False
    return True


def _balanced_ss(Y: np.ndarray, cells: np.ndarray) -> dict:
    """SS of A, B, A:B for cell assignments `cells` [P, n] (values 0..3 = a0b0, a0b1, a1b0, a1b1) of a design
    balanced within blocks, from the cell means: SS_A = n dA^2 / 4, SS_B = n dB^2 / 4, SS_AB = n c^2 / 16
    (dA, dB, c the contrasts of the module docstring). Returns {term: [P, m]}."""
    P, n = cells.shape
    onehot = np.zeros((P, 4, n))
    np.put_along_axis(onehot, cells[:, None, :], 1.0, axis=1)
    means = (onehot.reshape(P * 4, n) @ Y).reshape(P, 4, -1) / (n / 4)         # [P, 4, m] cell means
    m00, m01, m10, m11 = means[:, 0], means[:, 1], means[:, 2], means[:, 3]
    return {"A": n * ((m00 + m01 - m10 - m11) / 2) ** 2 / 4, "B": n * ((m00 - m01 + m10 - m11) / 2) ** 2 / 4,
            "A:B": n * (m00 - m01 - m10 + m11) ** 2 / 16}


def _balanced_anova(Y: np.ndarray, cell: np.ndarray, blk: np.ndarray) -> tuple[dict, np.ndarray, int]:
    """Type-II ANOVA (A, B, A:B + block) of every column of Y for a design balanced within blocks, in closed
    form. Returns (results as two_way_anova_many's, SS free of the block effect, residual df): the block SS
    and the total SS do not change when labels are permuted within blocks, so permutations reuse them."""
    from scipy import stats as sps

    n = Y.shape[0]
    blocks = np.unique(blk)
    df_resid = n - 4 - (len(blocks) - 1)
    grand = Y.mean(0)
    ss_block = sum((blk == x).sum() * (Y[blk == x].mean(0) - grand) ** 2 for x in blocks)
    ss_free = ((Y - grand) ** 2).sum(0) - ss_block
    ss = {t: v[0] for t, v in _balanced_ss(Y, cell[None]).items()}
    rss = np.maximum(ss_free - ss["A"] - ss["B"] - ss["A:B"], 0.0)
    ms = np.maximum(rss / df_resid, 1e-300)
    out = {}
    for t, df in (("A", 1), ("B", 1), ("A:B", 1)):
        f = ss[t] / ms
        out[t] = {"ss": ss[t], "df": df, "F": f, "p": sps.f.sf(f, df, df_resid),
                  "partial_eta_sq": ss[t] / np.maximum(ss[t] + rss, 1e-300)}
    ss_all = ss["A"] + ss["B"] + ss["A:B"]
    out["overall"] = {"ss": ss_all, "df": 3, "F": ss_all / 3 / ms, "p": sps.f.sf(ss_all / 3 / ms, 3, df_resid),
                      "partial_eta_sq": ss_all / np.maximum(ss_all + rss, 1e-300)}
    out["residual_df"] = df_resid
    return out, ss_free, df_resid


def permutation_anova_many(Y, a, b, levels_a, levels_b, block=None, n_perm: int = 1999, seed: int = 0,
                           chunk: int = 250, closed_form: bool | None = None) -> dict:
    """Type-II F of A, B and A:B (with `block` as an additive factor when given) for every column of Y [n, m],
    with permutation p-values: the 2x2 labels are permuted within blocks, p = (1 + #{F_perm >= F}) /
    (1 + n_perm), which stays valid for zero-heavy, skewed responses where the F distribution does not.

    A design balanced within blocks (the usual stimulus set) uses closed forms on cell means, one matrix
    product per chunk of permutations; any other design refits the type-II ANOVA per permutation (slower;
    `closed_form=False` forces that path, for the equivalence test). Returns {term: {"F", "p_F", "partial_eta_sq", "p_perm"}} with arrays [m] for A, B, A:B, "overall"
    ({"F", "p_F"}), plus n_perm, the smallest attainable p and which path was taken."""
    Y = np.asarray(Y, float)
    a, b = np.asarray(a), np.asarray(b)
    n, m = Y.shape
    blk = np.asarray(block) if block is not None else np.zeros(n, dtype=int)
    cell = 2 * (a == levels_a[1]).astype(int) + (b == levels_b[1]).astype(int)
    fast = _balanced_within_blocks(cell, blk) if closed_form is None else closed_form
    if fast and not _balanced_within_blocks(cell, blk):
        raise ValueError("closed_form=True needs a design balanced within blocks")
    exact = _balanced_anova(Y, cell, blk)[0] if fast else two_way_anova_many(Y, a, b, block)
    perms = permute_within_blocks(blk, n_perm, seed)
    exceed = {t: np.zeros(m) for t in ("A", "B", "A:B")}
    observed = {t: exact[t]["F"] for t in exceed}
    if fast:
        _, ss_free, df_resid = _balanced_anova(Y, cell, blk)
        for s in range(0, n_perm, chunk):
            ss = _balanced_ss(Y, cell[perms[s:s + chunk]])
            ms = np.maximum((ss_free - ss["A"] - ss["B"] - ss["A:B"]) / df_resid, 1e-300)
            for t in exceed:
                exceed[t] += (ss[t] / ms >= observed[t][None] * (1 - 1e-9)).sum(0)
    else:
        for pr in perms:
            f = two_way_anova_many(Y, a[pr], b[pr], block)
            for t in exceed:
                exceed[t] += f[t]["F"] >= observed[t] * (1 - 1e-9)
    out = {t: {"F": exact[t]["F"], "p_F": exact[t]["p"], "partial_eta_sq": exact[t]["partial_eta_sq"],
               "p_perm": (1 + exceed[t]) / (1 + n_perm)} for t in exceed}
    out["overall"] = {"F": exact["overall"]["F"], "p_F": exact["overall"]["p"]}
    out.update({"n_perm": n_perm, "min_attainable_p": 1 / (1 + n_perm), "balanced_within_blocks": fast})
    return out


def n_perm_for_fdr(m: int, q: float = 0.05, floor: int = 1999, cap: int = 50_000) -> int:
    """Permutations enough that the smallest attainable p, 1 / (1 + n), lies below BH's first threshold q / m
    (with a floor, and a cap that bounds the time at large m)."""
    return int(min(cap, max(floor, int(np.ceil(m / q)))))


# ----------------------------------------------------------------- words x prompts (part9, Clark 1973)

CONTRAST_WEIGHTS = {"A": np.array([1, 1, -1, -1]) / 2, "B": np.array([1, -1, 1, -1]) / 2,
                    "A:B": np.array([1, -1, -1, 1], dtype=float)}        # over cells a0b0, a0b1, a1b0, a1b1


def _min_f_prime(f1: float, df1: float, f2: float, df2: float) -> tuple[float, float]:
    """Clark (1973): min F' = F1 F2 / (F1 + F2), denominator df (F1 + F2)^2 / (F1^2 / df2 + F2^2 / df1),
    where df1 and df2 are the denominator df of F1 and F2. A lower bound on the quasi-F."""
    if f1 + f2 <= 0:
        return 0.0, float(min(df1, df2))
    return f1 * f2 / (f1 + f2), (f1 + f2) ** 2 / (f1 ** 2 / df2 + f2 ** 2 / df1)


def crossed_contrasts(Y, a, b, levels_a, levels_b, alpha: float = 0.05) -> dict:
    """Tests of A, B and A:B when every word (item) is measured under every prompt (subject) and the factors vary
    between words: Y [n_prompts, n_words] (e.g. logit changes), a, b [n_words] the words' levels.

      by_word    F1: each word's mean over prompts; the contrast of the four cell means of those word means,
                 tested against the between-word variance (df 1, n_words - 4)
      by_prompt  F2: per prompt, the same contrast of its four cell means over words; one-sample t across
                 prompts, F = t^2 (df 1, n_prompts - 1)
      min_F      min F' of the two; the headline p is the largest of the three p values, and the headline CI
                 uses se^2 = se_word^2 + se_prompt^2 (min F' = estimate^2 / that se^2) with min F's df
    The estimate is the same for both (a linear contrast of a [prompt, word] table), in the declared order."""
    from scipy import stats as sps

    Y = np.asarray(Y, float)
    a, b = np.asarray(a), np.asarray(b)
    n_p, n_w = Y.shape
    cell = 2 * (a == levels_a[1]).astype(int) + (b == levels_b[1]).astype(int)
    ok = np.isin(a, levels_a) & np.isin(b, levels_b)
    counts = np.bincount(cell[ok], minlength=4)
    if not ok.all() or counts.min() < 2 or n_p < 2:
        raise ValueError(f"need every word in a declared cell, >= 2 words per cell and >= 2 prompts (cells {counts.tolist()}, prompts {n_p})")
    word_means = Y.mean(0)                                                   # [n_words]
    cell_of_word = [np.nonzero(cell == c)[0] for c in range(4)]
    cm_word = np.array([word_means[ix].mean() for ix in cell_of_word])        # [4]
    resid = np.concatenate([word_means[ix] - word_means[ix].mean() for ix in cell_of_word])
    df_w = n_w - 4
    ms_w = float(resid @ resid) / df_w
    cm_prompt = np.stack([Y[:, ix].mean(1) for ix in cell_of_word], 1)       # [n_prompts, 4]
    out = {}
    for term, w in CONTRAST_WEIGHTS.items():
        est = float(w @ cm_word)
        se_w = float(np.sqrt(ms_w * np.sum(w ** 2 / counts)))
        per_prompt = cm_prompt @ w                                           # [n_prompts]
        se_p = float(per_prompt.std(ddof=1) / np.sqrt(n_p))
        f1 = est ** 2 / max(se_w ** 2, 1e-300)
        f2 = est ** 2 / max(se_p ** 2, 1e-300)
        p1, p2 = float(sps.f.sf(f1, 1, df_w)), float(sps.f.sf(f2, 1, n_p - 1))
        fm, dfm = _min_f_prime(f1, df_w, f2, n_p - 1)
        pm = float(sps.f.sf(fm, 1, dfm))
        se = float(np.sqrt(se_w ** 2 + se_p ** 2))
        tc = float(sps.t.ppf(1 - alpha / 2, dfm))
        ss = est ** 2 / np.sum(w ** 2 / counts)
        out[term] = {"p": max(p1, p2, pm), "F": fm, "estimate": est, "se": se, "ci": [est - tc * se, est + tc * se],
                     "partial_eta_sq": float(ss / (ss + resid @ resid)),
                     "by_word": {"F": f1, "df": [1, df_w], "p": p1, "se": se_w},
                     "by_prompt": {"F": f2, "df": [1, n_p - 1], "p": p2, "se": se_p},
                     "min_F_prime": {"F": fm, "df": [1, dfm], "p": pm}}
    out["cell_means"] = cm_word.tolist()
    out["n_words_per_cell"] = counts.tolist()
    out["n_prompts"] = n_p
    return out


def reference_clamping_anova(Y, a, b, levels_a, levels_b) -> dict:
    """The original study's clamping statistics (part13, original_study.md §10.3), for --defects
    pseudo-replicated-anova: every (prompt, word) value of Y [n_prompts, n_words] is one observation, listed
    prompt by prompt. A's "F": a one-way ANOVA of all level-0 values against all level-1 values (B's likewise);
    the "interaction F": within each level of A, the i-th value of the b0 cell paired with the i-th value of the
    b1 cell by list position, and a one-way ANOVA of those differences between A's two levels, F(1, 2m - 2);
    effects are absolute differences of cell means. It treats repeated measurements of the same words and prompts
    as independent: tests/test_stats_design.py shows it rejects a true null far more often than its level."""
    from scipy import stats as sps

    Y = np.asarray(Y, float)
    a, b = np.asarray(a), np.asarray(b)
    obs = lambda m: Y[:, m].reshape(-1)                    # noqa: E731  prompt by prompt, the reference's order
    cell = {(la, lb): obs((a == la) & (b == lb)) for la in levels_a for lb in levels_b}
    out = {}
    for term, levels, col in (("A", levels_a, a), ("B", levels_b, b)):
        F, p = sps.f_oneway(obs(col == levels[0]), obs(col == levels[1]))
        out[term] = {"F": float(F), "p": float(p),
                     "effect": float(abs(obs(col == levels[0]).mean() - obs(col == levels[1]).mean()))}
    diffs = []
    for la in levels_a:
        hi, lo = cell[(la, levels_b[0])], cell[(la, levels_b[1])]
        m = min(len(hi), len(lo))                          # zip() in the reference: the shorter list decides
        diffs.append(hi[:m] - lo[:m])
    F, p = sps.f_oneway(*diffs)
    m0 = {k: v.mean() for k, v in cell.items()}
    out["A:B"] = {"F": float(F), "p": float(p), "df": [1, len(diffs[0]) + len(diffs[1]) - 2],
                  "effect": float(abs((m0[(levels_a[0], levels_b[0])] - m0[(levels_a[0], levels_b[1])])
                                      - (m0[(levels_a[1], levels_b[0])] - m0[(levels_a[1], levels_b[1])])))}
    return out


def reduction_and_share_ci(base, full, part, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Per-document sums of one loss (e.g. KL) of three variants on the same tokens: the relative reduction of the
    full model against the base, 1 - sum(full) / sum(base), that of a part (e.g. one path alone), and the part's
    share of the full reduction, reduction(part) / reduction(full) (the original study's "the nonlinear component
    alone achieved 16.5% of the total improvement"). 95% CIs by one bootstrap over documents for all three."""
    base, full, part = (np.asarray(v, float) for v in (base, full, part))
    b = _boot_indices(len(base), n_boot, seed)
    den = np.maximum(base[b].sum(1), 1e-300)
    r_full, r_part = 1 - full[b].sum(1) / den, 1 - part[b].sum(1) / den
    share = r_part / np.where(r_full == 0, np.nan, r_full)
    q = lambda v: [float(x) for x in np.nanquantile(v, [alpha / 2, 1 - alpha / 2])]   # noqa: E731
    pf, pp = 1 - full.sum() / base.sum(), 1 - part.sum() / base.sum()
    return {"reduction_full": float(pf), "reduction_full_ci": q(r_full), "reduction_part": float(pp),
            "reduction_part_ci": q(r_part), "share": float(pp / pf) if pf != 0 else float("nan"),
            "share_ci": q(share)}
