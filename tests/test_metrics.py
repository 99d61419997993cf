import numpy as np
import torch

from common.metrics import ReconAccumulator, residual_reduction


def test_fvu_sums_numerator_and_denominator_over_the_whole_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g) * torch.linspace(0.5, 3, 8) + 2
    x_hat = x + torch.randn(1000, 8, generator=g) * 0.3
    acc = ReconAccumulator(8)
    for s, e in ((0, 10), (10, 700), (700, 1000)):        # uneven batches
        acc.add(x[s:e], x_hat[s:e])
    X, Xh = x.double().numpy(), x_hat.double().numpy()
    fvu = ((X - Xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    r = acc.result()
    assert abs(r["fvu"] - fvu) < 1e-10
    assert abs(r["mse"] - ((X - Xh) ** 2).mean()) < 1e-10
    cos = (X * Xh).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(Xh, axis=1)
    assert abs(r["cosine"] - cos.mean()) < 1e-6
    # a mean of per-batch ratios would differ: the definition matters
    per_batch = np.mean([((X[s:e] - Xh[s:e]) ** 2).sum() / ((X[s:e] - X[s:e].mean(0)) ** 2).sum()
                         for s, e in ((0, 10), (10, 700), (700, 1000))])
    assert abs(per_batch - fvu) > 1e-3


def test_l0_and_dead_fraction():
    acc = ReconAccumulator(2, n_latents=5)
    idx = torch.tensor([[0, 3], [1, 2]])
    val = torch.tensor([[1.0, 0.0], [2.0, 3.0]])       # latent 3 is picked with value 0: it does not fire
    acc.add(torch.eye(2), torch.eye(2), idx, val)
    r = acc.result()
    assert r["l0"] == 1.5
    assert abs(r["dead_fraction"] - 2 / 5) < 1e-6                   # latents 3 and 4 never fire


def test_residual_reduction():
    r = torch.randn(100, 4)
    assert residual_reduction(r, torch.zeros_like(r)) == 0.0
    assert residual_reduction(r, r) == 1.0
    assert abs(residual_reduction(r, 0.5 * r) - 0.75) < 1e-6
