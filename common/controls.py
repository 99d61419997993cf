"""The control ladder: models of the SAE residual r = x - x_hat that could explain an NFM gain away.

Each control is trained on the same training tokens, for the same steps, and reported on the same held-out
test documents as the NFM (part2); part6 splices each one in beside the NFM (SAE + control); the planted
validation runs each one on planted and on null data. Everything is in the SAE's normalised space.

  name            model (what it reads)                                   what it tests
  linear_from_x   r_hat = x W + b, ridge in closed form (x)                Engels et al. 2025: a linear map
                  lambda picked on the selection half                      from x predicts much of the error
  mlp_on_code     r_hat = W2 relu(F E + b1) + b2 (the SAE code F)          whether the NFM's pairwise pooling
                  first layer an embedding bag over the active latents,    matters at all: a generic MLP of
                  the NFM's parameter count, no pairwise pooling           equal size on the same input
  mlp_from_x      r_hat = W2 relu(W1 x + b1) + b2 (x)                      the upper bound of what x predicts
                  the NFM's parameter count                                at that size
  residual_sae    a TopK SAE on r itself (r)                               a second dictionary of equal size

Why these: the NFM reads the code, a deterministic function of x, so anything it predicts a model of x could
predict too (mlp_from_x bounds that), and much of it is linear in x (linear_from_x, far fewer parameters). The
claim that the NFM finds *pairwise* structure stands only against mlp_on_code: same input, same budget, no
factorised pairwise term. `integration evidence` (part2) is the NFM's held-out residual reduction minus the
best code-reading control's, with a paired bootstrap CI over documents.

Parameter matching: the hidden width h is the one whose count is nearest the NFM's total,
  mlp_on_code  n_latents h + h + h d + d          mlp_from_x  d h + h + h d + d
so the counts differ by less than half of one hidden unit's parameters.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .rows import as_rows
from .sparse import TransposedCode, _WeightedBag
from .stats import ratio_of_sums_ci
from .train import batched, fit, module_device

CONTROLS = ("linear_from_x", "mlp_on_code", "mlp_from_x", "residual_sae")
READS = {"linear_from_x": "x", "mlp_on_code": "code", "mlp_from_x": "x", "residual_sae": "r"}
RIDGE_LAMBDAS = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # times tr(Cov x) / d


def parse_controls(spec: str) -> tuple[str, ...]:
    """'all', 'none' or a comma-separated list of CONTROLS, in the ladder's order."""
    if spec in ("all", ""):
        return CONTROLS
    if spec == "none":
        return ()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in CONTROLS]
    if bad:
        raise UserError(f"--controls: unknown {', '.join(bad)}; choose from {', '.join(CONTROLS)}, 'all' or 'none'")
    return tuple(c for c in CONTROLS if c in names)


# ------------------------------------------------------------------------------------------- models
class RidgeMap(nn.Module):
    """r_hat = x W + b (x [batch, d_in] -> [batch, d_out]); fitted by `fit_ridge`, never by SGD."""
    reads = "x"

    def __init__(self, d_in: int, d_out: int, lam: float = 0.0):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(d_in, d_out), requires_grad=False)   # [d_in, d_out]
        self.b = nn.Parameter(torch.zeros(d_out), requires_grad=False)         # [d_out]
        self.lam = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.W + self.b

    def hparams(self) -> dict:
        return {"name": "linear_from_x", "d_in": self.W.shape[0], "d_out": self.W.shape[1], "lam": self.lam}


class CodeMLP(nn.Module):
    """r_hat = W2 relu(sum_j val_j E[idx_j] + b1) + b2: a generic MLP on the SAE code (idx, val) [batch, k].

    The first layer is nn.Linear(n_latents, hidden) applied to the sparse code (same init), computed as an
    embedding bag over the k active latents, as the NFM's linear path is; no pairwise term."""
    reads = "code"

    def __init__(self, n_latents: int, d: int, hidden: int):
        super().__init__()
        first = nn.Linear(n_latents, hidden)
        self.E = nn.Parameter(first.weight.data.T.contiguous())       # [n_latents, hidden]
        self.b1 = nn.Parameter(first.bias.data.clone())                # [hidden]
        self.out = nn.Linear(hidden, d)
        self.n_latents = n_latents

    def forward(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        h = _WeightedBag.apply(idx, val.float(), self.E, TransposedCode(idx, val.float(), self.n_latents))
        return self.out(F.relu(h + self.b1))                          # [batch, d]

    def forward_dense(self, f: torch.Tensor) -> torch.Tensor:
        """The same MLP on a dense code f [batch, n_latents] (the reference for tests)."""
        return self.out(F.relu(f @ self.E + self.b1))

    def hparams(self) -> dict:
        return {"name": "mlp_on_code", "n_latents": self.n_latents, "d": self.out.out_features,
                "hidden": self.E.shape[1]}


class XMLP(nn.Module):
    """r_hat = W2 relu(W1 x + b1) + b2 on the normalised activation x [batch, d]."""
    reads = "x"

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.inp, self.out = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.inp(x.float())))

    def hparams(self) -> dict:
        return {"name": "mlp_from_x", "d": self.inp.in_features, "hidden": self.inp.out_features}


def matched_hidden(name: str, n_params: int, d: int, n_latents: int) -> int:
    """The hidden width whose parameter count is nearest n_params (see the module docstring)."""
    per_unit = {"mlp_on_code": n_latents + 1 + d, "mlp_from_x": 2 * d + 1}[name]
    return max(1, round((n_params - d) / per_unit))


def build(hp: dict) -> nn.Module:
    """A control from its hparams (as saved in its checkpoint)."""
    name = hp["name"]
    if name == "linear_from_x":
        return RidgeMap(hp["d_in"], hp["d_out"], hp.get("lam", 0.0))
    if name == "mlp_on_code":
        return CodeMLP(hp["n_latents"], hp["d"], hp["hidden"])
    if name == "mlp_from_x":
        return XMLP(hp["d"], hp["hidden"])
    raise UserError(f"unknown control {name!r} in a checkpoint; retrain it with part2")


def load_controls(nfm_dir, spec: str = "all", sae_cfg: dict | None = None) -> dict[str, nn.Module]:
    """The controls part2 trained beside the NFM in nfm_dir: those `spec` asks for, among those it has (part2 may
    have run with fewer --controls); with sae_cfg, refuses controls trained on another SAE."""
    from pathlib import Path

    from .checkpoint import check_parent, load
    from .sae import TopKSAE

    out = {}
    for name in parse_controls(spec):
        folder = Path(nfm_dir) / (name if name == "residual_sae" else f"controls/{name}")
        if not (folder / "config.json").is_file():
            continue
        tensors, cfg = load(folder, "residual_sae" if name == "residual_sae" else "control", "--nfm")
        if name == "residual_sae":
            m = TopKSAE.from_tensors(tensors, cfg["hparams"])
        else:
            m = build(cfg["hparams"])
            m.load_state_dict(tensors)
        if sae_cfg is not None:
            check_parent(cfg, "sae", sae_cfg, f"--nfm {nfm_dir} ({name})", "--sae")
        out[name] = m.eval().requires_grad_(False)
    return out


def control_prediction(name: str, model: nn.Module, x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                       r: torch.Tensor) -> torch.Tensor:
    """A loaded control's prediction of r for many rows (the residual SAE reads r itself)."""
    if name == "residual_sae":
        from .sae import reconstruct_all
        return reconstruct_all(model, r)
    return predict(model, inputs(model, x, idx, val))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def inputs(model: nn.Module, x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What a control reads: (x,) or (idx, val)."""
    return (idx, val) if model.reads == "code" else (x,)


# ------------------------------------------------------------------------------------------- fitting
@torch.no_grad()
def fit_ridge(x, y: torch.Tensor | None, x_sel: torch.Tensor, y_sel: torch.Tensor,
              lambdas=RIDGE_LAMBDAS, batch: int = 65536) -> tuple[RidgeMap, dict]:
    """Ridge regression of y [n, d_out] on x [n, d_in] with an unpenalised intercept, in closed form:
        W = (C_xx + lam s I)^-1 C_xy,  b = mean(y) - mean(x) W,   s = tr(C_xx) / d_in
    from sufficient statistics accumulated in float64 over row batches (memory independent of n); lam is the
    one of `lambdas` with the lowest MSE on the selection rows (x_sel, y_sel). With y None, x is a Rows whose
    gather gives (x, y) (common/rows.py: part2 computes y per batch)."""
    rows = as_rows(x if y is None else (x, y))
    d_in, d_out = x_sel.shape[1], y_sel.shape[1]
    n, sx, sy = 0, torch.zeros(d_in, dtype=torch.float64), torch.zeros(d_out, dtype=torch.float64)
    sxx, sxy = torch.zeros(d_in, d_in, dtype=torch.float64), torch.zeros(d_in, d_out, dtype=torch.float64)
    for xb, yb in rows.chunks(batch):
        xb, yb = xb.cpu().double(), yb.cpu().double()
        n += xb.shape[0]
        sx += xb.sum(0)
        sy += yb.sum(0)
        sxx += xb.T @ xb
        sxy += xb.T @ yb
    mx, my = sx / n, sy / n
    cxx, cxy = sxx / n - torch.outer(mx, mx), sxy / n - torch.outer(mx, my)
    scale = float(cxx.diagonal().mean()) or 1.0
    # one thread for the solves: two fresh-clone demos gave W differing in the last bits (lambda 0, gelsy),
    # and the same seed on the same machine must give the same bytes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pick_lambda(cxx, cxy, mx, my, scale, lambdas, x_sel, y_sel)
    finally:
        torch.set_num_threads(threads)


def _pick_lambda(cxx, cxy, mx, my, scale: float, lambdas, x_sel, y_sel) -> tuple[RidgeMap, dict]:
    d_in, d_out = cxy.shape
    best, scores = None, {}
    for lam in lambdas:
        W = torch.linalg.solve(cxx + lam * scale * torch.eye(d_in, dtype=torch.float64), cxy) if lam > 0 else \
            torch.linalg.lstsq(cxx, cxy).solution
        b = my - mx @ W
        m = RidgeMap(d_in, d_out, lam)
        m.W.copy_(W.float())
        m.b.copy_(b.float())
        mse = float((m(x_sel) - y_sel.float()).pow(2).mean())
        scores[f"{lam:g}"] = mse
        if best is None or mse < best[0]:
            best = (mse, m)
    return best[1], {"selection_mse_by_lambda": scores, "lambda": best[1].lam, "lambda_scale": scale}


def train_regressor(model: nn.Module, ins, r: torch.Tensor | None, sel_ins: tuple, r_sel: torch.Tensor,
                    steps: int, batch_size: int, lr: float, eval_every: int, seed: int, desc: str, ckpt=None,
                    tag: str = "control", optimizer: str = "adam", keep_latest: bool = False):
    """Fit model(*ins) to r by MSE with Adam (the NFM's optimizer and schedule: pass the NFM's `optimizer`);
    the best step by selection-half MSE.
    With r None, ins is a Rows whose gather gives (*ins, r) per batch (common/rows.py)."""
    from .metrics import residual_reduction

    dev = module_device(model)
    rows = as_rows(ins if r is None else (*ins, r))

    def step_loss(b):
        *xs, target = rows.gather(b)
        pred = model(*(t.to(dev, non_blocking=True) for t in xs))
        loss = (pred - target.to(dev, non_blocking=True)).pow(2).mean()
        return loss, {"loss": loss.item()}

    def evaluate():
        pred = predict(model, sel_ins)
        return {"val_loss": float((pred - r_sel).pow(2).mean()), "val_reduction": residual_reduction(r_sel, pred)}

    torch.manual_seed(seed)
    res = fit(model, rows.n, batch_size, steps, lr, step_loss, evaluate, eval_every, seed, desc, ckpt=ckpt, tag=tag,
              shuffle=rows.shuffle, optimizer=optimizer, keep_latest=keep_latest)
    rows.release()                                      # the block cache: not needed after training
    return res


def predict(model: nn.Module, ins: tuple[torch.Tensor, ...], batch: int = 8192) -> torch.Tensor:
    """A control's prediction for many rows, in eval mode; CPU in, CPU out."""
    model.eval()
    return batched(model, *ins, batch=batch, device=module_device(model))


# ------------------------------------------------------------------------------------------- reporting
def per_document(values: torch.Tensor, docs: torch.Tensor | None) -> np.ndarray:
    """Sum of per-row values [n] within each document (each row its own unit when there are no doc ids)."""
    v = values.double().numpy()
    if docs is None:
        return v
    _, inv = np.unique(docs.numpy(), return_inverse=True)
    return np.bincount(inv, weights=v)


def row_errors(r: torch.Tensor, r_hat: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """||r - r_hat||^2 per row [n], float64, a slice at a time: what every CI below needs of a prediction, so
    part2 keeps [n] per model instead of its [n, d] prediction."""
    return torch.cat([(r[s:s + batch].double() - r_hat[s:s + batch].double()).pow(2).sum(1)
                      for s in range(0, r.shape[0], batch)])


def _as_errors(r: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    return r_hat if r_hat.ndim == 1 else row_errors(r, r_hat)


def reduction_ci(r: torch.Tensor, r_hat: torch.Tensor, docs: torch.Tensor | None, n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """Residual reduction 1 - sum ||r - r_hat||^2 / sum ||r||^2 with a percentile-bootstrap CI over documents.
    r_hat: the prediction [n, d], or its row_errors [n]."""
    err = per_document(_as_errors(r, r_hat), docs)
    tot = per_document(row_errors(r, torch.zeros(()).expand_as(r)), docs)
    ratio, lo, hi = ratio_of_sums_ci(err, tot, n_boot, seed)
    return {"residual_reduction": 1 - ratio, "ci": [1 - hi, 1 - lo]}


def gain_ci(r: torch.Tensor, r_hat_a: torch.Tensor, r_hat_b: torch.Tensor, docs: torch.Tensor | None,
            n_boot: int = 1000, seed: int = 0) -> dict:
    """Reduction(a) - reduction(b) on the same tokens, with a paired bootstrap CI over documents (predictions
    [n, d] or their row_errors [n])."""
    err_a = per_document(_as_errors(r, r_hat_a), docs)
    err_b = per_document(_as_errors(r, r_hat_b), docs)
    tot = per_document(row_errors(r, torch.zeros(()).expand_as(r)), docs)
    diff, lo, hi = ratio_of_sums_ci(err_b - err_a, tot, n_boot, seed)
    return {"gain": diff, "ci": [lo, hi], "n_units": int(len(tot))}