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


def _dense_code(idx, val, n):
    """The dense [batch, n] code as a differentiable function of val (for val's gradient)."""
    return torch.zeros(idx.shape[0], n, dtype=val.dtype).scatter(1, idx, val)


def test_gradient_wrt_code_values_matches_dense():
    """The joint model trains the encoder through val: _WeightedBag's and _BiInteraction's val gradients."""
    nfm, idx, val, _ = _setup()
    target = torch.randn(7, 12, dtype=torch.float64)
    for paths in (("linear", "interaction"), ("linear",), ("interaction",)):
        v_sparse = val.clone().requires_grad_()
        ((nfm(idx, v_sparse, paths) - target) ** 2).sum().backward()
        v_dense = val.clone().requires_grad_()
        ((nfm.forward_dense(_dense_code(idx, v_dense, 40), paths) - target) ** 2).sum().backward()
        assert torch.allclose(v_sparse.grad, v_dense.grad, atol=1e-10), paths


def test_custom_functions_pass_gradcheck():
    """Numerical vs analytic gradients of both custom functions, through autograd.grad (no .grad writes)."""
    from common.nfm import _BiInteraction
    from common.sparse import _WeightedBag
    from common.sparse import TransposedCode

    nfm, idx, val, _ = _setup()
    v = val.clone().requires_grad_()
    table = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, t: _WeightedBag.apply(idx, v, t, TransposedCode(idx, v, 40)),
                                    (v, table))
    assert torch.autograd.gradcheck(
        lambda v, t: _BiInteraction.apply(idx, v, t, TransposedCode(idx, v, 40), False), (v, table))
    assert torch.autograd.gradcheck(
        lambda v, t: _BiInteraction.apply(idx, v, t, TransposedCode(idx, v, 40), True), (v, table))
    assert table.grad is None


def test_table_gradients_reuse_one_buffer_across_steps():
    """W_lin.grad / V.grad are written in place into reused buffers: each step's gradient must still be
    exactly that step's (rows of features that fired only in the previous step are zero again)."""
    nfm, _, _, _ = _setup()
    target = torch.randn(7, 12, dtype=torch.float64)
    grads = {}
    for step, features in enumerate((torch.arange(0, 20), torch.arange(20, 40))):   # disjoint features
        idx = torch.stack([features[torch.randperm(20)[:5]] for _ in range(7)])
        val = torch.rand(7, 5, dtype=torch.float64) + 0.1
        nfm.zero_grad(set_to_none=True)
        ((nfm(idx, val) - target) ** 2).sum().backward()
        got = {n: p.grad.clone() for n, p in nfm.named_parameters()}
        for n in ("W_lin", "V"):
            assert grads.get(n) is None or getattr(nfm, n).grad is grads[n]    # the same buffer
            grads[n] = getattr(nfm, n).grad
        nfm.zero_grad(set_to_none=True)
        ((nfm.forward_dense(_dense_code(idx, val, 40)) - target) ** 2).sum().backward()
        for n, p in nfm.named_parameters():
            assert torch.allclose(got[n], p.grad, atol=1e-10), (step, n)
    nfm.eval()                                                                     # releases the buffers
    from common.sparse import _TABLE_BUFFERS
    assert nfm.W_lin not in _TABLE_BUFFERS and nfm.V not in _TABLE_BUFFERS


def test_table_gradients_accumulate_and_respect_hooks_and_autograd_grad():
    nfm, idx, val, f = _setup()
    target = torch.randn(7, 12, dtype=torch.float64)

    def loss_sparse():
        return ((nfm(idx, val) - target) ** 2).sum()

    nfm.zero_grad(set_to_none=True)
    ((nfm.forward_dense(f) - target) ** 2).sum().backward()
    ref = {n: p.grad.clone() for n, p in nfm.named_parameters()}

    # two backwards without zeroing: the second is accumulated by autograd onto the first
    nfm.zero_grad(set_to_none=True)
    loss_sparse().backward()
    loss_sparse().backward()
    for n, p in nfm.named_parameters():
        assert torch.allclose(p.grad, 2 * ref[n], atol=1e-10), n

    # autograd.grad returns the gradients and leaves .grad alone
    nfm.zero_grad(set_to_none=True)
    g_lin, g_v = torch.autograd.grad(loss_sparse(), (nfm.W_lin, nfm.V))
    assert nfm.W_lin.grad is None and nfm.V.grad is None
    assert torch.allclose(g_lin, ref["W_lin"], atol=1e-10) and torch.allclose(g_v, ref["V"], atol=1e-10)

    # a hook on the table sees the gradient
    seen = []
    h = nfm.W_lin.register_hook(lambda g: seen.append(g.clone()))
    loss_sparse().backward()
    h.remove()
    assert len(seen) == 1 and torch.allclose(seen[0], ref["W_lin"], atol=1e-10)
    assert torch.allclose(nfm.W_lin.grad, ref["W_lin"], atol=1e-10)


def test_sparse_evaluation_builds_no_table_buffers():
    from common.nfm import predict
    from common.sparse import _TABLE_BUFFERS

    nfm, idx, val, f = _setup()
    nfm.eval()
    out = predict(nfm, idx, val)
    assert torch.allclose(out, nfm.forward_dense(f), atol=1e-12)
    assert nfm.W_lin not in _TABLE_BUFFERS and nfm.V not in _TABLE_BUFFERS


def test_grad_buffer_reuse_can_be_switched_off(monkeypatch):
    """Under DDP the in-place gradient write must be off: then every step gets a fresh gradient tensor,
    still equal to the dense reference's."""
    import common.sparse as sparse_mod
    monkeypatch.setattr(sparse_mod, "REUSE_GRAD_BUFFERS", False)
    nfm, idx, val, _ = _setup()
    target = torch.randn(idx.shape[0], 12, dtype=torch.float64)
    seen = []
    for _ in range(2):
        nfm.zero_grad(set_to_none=True)
        ((nfm(idx, val) - target) ** 2).sum().backward()
        seen.append(nfm.W_lin.grad)
    assert seen[0] is not seen[1]
    got = nfm.W_lin.grad.clone()
    nfm.zero_grad(set_to_none=True)
    ((nfm.forward_dense(_dense_code(idx, val, nfm.cfg.n_features)) - target) ** 2).sum().backward()
    assert torch.allclose(got, nfm.W_lin.grad, atol=1e-10)


def test_fit_releases_the_reused_gradient_buffers_of_any_model():
    """common.train.fit drops the sparse tables' reused gradient buffers when training ends, for every model (the
    KL adapter has no train(False) of its own that would: at the paper's shapes its buffer is 640 MB)."""
    from common.kl_adapter import LinearAdapter
    from common.sparse import _TABLE_BUFFERS
    from common.train import fit
    torch.manual_seed(0)
    ad = LinearAdapter(40, 6)
    idx, val = torch.randint(0, 40, (64, 4)), torch.rand(64, 4)
    x, y = torch.randn(64, 6), torch.randn(64, 6)

    def step_loss(rows):
        loss = (ad(x[rows], idx[rows], val[rows]) - y[rows]).pow(2).mean()
        return loss, {}
    seen = []
    fit(ad, 64, 16, 3, 1e-2, step_loss, lambda: {"val_loss": 0.0}, 3, 0, "t",
        after_step=lambda: seen.append(ad.B in _TABLE_BUFFERS))
    assert any(seen)                                   # the buffer was in use while training
    assert ad.B not in _TABLE_BUFFERS and ad.B.grad is None
