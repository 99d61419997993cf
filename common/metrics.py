"""Reconstruction metrics, with the definitions spelled out (sums accumulated in float64).

  MSE     = mean over tokens and dimensions of (x - x_hat)^2
  FVU     = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (numerator and denominator summed separately over
            the whole evaluation set, mean(x) the dataset mean; not a mean of per-batch ratios)
  cosine  = mean over tokens of cos(x, x_hat)
  L0      = mean number of non-zero latents per token
  dead    = share of latents that never fire on the evaluation set
  residual reduction = 1 - sum ||r - r_hat||^2 / sum ||r||^2   (relative reduction of residual MSE against
            predicting zero, the "error reduction" of the original study)
"""
from __future__ import annotations

import torch


class ReconAccumulator:
    def __init__(self, d: int, n_latents: int | None = None):
        self.n = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_x2 = 0.0
        self.sum_err2 = 0.0
        self.sum_cos = 0.0
        self.sum_l0 = 0.0
        self.fired = torch.zeros(n_latents, dtype=torch.long) if n_latents else None

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, idx: torch.Tensor | None = None,
            val: torch.Tensor | None = None) -> None:
        x, x_hat = x.double().cpu(), x_hat.double().cpu()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_x2 += float(x.pow(2).sum())
        self.sum_err2 += float((x - x_hat).pow(2).sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1).sum())
        if idx is not None:
            active = val > 0
            self.sum_l0 += float(active.sum())
            if self.fired is not None:
                self.fired += torch.bincount(idx[active].cpu(), minlength=self.fired.numel())

    def result(self) -> dict:
        d = self.sum_x.numel()
        total_var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.n
        out = {"n_tokens": self.n, "mse": self.sum_err2 / (self.n * d), "fvu": self.sum_err2 / total_var if total_var > 0 else float("nan"),
               "cosine": self.sum_cos / self.n}
        if self.fired is not None:
            out["l0"] = self.sum_l0 / self.n
            out["dead_fraction"] = float((self.fired == 0).float().mean())
        return out


@torch.no_grad()
def recon_stats(sae, x: torch.Tensor, batch: int = 4096, norm=None, with_density: bool = False) -> dict:
    """SAE metrics on normalised rows x. With `norm`, MSE/FVU/cosine are also given in the LM's raw units."""
    acc = ReconAccumulator(x.shape[1], sae.cfg.n_latents)
    raw = ReconAccumulator(x.shape[1]) if norm is not None else None
    dev = next(sae.parameters()).device
    for s in range(0, x.shape[0], batch):
        xb = x[s:s + batch].to(dev).float()
        x_hat, idx, val = sae(xb)
        acc.add(xb, x_hat, idx, val)
        if raw is not None:
            raw.add(norm.decode(xb.cpu()), norm.decode(x_hat.cpu()))
    out = acc.result()
    if raw is not None:
        r = raw.result()
        out.update({"mse_raw": r["mse"], "fvu_raw": r["fvu"], "cosine_raw": r["cosine"]})
    if with_density:
        out["firing_rate"] = (acc.fired.double() / acc.n).tolist()
    return out


def residual_reduction(r: torch.Tensor, r_hat: torch.Tensor) -> float:
    r, r_hat = r.double(), r_hat.double()
    return 1.0 - float((r - r_hat).pow(2).sum() / r.pow(2).sum().clamp_min(1e-30))
