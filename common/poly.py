"""PolySAE as a joint model: one TopK encoder, a linear dictionary, and a low-rank polynomial (pairwise +
triple) interaction decoder of the same code, trained together (part5 --decoder poly).

Reference: Koromilas et al., "PolySAE: Modeling Feature Interactions in Sparse Autoencoders via Polynomial
Decoding" (ICML 2026, arXiv 2602.01322); code github.com/pakoromilas/PolySAE at commit 7cf6ead2a2da,
file sae_lens/saes/polysae.py, the shared-U mode every paper run uses (README.md:164,199: `--poly --shared_u
--poly_order 3 --poly_ranks 768,64,64`, no decoder-norm rescaling). Its decoder (`_poly_decode`, lines 243-261):

    a1 = z @ U_shared                                   # [batch, R1], line 245; U_shared [d_sae, R1]
    y  = b_dec + a1 @ C1^T                              # linear term, line 248
               + lambda2 (a1[:, :R2] * a1[:, :R2]) @ C2^T              # quadratic, line 254
               + lambda3 (a1[:, :R3] * a1[:, :R3] * a1[:, :R3]) @ C3^T  # cubic, line 260

with U_shared orthogonally initialised (line 129), C1..C3 Kaiming-uniform (lines 134, 145, 156), lambda2 = -0.5,
lambda3 = +0.5 (lines 104-105, 611-612), and U_shared retracted onto orthonormal columns by a sign-fixed QR after
every optimizer step (`orthogonalize_U`, lines 394-417 with `_qr_pos` / `_robust_qr_update`, lines 354-391;
called in sae_lens/training/sae_trainer.py:320-323).

Here, in this project's joint-model recipe (common/joint.py):

    idx, val = TopK(ReLU(W_enc (x - b_dec) + b_enc))                     # the shared sparse code f
    a        = f U                                                       # [batch, R], U [n_latents, R]
    x_hat    = [W_dec f + b_dec]  +  [lambda2 (a[:, :R2])^2 C2^T + lambda3 (a[:, :R3])^3 C3^T]
                 "sae" path            "interaction" path

W_dec is the SAE's own dictionary (unit-norm rows, tied init, parallel-gradient removal, b_dec from the data),
and U (orthonormal columns, QR-retracted after every step as the reference) is the projection shared by the
quadratic and the cubic term. This is exactly the reference's shared-U decoder family at ranks
(R1, R2, R3) = (R + d, R2, R3) with R = max(R2, R3): take its U_shared = [U | U'] with U' an orthonormal basis
of the rest of W_dec's column space and C1 = [C1_U | C1'] (any W_dec = U C1_U^T + U' C1'^T), so its linear term
a1 C1^T is W_dec f and its truncations a1[:, :R2], a1[:, :R3] are this a; conversely every such reference decoder
is one of these with W_dec = U_shared C1^T. What differs is only the gauge of the linear term (this project
keeps W_dec's rows at unit norm, the TopK encoder carrying the scale; the reference keeps U_shared orthonormal
and C1 free) and, hence, the parameter count: C1 is not stored (it would duplicate W_dec).

Written out (i, j, l over the active latents, ordered, so the diagonal i = j is included, as in the reference):
    interaction = sum_{i,j} f_i f_j T2[i,j] + sum_{i,j,l} f_i f_j f_l T3[i,j,l]
    T2[i,j]   = lambda2 sum_{r<R2} U_ir U_jr C2[:, r],  T3[i,j,l] = lambda3 sum_{r<R3} U_ir U_jr U_lr C3[:, r]
(`PolyDecoder.pair_tensor` / `triple_tensor`; tests/test_poly.py checks the fast path against these sums).

The interaction representation (the analogue of the NFM's hidden layer u, read by part3's secondary SAE) is
h = [a[:, :R2]^2, a[:, :R3]^3] [batch, R2 + R3]; the interaction path is linear in it
(`interaction_from_hidden`). a[:, :R2]^2 = 2 p + sum_i f_i^2 u_i^2 with p = sum_{i<j} f_i f_j (u_i * u_j)
the NFM-style bi-interaction pooling of the pairwise factors u_i = U[i, :R2] (`bi_interaction`, `V`), which is
what part8's pair attribution reads.

Parameters (`poly_param_count`): the SAE's 2 n d + n + d, plus U n R, C2 d R2, C3 d R3 and the two scalars.
part5 chooses R2 >= R3 so that the total is nearest the joint NFM model's built from the same flags
(`matched_ranks`; on the demo R2 = 265, R3 = 257: 62 parameters short of 1,727,296).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import dist
from .errors import UserError
from .sae import SAEConfig, SharedCodePaths, TopKSAE
from .sparse import TransposedCode, _WeightedBag
from .train import batched, module_device

PATHS = ("interaction",)
# the variants part5 reports for a poly model (a removed interaction path is mean- or zero-ablated)
VARIANTS = {"sae": ("sae",), "full": ("sae", "interaction")}


@dataclass
class PolyConfig:
    n_features: int
    d: int
    rank2: int                  # R2: columns of the projection a = f U used by the quadratic term
    rank3: int                  # R3: ... by the cubic term (0 with order 2)
    order: int = 3              # the reference's poly_order: 2 = + pairwise, 3 = + pairwise + triple
    lambda2_init: float = -0.5  # the reference's defaults (polysae.py:104-105)
    lambda3_init: float = 0.5

    def validate(self) -> None:
        if self.order not in (2, 3):
            raise UserError(f"the PolySAE order must be 2 or 3, got {self.order}")
        r3 = self.rank3 if self.order == 3 else 1
        if min(self.n_features, self.d, self.rank2, r3) <= 0:
            raise UserError(f"PolySAE sizes must be positive (rank2={self.rank2}, rank3={self.rank3})")
        if self.rank > self.n_features:
            raise UserError(f"PolySAE rank {self.rank} exceeds n_latents {self.n_features} (U needs orthonormal "
                            f"columns); choose a smaller rank or more latents")

    @property
    def rank(self) -> int:
        """R: the width of the shared projection U [n_features, R]."""
        return max(self.rank2, self.rank3 if self.order == 3 else 0)

    @property
    def r3(self) -> int:
        return self.rank3 if self.order == 3 else 0

    @property
    def hidden(self) -> int:
        """Width of the interaction representation h = [a^2, a^3] (what part3 reads as `cfg.hidden`)."""
        return self.rank2 + self.r3


def sae_param_count(n: int, d: int) -> int:
    """W_enc, b_enc, W_dec, b_dec of a TopK SAE."""
    return 2 * n * d + n + d


def joint_nfm_param_count(n: int, d: int, dim: int, hidden: int) -> int:
    """JointModel(SAEConfig(d, n, k), NFMConfig(n, d, dim, hidden)).param_counts()["total"], in closed form."""
    return sae_param_count(n, d) + (n * d + d) + (n * dim + dim * hidden + hidden + hidden * d + d)


def poly_param_count(n: int, d: int, rank2: int, rank3: int, order: int = 3) -> int:
    """PolyJointModel's parameters: the SAE's + U [n, max(R2, R3)] + C2 [d, R2] + C3 [d, R3] + lambda2 (+ lambda3)."""
    if order == 2:
        return sae_param_count(n, d) + n * rank2 + d * rank2 + 1
    return sae_param_count(n, d) + n * max(rank2, rank3) + d * (rank2 + rank3) + 2


def matched_ranks(n: int, d: int, target: int, order: int = 3) -> tuple[int, int]:
    """(R2, R3), R3 <= R2 <= n, whose PolySAE parameter count is nearest to `target`: R2 (with U's width) in steps
    of n + d, then R3 in steps of d (order 2: R3 = 0). Ties go to the larger R3."""
    base = sae_param_count(n, d)
    if order == 2:
        guess = (target - base - 1) // (n + d)
        cands = [(r, 0) for r in range(guess - 1, guess + 3) if 1 <= r <= n]
    else:
        guess = (target - base - 2) // (n + 2 * d)
        cands = []
        for r in range(max(1, guess - 2), min(n, guess + 3) + 1):
            r3 = round((target - base - 2 - (n + d) * r) / d)
            cands += [(r, q) for q in (r3 - 1, r3, r3 + 1) if 1 <= q <= r] or [(r, 1 if r3 < 1 else r)]
    return min(cands, key=lambda c: (abs(poly_param_count(n, d, *c, order) - target), -c[1], c[0]))


def _qr_pos(mat: torch.Tensor) -> torch.Tensor:
    """Reduced QR with a positive diagonal on R (sign continuity across steps): polysae.py:354-363."""
    Q, R = torch.linalg.qr(mat, mode="reduced")
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1
    return Q * s


class PolyDecoder(nn.Module):
    """The interaction path of a PolySAE: lambda2 (a[:, :R2])^2 C2^T + lambda3 (a[:, :R3])^3 C3^T, a = f U.

    Mirrors the NFM's interface where it has a meaning (`hidden`, `interaction_from_hidden`, `interaction`,
    `forward`, `bi_interaction`, `V`, `pair_effect`, `interaction_leave_one_out`, `set_path_means`,
    `path_mean`, `param_counts`, `hparams`, `PATHS`); it has no linear path (the linear dictionary is the
    SAE's W_dec)."""

    PATHS = PATHS

    def __init__(self, cfg: PolyConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # the reference's init (polysae.py:128-163): U orthogonal, C Kaiming-uniform, lambda2 -0.5, lambda3 0.5
        U = torch.empty(cfg.n_features, cfg.rank)
        nn.init.orthogonal_(U)
        self.U = nn.Parameter(U)                                               # [n_features, R]
        C2 = torch.empty(cfg.d, cfg.rank2)
        nn.init.kaiming_uniform_(C2)
        self.C2 = nn.Parameter(C2)                                             # [d, R2]
        self.lambda2 = nn.Parameter(torch.tensor(float(cfg.lambda2_init)))
        if cfg.order == 3:
            C3 = torch.empty(cfg.d, cfg.rank3)
            nn.init.kaiming_uniform_(C3)
            self.C3 = nn.Parameter(C3)                                         # [d, R3]
            self.lambda3 = nn.Parameter(torch.tensor(float(cfg.lambda3_init)))
        # the interaction path's mean output on training tokens (mean-ablation), as NFM.set_path_means
        self.register_buffer("interaction_mean", torch.zeros(cfg.d))
        self.register_buffer("mean_tokens", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ sparse path
    def project(self, idx: torch.Tensor, val: torch.Tensor, code_t: TransposedCode | None = None) -> torch.Tensor:
        """a = f U over the k active latents: [batch, R] (the reference's a1 = z @ U_shared, polysae.py:245)."""
        code_t = code_t if code_t is not None else TransposedCode(idx, val, self.cfg.n_features)
        return _WeightedBag.apply(idx, val, self.U, code_t)

    def hidden_from_projection(self, a: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        parts = [a[:, :c.rank2] * a[:, :c.rank2]]                            # polysae.py:253-254
        if c.order == 3:
            a3 = a[:, :c.rank3]
            parts.append(a3 * a3 * a3)                                           # polysae.py:259-260
        return torch.cat(parts, 1)

    def hidden(self, idx: torch.Tensor, val: torch.Tensor, code_t: TransposedCode | None = None) -> torch.Tensor:
        """h = [a[:, :R2]^2, a[:, :R3]^3]: the interaction representation [batch, R2 + R3] (part3's input)."""
        return self.hidden_from_projection(self.project(idx, val, code_t))

    def interaction_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """lambda2 h2 C2^T + lambda3 h3 C3^T: [batch, d]."""
        r2 = self.cfg.rank2
        out = self.lambda2 * (h[:, :r2] @ self.C2.T)
        if self.cfg.order == 3:
            out = out + self.lambda3 * (h[:, r2:] @ self.C3.T)
        return out

    def interaction(self, idx: torch.Tensor, val: torch.Tensor, code_t: TransposedCode | None = None) -> torch.Tensor:
        return self.interaction_from_hidden(self.hidden(idx, val, code_t))

    def forward(self, idx: torch.Tensor, val: torch.Tensor, paths=PATHS) -> torch.Tensor:
        if "interaction" not in paths:
            return torch.zeros(idx.shape[0], self.cfg.d, device=idx.device, dtype=self.C2.dtype)
        return self.interaction(idx, val)

    # ------------------------------------------------------------------ dense reference and factors
    def forward_dense(self, f: torch.Tensor) -> torch.Tensor:
        """The reference's formula on a dense code f [batch, n_features] (polysae.py:245-261, less y1 and b_dec)."""
        return self.interaction_from_hidden(self.hidden_from_projection(f @ self.U))

    @property
    def V(self) -> torch.Tensor:
        """The pairwise factors u_i = U[i, :R2] [n_features, R2]: the quadratic term's a^2 = 2 p + sum_i f_i^2 u_i^2
        with p = sum_{i<j} f_i f_j (u_i * u_j) (`bi_interaction`), the NFM's pooling with V = these."""
        return self.U[:, :self.cfg.rank2]

    def bi_interaction(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """p = sum_{i<j} f_i f_j (u_i * u_j) = 1/2 [(sum_i f_i u_i)^2 - sum_i (f_i u_i)^2]: [batch, R2]."""
        fu = val[..., None] * self.V[idx]                                     # [batch, k, R2]
        s = fu.sum(1)
        return 0.5 * (s * s - (fu * fu).sum(1))

    def hidden_per_pooled(self) -> torch.Tensor:
        """d h / d p [R2 + R3, R2]: h's quadratic block is 2 p + (the features' own squares); its cubic block is
        not a function of p (zero rows here), so attributions through this cover the pairwise cross terms only."""
        J = torch.zeros(self.cfg.hidden, self.cfg.rank2, dtype=self.U.dtype, device=self.U.device)
        J[:self.cfg.rank2].fill_diagonal_(2.0)
        return J

    def pair_tensor(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """T2[i, j] = lambda2 sum_{r<R2} U_ir U_jr C2[:, r]: [..., d] (symmetric in i, j)."""
        return self.lambda2 * ((self.V[i] * self.V[j]) @ self.C2.T)

    def triple_tensor(self, i: torch.Tensor, j: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        """T3[i, j, l] = lambda3 sum_{r<R3} U_ir U_jr U_lr C3[:, r]: [..., d] (0 with order 2)."""
        if self.cfg.order != 3:
            return torch.zeros(*torch.broadcast_shapes(i.shape, j.shape, l.shape), self.cfg.d)
        U3 = self.U[:, :self.cfg.rank3]
        return self.lambda3 * ((U3[i] * U3[j] * U3[l]) @ self.C3.T)

    @torch.no_grad()
    def pair_effect(self, i: torch.Tensor, j: torch.Tensor, ci: torch.Tensor, cj: torch.Tensor) -> torch.Tensor:
        """||g(i, j) - g(i) - g(j) + g()|| with features i, j at activations ci, cj (g the interaction path):
        the pair's non-additive effect, as NFM.pair_effect. With x = ci u_i, y = cj u_j (rows of U):
        (x + y)^2 - x^2 - y^2 = 2 x y and (x + y)^3 - x^3 - y^3 = 3 x y (x + y), elementwise."""
        x, y = ci[:, None] * self.U[i], cj[:, None] * self.U[j]               # [n_pairs, R]
        c = self.cfg
        out = self.lambda2 * ((2 * x * y)[:, :c.rank2] @ self.C2.T)
        if c.order == 3:
            out = out + self.lambda3 * ((3 * x * y * (x + y))[:, :c.rank3] @ self.C3.T)
        return out.norm(dim=-1)

    @torch.no_grad()
    def interaction_leave_one_out(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """||g(f) - g(f without feature j)|| for each active feature j of each row: [batch, k]."""
        fu = val[..., None] * self.U[idx]                                     # [batch, k, R]
        a = fu.sum(1, keepdim=True)                                           # [batch, 1, R]
        g = lambda a: self.interaction_from_hidden(self.hidden_from_projection(a.reshape(-1, a.shape[-1])))  # noqa: E731
        full = g(a).reshape(a.shape[0], 1, -1)
        wo = g(a - fu).reshape(*fu.shape[:2], -1)
        return (full - wo).norm(dim=-1) * (val > 0)

    # ------------------------------------------------------------------ training pieces
    @torch.no_grad()
    def orthogonalize(self, eps_norm: float = 1e-6, eps_jitter: float = 1e-4, jitter_std: float = 1e-6) -> None:
        """Retract U onto orthonormal columns after an optimizer step: the reference's shared-U
        `orthogonalize_U` (polysae.py:414-417 with `_robust_qr_update`, 365-391)."""
        U = self.U.data
        fro = torch.linalg.norm(U)
        if fro < eps_norm:
            return
        if fro < eps_jitter:
            U = U + jitter_std * torch.randn_like(U)
        self.U.data.copy_(_qr_pos(U))

    # ------------------------------------------------------------------ path ablation
    @torch.no_grad()
    def set_path_means(self, codes, val: torch.Tensor | None = None, max_rows: int = 1 << 18) -> None:
        """Store the interaction path's mean output over training codes ((idx, val) [n, k] or a Rows giving
        (idx, val, ...)): an even stride of at most max_rows, summed in float64 a chunk at a time."""
        from .rows import as_rows

        rows = as_rows(codes if val is None else (codes, val))
        step = -(-rows.n // max_rows)
        was = self.training
        self.eval()
        n, total = 0, torch.zeros(self.interaction_mean.shape[0], dtype=torch.float64)
        for chunk in rows.chunks(8192, step):
            y = batched(self.interaction, chunk[0], chunk[1], batch=8192, device=module_device(self))
            n += y.shape[0]
            total += y.double().sum(0)
        self.interaction_mean.copy_((total / n).to(self.interaction_mean))
        self.mean_tokens.fill_(n)
        self.train(was)

    def path_mean(self, path: str) -> torch.Tensor:
        if path != "interaction":
            raise ValueError(f"a PolySAE has no {path!r} path")
        if int(self.mean_tokens) == 0:
            raise UserError("this PolySAE has no interaction path mean (an unfinished checkpoint); retrain it with "
                            "part5 --decoder poly")
        return self.interaction_mean

    def param_counts(self) -> dict:
        n = sum(p.numel() for p in self.parameters())
        return {"interaction": n, "total": n}

    def hparams(self) -> dict:
        return asdict(self.cfg)


class PolyJointModel(SharedCodePaths, nn.Module):
    """TopK encoder + [linear dictionary W_dec f + b_dec] + [PolySAE interaction path]; the interface of
    common.joint.JointModel (paths / paths_from / forward / loss / param_counts / hparams / from_tensors)."""

    PATHS = ("sae", "interaction")
    KIND = "poly"

    def __init__(self, sae_cfg: SAEConfig, poly_cfg: PolyConfig):
        super().__init__()
        self.sae = TopKSAE(sae_cfg)
        self.poly = PolyDecoder(poly_cfg)

    @property
    def interaction_model(self) -> PolyDecoder:
        """The module behind the non-SAE paths (JointModel: its NFM)."""
        return self.poly

    def paths_from(self, idx: torch.Tensor, val: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sae": self.sae.decode(idx, val), "interaction": self.poly.interaction(idx, val)}

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The plain formulation on a dense code (tests)."""
        sae_out, f = self.sae.forward_dense(x)
        return sae_out + self.poly.forward_dense(f)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        out, idx, val, picks = self.paths(x, aux=True)
        x_hat = out["sae"] + out["interaction"]
        total_var = dist.total_variance(x).clamp_min(1e-12)
        fvu = (x - x_hat).pow(2).sum() / total_var
        aux = self.sae.auxk_loss(picks, x, x_hat)
        self.sae.track_firing(idx, val, x.shape[0])
        return dist.scaled_loss(fvu + self.sae.cfg.auxk_alpha * aux, {"fvu": fvu.detach(), "auxk": aux.detach()})

    def after_step(self) -> None:
        """After each optimizer step: the SAE's unit-norm decoder rows, the reference's QR retraction of U."""
        self.sae.renorm_decoder()
        self.poly.orthogonalize()

    def param_counts(self) -> dict:
        sae = sum(p.numel() for p in self.sae.parameters())
        poly = self.poly.param_counts()["total"]
        return {"sae": sae, "poly_interaction": poly, "total": sae + poly}

    def hparams(self) -> dict:
        return {"decoder": "poly", "sae": self.sae.hparams(), "poly": self.poly.hparams()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], hp: dict) -> "PolyJointModel":
        m = cls(SAEConfig(**hp["sae"]), PolyConfig(**hp["poly"]))
        if "poly.mean_tokens" not in t:
            raise UserError("this PolySAE checkpoint holds no interaction path mean; retrain it with part5 --decoder poly")
        m.load_state_dict({k: v for k, v in t.items() if not k.startswith(("norm.", "init."))})
        return m.eval()
