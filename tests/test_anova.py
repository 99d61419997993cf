"""The project's two-way ANOVA and BH-FDR against statsmodels and a hand computation."""
import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests

from common.stats import benjamini_hochberg, two_way_anova


def _data(seed, n_per=12, blocks=0, unbalanced=False):
    rng = np.random.default_rng(seed)
    rows = []
    for a in ("formal", "casual"):
        for b in ("emotional", "neutral"):
            n = n_per + (rng.integers(0, 5) if unbalanced else 0)
            for i in range(n):
                blk = f"p{i % blocks}" if blocks else None
                y = (0.3 * (a == "formal") + 0.5 * (b == "neutral") + 0.4 * (a == "formal") * (b == "neutral")
                     + (0.2 * (i % blocks) if blocks else 0) + rng.normal(0, 1))
                rows.append((y, a, b, blk))
    return pd.DataFrame(rows, columns=["y", "a", "b", "block"])


@pytest.mark.parametrize("blocks,unbalanced", [(0, False), (0, True), (5, False)])
def test_two_way_anova_equals_statsmodels_typ2(blocks, unbalanced):
    df = _data(1 + blocks, blocks=blocks, unbalanced=unbalanced)
    formula = "y ~ C(a) * C(b)" + (" + C(block)" if blocks else "")
    ref = anova_lm(smf.ols(formula, df).fit(), typ=2)
    ours = two_way_anova(df.y, df.a, df.b, df.block if blocks else None)
    names = {"C(a)": "A", "C(b)": "B", "C(a):C(b)": "A:B", "C(block)": "block"}
    for sm, mine in names.items():
        if sm not in ref.index:
            continue
        row = ref.loc[sm]
        assert abs(ours[mine]["ss"] - row["sum_sq"]) < 1e-6
        assert ours[mine]["df"] == row["df"]
        assert abs(ours[mine]["F"] - row["F"]) < 1e-6
        assert abs(ours[mine]["p"] - row["PR(>F)"]) < 1e-6
        eta = row["sum_sq"] / (row["sum_sq"] + ref.loc["Residual", "sum_sq"])
        assert abs(ours[mine]["partial_eta_sq"] - eta) < 1e-6
    assert abs(ours["residual"]["ss"] - ref.loc["Residual", "sum_sq"]) < 1e-6


def test_interaction_contrast_and_ci():
    df = _data(3, n_per=20)
    ours = two_way_anova(df.y, df.a, df.b)
    m = df.groupby(["a", "b"]).y.mean()
    # reference levels are the first in sorted order: a = casual, b = emotional
    contrast = (m["formal", "neutral"] - m["formal", "emotional"]) - (m["casual", "neutral"] - m["casual", "emotional"])
    c = ours["interaction_contrast"]
    assert abs(c["estimate"] - contrast) < 1e-9
    fit = smf.ols("y ~ C(a) * C(b)", df).fit()
    lo, hi = fit.conf_int().loc["C(a)[T.formal]:C(b)[T.neutral]"]
    assert abs(c["ci"][0] - lo) < 1e-9 and abs(c["ci"][1] - hi) < 1e-9


def test_benjamini_hochberg_by_hand_and_statsmodels():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted: 0.005, 0.01, 0.03, 0.04, 0.5 -> *5/rank: 0.025, 0.025, 0.05, 0.05, 0.5 (already monotone)
    expected = np.array([0.025, 0.05, 0.05, 0.025, 0.5])
    assert np.allclose(benjamini_hochberg(p), expected)
    rng = np.random.default_rng(0)
    p = rng.random(200) ** 3
    assert np.allclose(benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1])


def test_vectorised_anova_equals_the_single_one():
    from common.stats import two_way_anova_many
    df = _data(7, unbalanced=True)
    rng = np.random.default_rng(0)
    Y = np.column_stack([df.y, rng.normal(size=len(df)), df.y * 2 + 1])
    many = two_way_anova_many(Y, df.a, df.b)
    for j in range(Y.shape[1]):
        one = two_way_anova(Y[:, j], df.a, df.b)
        for t in ("A", "B", "A:B"):
            for k in ("ss", "F", "p", "partial_eta_sq"):
                assert abs(many[t][k][j] - one[t][k]) < 1e-8 * max(1, abs(one[t][k])), (t, k)
    fit = smf.ols("y ~ C(a) * C(b)", df).fit()
    assert abs(many["overall"]["F"][0] - fit.fvalue) < 1e-6 and abs(many["overall"]["p"][0] - fit.f_pvalue) < 1e-9
