"""The activation normalisation that is saved with every model and applied everywhere.

    x_norm = (x - shift) / scale          (encode side: every stage feeds x_norm to its models)
    x      = x_norm * scale + shift       (splice side: every reconstruction is mapped back)

Modes (`--normalize`):
  scalar (default)  shift = 0, scale = one number c with E||x||^2 = d on training tokens, i.e. the
                    "unit mean squared norm" of SAELens (`expected_average_only_in`) and dictionary_learning.
                    Chosen because a scalar keeps the residual stream's geometry: decoder directions,
                    cosines and Gram matrices stay in the model's own basis, FVU and cosine are unchanged,
                    and the splice inverse is exact. It only sets the scale so that learning rates and init
                    heuristics (which assume unit-scale inputs) transfer across models and layers.
  zscore            per-dimension (x - mean) / std, as the original study did. Offered to reproduce it; note
                    it reweights the MSE objective per dimension (amplifying near-constant dimensions).
  none              identity.
The statistics are fitted once on training tokens only and stored in the checkpoint as `norm.shift` and
`norm.scale` (both [d]), so the same map is used by every later stage.
"""
from __future__ import annotations

import torch

from .errors import UserError

MODES = ("scalar", "zscore", "none")


class Normalizer:
    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, mode: str):
        self.shift = shift.float()  # [d]
        self.scale = scale.float()  # [d]
        self.mode = mode

    @classmethod
    def fit(cls, x, mode: str, max_rows: int = 200_000) -> "Normalizer":
        """Fit on training activations x [n, d] (a tensor, or a Rows read in chunks: common/rows.py), using an
        even stride of at most max_rows rows; float64 sums, so memory does not grow with the rows."""
        from .rows import as_rows

        if mode not in MODES:
            raise UserError(f"unknown --normalize {mode!r}; use one of {', '.join(MODES)}")
        rows = as_rows(x)
        stride = max(1, rows.n // max_rows)
        chunks = lambda: (c.double() for c in rows.chunks(16384, stride))  # noqa: E731
        first = next(iter(chunks()))
        d = first.shape[1]
        if mode == "none":
            return cls(torch.zeros(d), torch.ones(d), mode)
        n, total = 0, torch.zeros(d, dtype=torch.float64)
        for c in chunks():
            n += c.shape[0]
            total += (c.pow(2) if mode == "scalar" else c).sum(0)
        if mode == "scalar":
            c = total.sum().div(n).div(d).sqrt().clamp_min(1e-12)
            return cls(torch.zeros(d), torch.full((d,), float(c)), mode)
        mean = total / n
        sq = torch.zeros(d, dtype=torch.float64)
        for c in chunks():
            sq += (c - mean).pow(2).sum(0)
        std = (sq / max(1, n - 1)).sqrt().clamp_min(1e-6)
        return cls(mean.float(), std.float(), mode)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.shift.to(x.device)) / self.scale.to(x.device)

    def decode(self, x_norm: torch.Tensor) -> torch.Tensor:
        return x_norm * self.scale.to(x_norm.device) + self.shift.to(x_norm.device)

    def to(self, device) -> "Normalizer":
        self.shift, self.scale = self.shift.to(device), self.scale.to(device)
        return self

    def tensors(self, prefix: str = "norm.") -> dict[str, torch.Tensor]:
        return {prefix + "shift": self.shift, prefix + "scale": self.scale}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], mode: str, prefix: str = "norm.") -> "Normalizer":
        return cls(t[prefix + "shift"], t[prefix + "scale"], mode)
