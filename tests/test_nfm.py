"""NFM: sparse embedding-bag pooling == dense formula == explicit pairwise sum; paths and gradients."""
import itertools

import torch

from common.nfm import NFM, NFMConfig


def _setup(seed=0):
    torch.manual_seed(seed)
    nfm = NFM(NFMConfig(n_features=40, d=12, dim=6, hidden=5, dropout=0.0)).double()
    with torch.no_grad():
        nfm.W_lin.normal_(0, 0.1)
    B, k = 7, 5
    idx = torch.stack([torch.randperm(40)[:k] for _ in range(B)])
    val = torch.rand(B, k, dtype=torch.float64) * 2
    f = torch.zeros(B, 40, dtype=torch.float64).scatter(1, idx, val)
    return nfm, idx, val, f


def test_bi_interaction_equals_pairwise_sum_and_dense_formula():
    nfm, idx, val, f = _setup()
    p = nfm.bi_interaction(idx, val)
    V = nfm.V
    for b in range(idx.shape[0]):
        pair = sum(val[b, i] * val[b, j] * V[idx[b, i]] * V[idx[b, j]]
                   for i, j in itertools.combinations(range(idx.shape[1]), 2))
        assert torch.allclose(p[b], pair, atol=1e-12)
    dense = 0.5 * ((f @ V) ** 2 - (f * f) @ (V * V))
    assert torch.allclose(p, dense, atol=1e-12)


def test_one_active_feature_has_zero_interaction():
    nfm, idx, val, f = _setup()
    assert torch.allclose(nfm.bi_interaction(idx[:, :1], val[:, :1]), torch.zeros(7, 6, dtype=torch.float64))


def test_sparse_and_dense_forward_and_gradients_agree():
    nfm, idx, val, f = _setup()
    target = torch.randn(7, 12, dtype=torch.float64)
    for paths in (("linear", "interaction"), ("linear",), ("interaction",)):
        nfm.zero_grad()
        out = nfm(idx, val, paths)
        ((out - target) ** 2).sum().backward()
        g_sparse = {n: None if p.grad is None else p.grad.clone() for n, p in nfm.named_parameters()}
        nfm.zero_grad()
        out_dense = nfm.forward_dense(f, paths)
        ((out_dense - target) ** 2).sum().backward()
        assert torch.allclose(out, out_dense, atol=1e-12)
        for n, p in nfm.named_parameters():
            if p.grad is None:
                assert g_sparse[n] is None or g_sparse[n].abs().max() == 0
            else:
                assert torch.allclose(g_sparse[n], p.grad, atol=1e-10), (paths, n)


def test_paths_add_up_and_hidden_is_pre_relu():
    nfm, idx, val, f = _setup()
    with torch.no_grad():
        nfm.mlp1.bias.fill_(-0.5)
        both = nfm(idx, val)
        assert torch.allclose(both, nfm.linear(idx, val) + nfm.interaction(idx, val))
        u = nfm.hidden(idx, val)
        assert (u < 0).any()      # before the ReLU
        assert torch.allclose(nfm.interaction_from_hidden(u), nfm.interaction(idx, val))


def test_param_counts():
    nfm = NFM(NFMConfig(n_features=100, d=8, dim=4, hidden=3))
    c = nfm.param_counts()
    assert c["linear"] == 100 * 8 + 8
    assert c["interaction"] == 100 * 4 + (4 * 3 + 3) + (3 * 8 + 8)
    assert c["total"] == sum(p.numel() for p in nfm.parameters())


def test_untrained_nfm_linear_path_is_zero():
    nfm, idx, val, _ = _setup()
    fresh = NFM(NFMConfig(n_features=40, d=12, dim=6, hidden=5))
    assert fresh.linear(idx, val.float()).abs().max() == 0
