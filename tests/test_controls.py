"""The control ladder (common/controls.py) against known answers: ridge against a least-squares solve, the
sparse MLP against its dense formula, parameter matching, and the document-level bootstrap."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common import controls
from common.metrics import residual_reduction


def _regression(n=600, d_in=12, d_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * torch.linspace(0.2, 3, d_in) + 1.5
    W = torch.randn(d_in, d_out, generator=g)
    y = x @ W + 0.7 + 0.3 * torch.randn(n, d_out, generator=g)
    return x, y


def test_ridge_without_penalty_is_least_squares_with_intercept():
    x, y = _regression()
    model, info = controls.fit_ridge(x[:500], y[:500], x[500:], y[500:], lambdas=(0.0,))
    X1 = torch.cat([x[:500].double(), torch.ones(500, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(X1, y[:500].double()).solution
    assert torch.allclose(model.W.double(), sol[:-1], atol=1e-4)
    assert torch.allclose(model.b.double(), sol[-1], atol=1e-4)
    assert info["lambda"] == 0.0


def test_ridge_with_penalty_is_the_closed_form_and_lambda_is_picked_on_selection_rows():
    x, y = _regression(seed=1)
    lam = 0.1
    model, info = controls.fit_ridge(x[:500], y[:500], x[500:], y[500:], lambdas=(lam,))
    xc, yc = x[:500].double() - x[:500].double().mean(0), y[:500].double() - y[:500].double().mean(0)
    n = 500
    s = float((xc.T @ xc / n).diagonal().mean())
    # argmin_W ||yc - xc W||^2 / n + lam s ||W||^2, written as an augmented least-squares problem
    aug_x = torch.cat([xc / n ** 0.5, (lam * s) ** 0.5 * torch.eye(12, dtype=torch.float64)])
    aug_y = torch.cat([yc / n ** 0.5, torch.zeros(12, 5, dtype=torch.float64)])
    W = torch.linalg.lstsq(aug_x, aug_y).solution
    assert torch.allclose(model.W.double(), W, atol=1e-5)
    # over a grid, the kept lambda has the lowest selection MSE, and that MSE is the kept model's
    model, info = controls.fit_ridge(x[:500], y[:500], x[500:], y[500:])
    scores = info["selection_mse_by_lambda"]
    assert info["lambda"] == float(min(scores, key=scores.get))
    assert abs(scores[f"{info['lambda']:g}"] - float((model(x[500:]) - y[500:]).pow(2).mean())) < 1e-6


def test_ridge_statistics_stream_over_batches():
    x, y = _regression(seed=2)
    a, _ = controls.fit_ridge(x, y, x[:50], y[:50], lambdas=(1e-3,), batch=7)
    b, _ = controls.fit_ridge(x, y, x[:50], y[:50], lambdas=(1e-3,), batch=100_000)
    assert torch.allclose(a.W, b.W, atol=1e-6) and torch.allclose(a.b, b.b, atol=1e-6)


def _code(batch=32, k=5, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])
    val = torch.rand(batch, k, generator=g) * (torch.rand(batch, k, generator=g) > 0.2)
    dense = torch.zeros(batch, n).scatter_(1, idx, val)
    return idx, val, dense


def test_code_mlp_sparse_path_equals_dense_formula_and_gradient():
    torch.manual_seed(0)
    m = controls.CodeMLP(40, 6, 9)
    idx, val, dense = _code()
    target = torch.randn(32, 6)
    out = m(idx, val)
    assert torch.allclose(out, m.forward_dense(dense), atol=1e-6)
    (out - target).pow(2).sum().backward()
    g_sparse = m.E.grad.clone()
    m.E.grad = None
    (m.forward_dense(dense) - target).pow(2).sum().backward()
    assert torch.allclose(g_sparse, m.E.grad, atol=1e-5)


@pytest.mark.parametrize("n_params,d,n_latents", [(676_416, 256, 2048), (5_000, 16, 128), (175_000_000, 3200, 50_000)])
def test_mlp_controls_match_the_nfm_parameter_count(n_params, d, n_latents):
    for name, per_unit in (("mlp_on_code", n_latents + 1 + d), ("mlp_from_x", 2 * d + 1)):
        h = controls.matched_hidden(name, n_params, d, n_latents)
        count = h * per_unit + d                                   # closed form of the module's count
        assert abs(count - n_params) <= per_unit / 2, name
        if n_params < 1_000_000:                                   # and it is the built module's count
            m = controls.CodeMLP(n_latents, d, h) if name == "mlp_on_code" else controls.XMLP(d, h)
            assert controls.n_params(m) == count


def test_parse_controls():
    assert controls.parse_controls("all") == controls.CONTROLS and controls.parse_controls("none") == ()
    assert controls.parse_controls("residual_sae,linear_from_x") == ("linear_from_x", "residual_sae")
    with pytest.raises(controls.UserError, match="unknown mlp"):
        controls.parse_controls("mlp")


def test_reduction_and_gain_bootstrap_over_documents():
    g = torch.Generator().manual_seed(3)
    docs = torch.arange(40).repeat_interleave(25)                 # 40 documents of 25 tokens
    r = torch.randn(1000, 4, generator=g) + torch.randn(40, 4, generator=g).repeat_interleave(25, 0)
    a, b = r * 0.6, r * 0.2 + 0.1 * torch.randn(1000, 4, generator=g)
    ra, rb = controls.reduction_ci(r, a, docs), controls.reduction_ci(r, b, docs)
    assert abs(ra["residual_reduction"] - residual_reduction(r, a)) < 1e-9
    assert ra["ci"][0] <= ra["residual_reduction"] <= ra["ci"][1]
    gain = controls.gain_ci(r, a, b, docs)
    assert abs(gain["gain"] - (ra["residual_reduction"] - rb["residual_reduction"])) < 1e-9
    assert gain["n_units"] == 40 and gain["ci"][0] <= gain["gain"] <= gain["ci"][1]
    # tokens of one document are correlated: rows as units would give a narrower (wrong) interval
    by_rows = controls.gain_ci(r, a, b, None)
    assert by_rows["n_units"] == 1000
    assert np.diff(by_rows["ci"])[0] < np.diff(gain["ci"])[0]


def test_mlp_on_code_can_fit_what_a_linear_map_of_the_code_cannot():
    """A residual that is the conjunction of two binary latents: relu(f0 + f1 - 1) is exactly f0 f1, so the MLP
    on the code fits it; the best linear map of the code explains 2/3 of its variance (closed form for two
    independent Bernoulli(1/2) latents: 2 * 0.125^2 / 0.25 over 0.1875)."""
    g = torch.Generator().manual_seed(4)
    n, n_lat = 4000, 8
    idx = torch.arange(n_lat).expand(n, n_lat).contiguous()
    val = (torch.rand(n, n_lat, generator=g) < 0.5).float()
    u = torch.randn(3, generator=g)
    r = (val[:, 0] * val[:, 1] - 0.25)[:, None] * u                 # centred conjunction of latents 0 and 1
    lin, _ = controls.fit_ridge(val[:3000], r[:3000], val[3000:], r[3000:], lambdas=(0.0,))
    torch.manual_seed(0)
    mlp = controls.CodeMLP(n_lat, 3, 16)
    controls.train_regressor(mlp, (idx[:3000], val[:3000]), r[:3000], (idx[3000:], val[3000:]), r[3000:],
                             steps=400, batch_size=256, lr=1e-2, eval_every=100, seed=0, desc="test")
    red_mlp = residual_reduction(r[3000:], controls.predict(mlp, (idx[3000:], val[3000:])))
    red_lin = residual_reduction(r[3000:], lin(val[3000:]))
    assert abs(red_lin - 2 / 3) < 0.05 and red_mlp > 0.95, (red_mlp, red_lin)
