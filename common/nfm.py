"""Neural Factorization Machine over a TopK SAE code (He & Chua 2017, as used by Claflin 2025).

Input: the SAE's sparse code f given as (idx [batch, k], val [batch, k]). Output: a d_model vector.
    linear path       l = sum_i f_i W_lin[i] + b_lin                                  # [batch, d]
    bi-interaction    p = 1/2 [ (sum_i f_i v_i)^2 - sum_i (f_i v_i)^2 ]               # [batch, dim]
                        = sum_{i<j} f_i f_j (v_i * v_j)   (exactly the pairwise terms)
    hidden layer      u = W_1 dropout(p) + b_1       <- "post-MLP1", before the ReLU  # [batch, hidden]
    interaction path  q = W_2 relu(u) + b_2                                           # [batch, d]
    output            l + q
Both sums of the pooling are `F.embedding_bag` over the k active features (never a dense
[batch, n_features, dim] tensor); `forward_dense` is the textbook formula on a dense [batch, n_features]
code, used by the equivalence tests. No BatchNorm (it would make a spliced model batch-dependent);
dropout on the pooled vector is the regulariser, as in the original NFM.
The secondary SAE (part3) reads `hidden(...)`, i.e. u: the interaction MLP's hidden layer before its ReLU,
computed in eval mode (no dropout) from the SAE's top-k code of the normalised activation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cli import UserError
from .train import batched, module_device

PATHS = ("linear", "interaction")


@dataclass
class NFMConfig:
    n_features: int
    d: int
    dim: int = 64
    hidden: int = 64
    dropout: float = 0.15

    def validate(self) -> None:
        if min(self.n_features, self.d, self.dim, self.hidden) <= 0:
            raise UserError(f"NFM sizes must be positive (dim={self.dim}, hidden={self.hidden})")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")


class NFM(nn.Module):
    def __init__(self, cfg: NFMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # W_lin starts at zero so the untrained NFM is the zero predictor it is measured against;
        # V ~ N(0, 0.05^2) as in the original study; the MLP uses PyTorch's default init.
        self.V = nn.Parameter(torch.randn(cfg.n_features, cfg.dim) * 0.05)      # [n_features, dim]
        self.W_lin = nn.Parameter(torch.zeros(cfg.n_features, cfg.d))           # [n_features, d]
        self.b_lin = nn.Parameter(torch.zeros(cfg.d))                           # [d]
        self.drop = nn.Dropout(cfg.dropout)
        self.mlp1 = nn.Linear(cfg.dim, cfg.hidden)
        self.mlp2 = nn.Linear(cfg.hidden, cfg.d)

    # ------------------------------------------------------------------ sparse path
    def linear(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(idx, self.W_lin, per_sample_weights=val, mode="sum") + self.b_lin

    def bi_interaction(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        s = F.embedding_bag(idx, self.V, per_sample_weights=val, mode="sum")                   # sum f_i v_i
        t = F.embedding_bag(idx, self.V * self.V, per_sample_weights=val * val, mode="sum")    # sum (f_i v_i)^2
        return 0.5 * (s * s - t)

    def hidden(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """u: the interaction MLP's hidden layer before ReLU (the secondary SAE's input)."""
        return self.mlp1(self.drop(self.bi_interaction(idx, val)))

    def interaction_from_hidden(self, u: torch.Tensor) -> torch.Tensor:
        return self.mlp2(F.relu(u))

    def interaction(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        return self.interaction_from_hidden(self.hidden(idx, val))

    def forward(self, idx: torch.Tensor, val: torch.Tensor, paths=PATHS) -> torch.Tensor:
        out = 0
        if "linear" in paths:
            out = out + self.linear(idx, val)
        if "interaction" in paths:
            out = out + self.interaction(idx, val)
        return out

    # ------------------------------------------------------------------ dense reference
    def forward_dense(self, f: torch.Tensor, paths=PATHS) -> torch.Tensor:
        """The textbook formula on a dense code f [batch, n_features]."""
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
        so no [batch, n_features] tensor is built; the MLP runs on [batch, k, dim]."""
        fv = val[..., None] * self.V[idx]                                 # [batch, k, dim]
        s, t = fv.sum(1, keepdim=True), (fv * fv).sum(1, keepdim=True)
        p_full = 0.5 * (s * s - t)                                        # [batch, 1, dim]
        p_wo = 0.5 * ((s - fv) ** 2 - (t - fv * fv))                      # [batch, k, dim]
        q_full = self.interaction_from_hidden(self.mlp1(p_full))
        q_wo = self.interaction_from_hidden(self.mlp1(p_wo))
        return (q_full - q_wo).norm(dim=-1) * (val > 0)

    def param_counts(self) -> dict:
        lin = self.W_lin.numel() + self.b_lin.numel()
        inter = self.V.numel() + sum(p.numel() for p in (*self.mlp1.parameters(), *self.mlp2.parameters()))
        return {"linear": lin, "interaction": inter, "total": lin + inter}

    def hparams(self) -> dict:
        return asdict(self.cfg)

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], cfg: dict, prefix: str = "") -> "NFM":
        m = cls(NFMConfig(**cfg))
        m.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
        return m.eval()


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


def train_nfm(nfm: NFM, idx: torch.Tensor, val: torch.Tensor, r: torch.Tensor, sel: tuple, steps: int,
              batch_size: int, lr: float, eval_every: int, seed: int):
    """Fit NFM(f) to the residual r by MSE; select the best step on the selection split `sel`=(idx, val, r)."""
    from .metrics import residual_reduction
    from .train import fit

    dev = module_device(nfm)

    def step_loss(b):
        pred = nfm(idx[b].to(dev, non_blocking=True), val[b].to(dev, non_blocking=True))
        loss = (pred - r[b].to(dev, non_blocking=True)).pow(2).mean()
        return loss, {"loss": loss.item()}

    def evaluate():
        pred = predict(nfm, sel[0], sel[1])
        mse = float((pred - sel[2]).pow(2).mean())
        return {"val_loss": mse, "val_reduction": residual_reduction(sel[2], pred)}

    torch.manual_seed(seed)  # dropout masks
    return fit(nfm, idx.shape[0], batch_size, steps, lr, step_loss, evaluate, eval_every, seed, "train NFM")
