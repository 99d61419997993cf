"""common/contexts.py: the held-out rows' tokens replayed from the text match the LM's collected rows; firing
statistics, top rows, quantile samples and context windows against direct computations."""
import numpy as np
import pytest
import torch

from common.contexts import (FiringStats, context_window, dense_columns, heldout_row_tokens, histogram, quantile_rows,
                             top_rows)
from common.data import DataSpec, collect_activations
from common.hooks import collect


@pytest.mark.parametrize("keep_bos", [False, True])
def test_row_tokens_follow_the_collected_rows(tiny_demo, tiny_lm, keep_bos):
    """Row r of the collected held-out stream is the LM's activation at (sequence seq[r], position pos[r]); the
    budget cuts mid-sequence as the collection does."""
    model, tok = tiny_lm
    spec = DataSpec(model=str(tiny_demo), layer=1, dataset=str(tiny_demo / "corpus.txt"), seq_len=24,
                    keep_bos=keep_bos, val_fraction=0.1)
    n = 777                                                      # not a multiple of a sequence's rows
    acts, docs = collect_activations(model, tok, spec, "validation", n, 8, store_dtype=torch.float32)
    rt = heldout_row_tokens(tok, spec, n)
    assert len(rt.seq) == acts.shape[0] == n and np.array_equal(rt.docs, docs.numpy())
    if not keep_bos:
        assert rt.pos.min() == 1
    for r in [0, 1, 57, 300, n - 1]:
        ids = torch.tensor([rt.sequences[rt.seq[r]]])
        h = collect(model, spec.layer, ids)[0, rt.pos[r]]
        assert torch.allclose(h, acts[r], atol=1e-5), r
        assert rt.tokens[r] == rt.sequences[rt.seq[r]][rt.pos[r]] and rt.row_at(int(rt.seq[r]), int(rt.pos[r])) == r
    assert rt.row_at(int(rt.seq[0]), 0) is None if not keep_bos else rt.row_at(int(rt.seq[0]), 0) == 0


def test_firing_stats_and_dense_columns_against_dense():
    g = torch.Generator().manual_seed(0)
    n, k, n_lat = 200, 4, 30
    idx = torch.stack([torch.randperm(n_lat, generator=g)[:k] for _ in range(n)])
    val = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) > 0.3)          # some zeros in the code
    dense = torch.zeros(n, n_lat).scatter_(1, idx, val)
    st = FiringStats(n_lat)
    st.add(idx[:120], val[:120])
    st.add(idx[120:], val[120:])
    assert st.n_rows == n
    on = dense > 0
    assert torch.equal(st.count, on.sum(0).double())
    assert torch.allclose(st.total, dense.double().sum(0)) and torch.allclose(st.max, dense.double().max(0).values)
    s = st.summary(3)
    assert s["frequency"] == pytest.approx(on[:, 3].float().mean().item())
    assert s["mean_activation"] == pytest.approx(dense[on[:, 3], 3].double().mean().item())
    feats = torch.tensor([3, 0, 29])
    assert torch.allclose(dense_columns(idx, val, feats), dense[:, feats])


def test_top_rows_quantiles_histogram_and_windows():
    acts = np.array([0, 3, 1, 0, 5, 3, 2, 0, 4, 1], dtype=np.float32)
    assert top_rows(acts, 3).tolist() == [4, 8, 1]                         # ties: the earlier row first
    bins = quantile_rows(acts, 2, 10, seed=0)
    assert [b for b, _ in bins] == [1, 2]
    assert sorted(bins[0][1].tolist()) == [1, 4, 5, 8] and sorted(bins[1][1].tolist()) == [2, 6, 9]
    one = quantile_rows(acts, 2, 1, seed=5)
    assert all(len(r) == 1 for _, r in one) and quantile_rows(acts, 2, 1, seed=5)[0][1] == one[0][1]  # seeded
    h = histogram(acts, bins=4)
    assert sum(h["counts"]) == 7 and h["edges"][0] == 1 and h["edges"][-1] == 5
    # two sequences of rows (BOS at position 0 not a row): windows stay inside their sequence
    from common.contexts import RowTokens
    seqs = [[1, 10, 11, 12], [1, 20, 21, 22, 23]]
    seq = np.array([0, 0, 0, 1, 1, 1, 1])
    pos = np.array([1, 2, 3, 1, 2, 3, 4])
    rt = RowTokens(seqs, seq, pos, np.array([10, 11, 12, 20, 21, 22, 23]), np.zeros(7, int), np.array([0, 3]))
    v = np.arange(7, dtype=np.float32)
    w = context_window(rt, 4, v, 2)                                        # row 4 = token 21 at position 2
    assert w == [(1, 0.0, False), (20, 3.0, False), (21, 4.0, True), (22, 5.0, False), (23, 6.0, False)]
    assert [t for t, _, _ in context_window(rt, 2, v, 5)] == [1, 10, 11, 12]
