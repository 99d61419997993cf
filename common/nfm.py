"""Neural Factorization Machine over a TopK SAE code (He & Chua 2017, as used by Claflin 2025).

Input: the SAE's sparse code f given as (idx [batch, k], val [batch, k]). Output: a d_model vector.
    linear path       l = sum_i f_i W_lin[i] + b_lin                                  # [batch, d]
    bi-interaction    p = 1/2 [ (sum_i f_i v_i)^2 - sum_i (f_i v_i)^2 ]               # [batch, dim]
                        = sum_{i<j} f_i f_j (v_i * v_j)   (exactly the pairwise terms)
    hidden layer      u = W_1 dropout(p) + b_1       <- "post-MLP1", before the ReLU  # [batch, hidden]
    interaction path  q = W_2 relu(u) + b_2                                           # [batch, d]
    output            l + q
Both pooling paths are sums over the k active features (`F.embedding_bag`; never a dense [batch, n_features]
or [batch, n_features, dim] tensor), with custom backwards (see `_WeightedBag`, `_BiInteraction`): the
table gradients are CSR products over the code's nonzeros, written into gradient buffers reused across
steps. `forward_dense` is the textbook formula on a dense [batch, n_features] code, used by the
equivalence tests and as the benchmark's reference. No BatchNorm (it would make a spliced model batch-dependent);
dropout on the pooled vector is the regulariser, as in the original NFM.
The secondary SAE (part3) reads `hidden(...)`, i.e. u: the interaction MLP's hidden layer before its ReLU,
computed in eval mode (no dropout) from the SAE's top-k code of the normalised activation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .sparse import (TransposedCode, _bag_dots, _reused, _return_grad, _table_grad_out, _WeightedBag,
                     release_table_buffers)
from .train import batched, module_device

PATHS = ("linear", "interaction")


@dataclass
class NFMConfig:
    n_features: int
    d: int
    dim: int = 64
    hidden: int = 64
    dropout: float = 0.15
    init: str = "default"          # "default" or "reference" (the original study's, --recipe reference)
    top_n: int | None = None       # the reference joint model's TOP_N: both paths read the top_n largest code values

    def validate(self) -> None:
        if min(self.n_features, self.d, self.dim, self.hidden) <= 0:
            raise UserError(f"NFM sizes must be positive (dim={self.dim}, hidden={self.hidden})")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.top_n is not None and self.top_n <= 0:
            raise UserError(f"the NFM's top_n must be positive, got {self.top_n}")
        if self.init not in ("default", "reference"):
            raise UserError(f"unknown NFM init {self.init!r}; the checkpoint is from a newer version of this tool")


# ---------------------------------------------------------------------------- sparse-path kernels
class _BiInteraction(torch.autograd.Function):
    """p = 1/2 (s * s - t) with s = F @ V and t = F^2 @ V^2 (squares elementwise): the bi-interaction
    pooling, [batch, dim]. Autograd through two embedding_bags would also build V * V's gradient, a
    second dense [n_features, dim] table every step; the closed-form backward needs neither:
        dL/dV         = F^T @ (g * s)  -  V * ((F^2)^T @ g)        g = dL/dp [batch, dim]
        dL/dval[b, j] = <g_b * s_b, v_i>  -  val[b, j] <g_b, v_i^2>  with i = idx[b, j]."""

    @staticmethod
    def forward(ctx, idx, val, V, code_t: TransposedCode, training: bool):
        Vd, vd = V.detach(), val.detach()                         # detached: embedding_bag's forward-only kernel
        # V^2 [n_features, dim] into a reused buffer when training (a fresh one each step is page faults)
        V2 = torch.mul(Vd, Vd, out=_reused(V, "square")) if training else Vd * Vd
        s = F.embedding_bag(idx, Vd, per_sample_weights=vd, mode="sum")               # [batch, dim]
        t = F.embedding_bag(idx, V2, per_sample_weights=vd * vd, mode="sum")          # [batch, dim]
        ctx.save_for_backward(idx, val, V, s)
        ctx.code_t = code_t
        return 0.5 * (s * s - t)

    @staticmethod
    def backward(ctx, g):                                                              # [batch, dim]
        idx, val, V, s = ctx.saved_tensors
        gs = g * s                                                                     # [batch, dim]
        grad_val = grad_V = None
        if ctx.needs_input_grad[1]:
            # V^2 recomputed: the forward's buffer may hold a later forward's by now
            grad_val = _bag_dots(gs, V, idx) - val * _bag_dots(g, V * V, idx)          # [batch, k]
        if ctx.needs_input_grad[2]:
            # overwritten with -(F^2)^T g (beta=0), scaled by V in place (no second [n_features, dim]
            # temporary), then + F^T (g s)
            grad_V = _table_grad_out(V)                                                # [n_features, dim]
            grad_V.addmm_(ctx.code_t.csr(power=2), g, beta=0, alpha=-1).mul_(V)
            grad_V.addmm_(ctx.code_t.csr(), gs)
            grad_V = _return_grad(V, grad_V)
        return None, grad_val, grad_V, None, None


class NFM(nn.Module):
    PATHS = PATHS

    def __init__(self, cfg: NFMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # W_lin starts at zero so the untrained NFM is the zero predictor it is measured against;
        # V ~ N(0, 0.05^2) as in the original study; the MLP uses PyTorch's default init (init "reference":
        # the study's W_lin ~ N(0, 0.01^2) and MLP weights ~ N(0, 0.01^2) with zero biases, below).
        self.V = nn.Parameter(torch.randn(cfg.n_features, cfg.dim) * 0.05)      # [n_features, dim]
        self.W_lin = nn.Parameter(torch.zeros(cfg.n_features, cfg.d))           # [n_features, d]
        self.b_lin = nn.Parameter(torch.zeros(cfg.d))                           # [d]
        self.drop = nn.Dropout(cfg.dropout)
        self.mlp1 = nn.Linear(cfg.dim, cfg.hidden)
        self.mlp2 = nn.Linear(cfg.hidden, cfg.d)
        if cfg.init == "reference":       # the original study's (common/recipe.py, original_study.md §3.2)
            from . import recipe
            with torch.no_grad():
                self.W_lin.normal_(0, recipe.NFM_LINEAR_STD)
                for lin in (self.mlp1, self.mlp2):
                    lin.weight.normal_(0, recipe.NFM_MLP_STD)
                    lin.bias.zero_()
        # Each path's mean output on training tokens, set once after training and saved with the weights:
        # mean-ablation puts it in place of a removed path. The two paths carry large constant offsets that
        # cancel (b_lin against the MLP's biases; on the demo their means have norms 1.28 and 1.29 at cosine
        # -1.00), so deleting a path (zero-ablation) would measure that constant, not what the path says
        # about the token.
        self.register_buffer("linear_mean", torch.zeros(cfg.d))                  # [d]
        self.register_buffer("interaction_mean", torch.zeros(cfg.d))             # [d]
        self.register_buffer("mean_tokens", torch.zeros((), dtype=torch.long))  # 0 until set_path_means

    # ------------------------------------------------------------------ sparse path
    # `code_t` lets forward() share one sort of the code between both paths' backwards; callers of a
    # single path leave it out. It must be built from the same (idx, val), after `truncate`.
    def truncate(self, idx: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The code both paths read: the whole code, or with cfg.top_n (the reference joint model's TOP_N,
        common/recipe.py) its top_n largest values [batch, top_n]. Every entry point applies it, so any stage
        that hands this NFM a full code computes what the model was trained on; a truncated code passes through."""
        n = self.cfg.top_n
        if n is None or idx.shape[1] <= n:
            return idx, val
        val, j = val.topk(n, dim=1, sorted=False)
        return idx.gather(1, j), val

    def _code_t(self, idx, val, code_t: TransposedCode | None) -> TransposedCode:
        return code_t if code_t is not None else TransposedCode(idx, val, self.cfg.n_features)

    def _entry(self, idx, val, code_t):
        if code_t is not None and self.cfg.top_n is not None and idx.shape[1] > self.cfg.top_n:
            raise ValueError("code_t must be built from the truncated code (NFM.truncate)")
        return self.truncate(idx, val)

    def linear(self, idx: torch.Tensor, val: torch.Tensor, code_t: TransposedCode | None = None) -> torch.Tensor:
        idx, val = self._entry(idx, val, code_t)
        return _WeightedBag.apply(idx, val, self.W_lin, self._code_t(idx, val, code_t)) + self.b_lin  # [batch, d]

    def bi_interaction(self, idx: torch.Tensor, val: torch.Tensor,
                       code_t: TransposedCode | None = None) -> torch.Tensor:
        idx, val = self._entry(idx, val, code_t)
        training = torch.is_grad_enabled() and self.V.requires_grad
        return _BiInteraction.apply(idx, val, self.V, self._code_t(idx, val, code_t), training)  # [batch, dim]

    def hidden(self, idx: torch.Tensor, val: torch.Tensor, code_t: TransposedCode | None = None) -> torch.Tensor:
        """u: the interaction MLP's hidden layer before ReLU (the secondary SAE's input)."""
        return self.mlp1(self.drop(self.bi_interaction(idx, val, code_t)))

    def interaction_from_hidden(self, u: torch.Tensor) -> torch.Tensor:
        return self.mlp2(F.relu(u))

    def interaction(self, idx: torch.Tensor, val: torch.Tensor,
                    code_t: TransposedCode | None = None) -> torch.Tensor:
        return self.interaction_from_hidden(self.hidden(idx, val, code_t))

    def forward(self, idx: torch.Tensor, val: torch.Tensor, paths=PATHS) -> torch.Tensor:
        idx, val = self.truncate(idx, val)
        code_t = TransposedCode(idx, val, self.cfg.n_features)
        out = 0
        if "linear" in paths:
            out = self.linear(idx, val, code_t)           # not 0 + ...: that copies [batch, d]
        if "interaction" in paths:
            out = out + self.interaction(idx, val, code_t)
        return out

    def train(self, mode: bool = True) -> "NFM":
        # the reused table buffers (W_lin's gradient is 640 MB at paper scale) only live while training
        if not mode:
            release_table_buffers(self)
        return super().train(mode)

    # ------------------------------------------------------------------ dense reference
    def forward_dense(self, f: torch.Tensor, paths=PATHS) -> torch.Tensor:
        """The textbook formula on a dense code f [batch, n_features] (with cfg.top_n: its top_n largest entries)."""
        if self.cfg.top_n is not None:
            val, j = f.topk(self.cfg.top_n, dim=1)
            f = torch.zeros_like(f).scatter(1, j, val)
        out = 0
        if "linear" in paths:
            out = out + f @ self.W_lin + self.b_lin
        if "interaction" in paths:
            p = 0.5 * ((f @ self.V) ** 2 - (f * f) @ (self.V * self.V))
            out = out + self.mlp2(F.relu(self.mlp1(self.drop(p))))
        return out

    @torch.no_grad()
    def pair_effect(self, i: torch.Tensor, j: torch.Tensor, ci: torch.Tensor, cj: torch.Tensor) -> torch.Tensor:
        """||NFM(i, j) - NFM(i) - NFM(j) + NFM()|| with features i, j at activations ci, cj: the pair's
        non-additive effect on the output. The linear path cancels, and the bi-interaction of a single
        feature is 0, so this is ||q(ci cj (v_i * v_j)) - q(0)|| with q the dropout-free MLP of the pooled
        vector: it includes the ReLU and W_2, not only the first layer."""
        p = (ci * cj)[:, None] * self.V[i] * self.V[j]                  # [n_pairs, dim]
        base = self.interaction_from_hidden(self.mlp1.bias)              # q(0) [d]
        return (self.interaction_from_hidden(self.mlp1(p)) - base).norm(dim=-1)

    @torch.no_grad()
    def interaction_leave_one_out(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """||q(f) - q(f without feature j)|| for each active feature j of each row: [batch, k].

        Closed form of the pooled vector without j: s' = s - f_j v_j, t' = t - f_j^2 v_j^2, p' = (s'^2 - t')/2,
        so no [batch, n_features] tensor is built; the MLP runs on [batch, k, dim]. With cfg.top_n, entries outside
        the top_n give 0 and the others are left out of the truncated code (no feature is promoted into it)."""
        if self.cfg.top_n is not None and idx.shape[1] > self.cfg.top_n:
            keep = torch.zeros_like(val, dtype=torch.bool).scatter(1, val.topk(self.cfg.top_n, dim=1).indices, True)
            val = val * keep                                              # outside the top_n: no contribution
        fv = val[..., None] * self.V[idx]                                 # [batch, k, dim]
        s, t = fv.sum(1, keepdim=True), (fv * fv).sum(1, keepdim=True)
        p_full = 0.5 * (s * s - t)                                        # [batch, 1, dim]
        p_wo = 0.5 * ((s - fv) ** 2 - (t - fv * fv))                      # [batch, k, dim]
        q_full = self.interaction_from_hidden(self.mlp1(p_full))
        q_wo = self.interaction_from_hidden(self.mlp1(p_wo))
        return (q_full - q_wo).norm(dim=-1) * (val > 0)

    # ------------------------------------------------------------------ path ablation
    @torch.no_grad()
    def set_path_means(self, codes, val: torch.Tensor | None = None, max_rows: int = 1 << 18) -> None:
        """Store each path's mean output over training codes: (idx, val) [n, k], or a Rows whose gather gives
        (idx, val, ...) (common/rows.py); an even stride of at most max_rows of them, in eval mode (no dropout),
        summed in float64 a chunk at a time."""
        from .rows import as_rows

        rows = as_rows(codes if val is None else (codes, val))
        step = -(-rows.n // max_rows)
        was = self.training
        n, sums = 0, {p: torch.zeros(self.cfg.d, dtype=torch.float64) for p in ("linear", "interaction")}
        for chunk in rows.chunks(8192, step):
            i, v = chunk[0], chunk[1]
            n += i.shape[0]
            for p in sums:
                sums[p] += predict(self, i, v, (p,)).double().sum(0)
        self.linear_mean.copy_((sums["linear"] / n).to(self.linear_mean))
        self.interaction_mean.copy_((sums["interaction"] / n).to(self.linear_mean))
        self.mean_tokens.fill_(n)
        self.train(was)

    def path_mean(self, path: str) -> torch.Tensor:
        """The mean output of `path` ("linear" or "interaction") on training tokens: [d]."""
        if int(self.mean_tokens) == 0:
            raise UserError("this NFM has no path means (an old or unfinished checkpoint); retrain it with part2 "
                            "(or part5 for a joint model)")
        return self.linear_mean if path == "linear" else self.interaction_mean

    def param_counts(self) -> dict:
        lin = self.W_lin.numel() + self.b_lin.numel()
        inter = self.V.numel() + sum(p.numel() for p in (*self.mlp1.parameters(), *self.mlp2.parameters()))
        return {"linear": lin, "interaction": inter, "total": lin + inter}

    def hparams(self) -> dict:
        return asdict(self.cfg)

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], cfg: dict, prefix: str = "") -> "NFM":
        m = cls(NFMConfig(**cfg))
        state = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
        require_path_means(state)
        m.load_state_dict(state)
        return m.eval()


def require_path_means(state: dict, prefix: str = "") -> None:
    """A one-line error for a checkpoint written before the NFM stored its path means (mean-ablation)."""
    if prefix + "mean_tokens" not in state:
        raise UserError("this NFM checkpoint predates mean-ablation (it holds no path means); retrain it with "
                        "part2 (or part5 for a joint model)")


def combine_paths(outputs: dict, keep, nfm: NFM, ablation: str = "mean") -> torch.Tensor:
    """The sum of outputs[p] for p in `keep`; each NFM path ("linear", "interaction") not in keep is removed
    by its mean output on training tokens (ablation="mean", the default) or deleted (ablation="zero").
    Other keys (the joint model's "sae" path) are simply summed when kept. `nfm` may also be a PolySAE's
    decoder (common/poly.py), whose only path is "interaction" (its `PATHS`)."""
    if ablation not in ("mean", "zero"):
        raise ValueError(ablation)
    out = sum(outputs[p] for p in keep)
    if ablation == "mean":
        for p in nfm.PATHS:
            if p not in keep:
                out = out + nfm.path_mean(p).to(outputs[p].device, outputs[p].dtype)
    return out


def load_nfm_checkpoint(path, sae_cfg: dict | None = None, flag: str = "--nfm", sae_flag: str = "--sae"):
    """(NFM, config) from a part2 folder; with sae_cfg, refuses an NFM trained on another SAE."""
    from .checkpoint import check_parent, load

    tensors, cfg = load(path, "nfm", flag)
    if sae_cfg is not None:
        check_parent(cfg, "sae", sae_cfg, flag, sae_flag)
    return NFM.from_tensors(tensors, cfg["hparams"]), cfg


def predict(nfm: NFM, idx: torch.Tensor, val: torch.Tensor, paths=PATHS, batch: int = 8192) -> torch.Tensor:
    """NFM output (chosen paths) for many rows, in eval mode; CPU in, CPU out."""
    nfm.eval()
    return batched(lambda i, v: nfm(i, v, paths), idx, val, batch=batch, device=module_device(nfm))


def hidden_all(nfm: NFM, idx: torch.Tensor, val: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """u = post-MLP1 (pre-ReLU) for many rows, in eval mode; CPU in, CPU out."""
    nfm.eval()
    return batched(nfm.hidden, idx, val, batch=batch, device=module_device(nfm))


def train_nfm(nfm: NFM, train, sel: tuple, steps: int, batch_size: int, lr: float, eval_every: int, seed: int,
              ckpt=None, tag: str = "nfm", optimizer: str = "adam", keep_latest: bool = False):
    """Fit NFM(f) to the residual r by MSE; select the best step on the selection split `sel`=(idx, val, r).
    train: (idx, val, r) tensors, or a Rows whose gather gives them per batch (part2 computes them from the frozen
    SAE per batch, common/rows.py)."""
    from .metrics import residual_reduction
    from .rows import as_rows
    from .train import fit

    dev = module_device(nfm)
    rows = as_rows(train)

    def step_loss(b):
        idx, val, r = rows.gather(b)[:3]
        pred = nfm(idx.to(dev, non_blocking=True), val.to(dev, non_blocking=True))
        loss = (pred - r.to(dev, non_blocking=True)).pow(2).mean()
        return loss, {"loss": loss.item()}

    def evaluate():
        pred = predict(nfm, sel[0], sel[1])
        mse = float((pred - sel[2]).pow(2).mean())
        return {"val_loss": mse, "val_reduction": residual_reduction(sel[2], pred)}

    torch.manual_seed(seed)  # dropout masks
    res = fit(nfm, rows.n, batch_size, steps, lr, step_loss, evaluate, eval_every, seed, "train NFM",
              ckpt=ckpt, tag=tag, shuffle=rows.shuffle, optimizer=optimizer, keep_latest=keep_latest)
    rows.release()                                      # the block cache: not needed after training
    return res
