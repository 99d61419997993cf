"""TopK sparse autoencoder: the recipe the literature settled on, with a sparse fast path.

    pre  = W_enc (x - b_dec) + b_enc                         # [batch, n_latents]
    f    = TopK_k(ReLU(pre))  as (idx, val)                  # [batch, k] each
    x_hat = sum_j val_j W_dec[idx_j] + b_dec                 # [batch, d]; embedding_bag over the top-k

Recipe and where it comes from:
  - tied init: W_dec = W_enc at init, rows unit norm (OpenAI Gao et al. 2024; sparsify; dictionary_learning);
  - b_dec initialised from the data: the mean of the first training batch (sparsify; Anthropic's proposal);
  - decoder rows kept at unit norm: the gradient component parallel to each row is removed before the step,
    rows renormalised after it (OpenAI, sparsify, dictionary_learning);
  - AuxK, OpenAI's recipe as in their reference code (openai/sparse_autoencoder, sparse_autoencoder/train.py;
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): the top-k_aux *dead* latents (no firing
    for `dead_tokens` tokens), ReLU'd, reconstruct the residual e = x - x_hat (detached), loss
    normalized_mse(e_hat + b_dec, e + b_dec.detach()) = ||e_hat - e||^2 / ||e - mean(e)||^2, normalised by
    the variance of the *residual* (of the global batch under torchrun), not scaled by the number of dead
    latents, coefficient 1/32; k_aux = d/2 (the paper's heuristic as sparsify reads it; train.py's config
    has 256 at d_model 768), at most n_dead. Where this differs from train.py: the dead set is the one
    before this batch (train.py updates its counters with the batch first), a latent fires when its value
    is > 0 (train.py: > 1e-3), dead means >= dead_tokens tokens (train.py: > a number of steps), and no
    AuxK term is formed while nothing is dead (train.py's is then a constant without gradient). Kept over EleutherAI sparsify's variant (`SparseCoder.forward`: b_dec in e_hat but not in
    the target, divided by the variance of x, scaled by min(n_dead / (d/2), 1)), which had a higher
    held-out FVU on the demo and the bench (bench/RESULTS.md, "AuxK recipe (issue 12)");
  - loss = FVU of the batch (scale-free, as sparsify);
  - optimizer: schedule-free SignSGD, lr = 5e-3 / sqrt(n_latents / 2^14), sparsify's default
    (common/optim.py). Side by side on the same activations and tokens (bench/bench_sae_peers.py) it reached
    about a quarter of the held-out FVU that Adam at the dictionary_learning rate 2e-4 / sqrt(n_latents / 2^14)
    reached; Adam stays available (`--optimizer adam`);
  - the averaged iterate x keeps the unit-norm constraint only approximately (an average of unit vectors
    is shorter: rows ended at norms 0.82-0.99 on the demo), so the evaluated and saved model is x with its
    decoder rows projected back onto the unit sphere. This is also the better model: held-out FVU 0.0104
    against 0.0128 for raw x and 0.0118 for the last iterate y (demo, 200 steps of 4096; bench/RESULTS.md).
The original study's SAE (`--recipe reference`, common/recipe.py; `SAEConfig(b_dec=False, unit_norm=False,
init="linear-default-tied", loss="mse")`): no b_dec, free decoder norms, PyTorch's default Linear init tied to the
encoder, MSE loss, no AuxK, trained with the reference's Adam (eps 1e-5, clip 1.0, LinearLR).
Fast path: the encoder backward touches only the top-k entries (custom autograd function, as sparsify's
fused encoder), the decoder is `F.embedding_bag`. `forward_dense` is the plain reference (dense
[batch, n_latents] code, matmul decoder); tests check outputs and gradients agree.
W_dec is stored [n_latents, d] (one row per latent) so embedding_bag reads it directly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .errors import UserError
from .sparse import TransposedCode, _PairBag
from .train import module_device


@dataclass
class SAEConfig:
    d: int
    n_latents: int
    k: int
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 10_000_000
    # the original study's SAE (--recipe reference, common/recipe.py) switches these three off / to "mse":
    b_dec: bool = True                 # a trained decoder bias, subtracted before the encoder
    unit_norm: bool = True             # decoder rows kept at unit norm
    init: str = "tied-unit"            # "tied-unit" (W_dec = W_enc, rows unit norm) or "linear-default-tied"
    loss: str = "fvu"                  # "fvu" (scale-free) or "mse" (mean over rows and dims)

    def validate(self) -> None:
        if self.n_latents <= 0 or self.k <= 0 or self.d <= 0:
            raise UserError(f"sizes must be positive (d={self.d}, n_latents={self.n_latents}, k={self.k})")
        if self.k > self.n_latents:
            raise UserError(f"--k {self.k} exceeds --n-latents {self.n_latents}; choose k <= n_latents")
        if self.init not in SAE_INITS or self.loss not in ("fvu", "mse"):
            raise UserError(f"unknown SAE init {self.init!r} or loss {self.loss!r}; the checkpoint is from a newer "
                            f"version of this tool, update it")


SAE_INITS = ("tied-unit", "linear-default-tied")


def recipe_options(name: str) -> dict:
    """SAEConfig fields a --recipe sets: none for the default; for the reference (common/recipe.py,
    original_study.md §2.2-2.3) no b_dec, free decoder norms, PyTorch's default Linear init tied to the encoder
    and the MSE loss. (Its "no AuxK" is the --auxk-alpha default the recipe sets, so a flag can still turn it on.)"""
    if name != "reference":
        return {}
    from . import recipe
    return {"b_dec": recipe.SAE_B_DEC, "unit_norm": recipe.SAE_UNIT_NORM, "init": recipe.SAE_INIT,
            "loss": recipe.SAE_LOSS}


class _TopKEncode(torch.autograd.Function):
    """Top-k of ReLU(x @ W^T + b), and optionally AuxK's top-k_aux among the dead latents; the backward only
    touches the selected entries (k + k_aux per row), as sparsify's fused encoder.

    ReLU is applied to the k picked values rather than to the whole [batch, n_latents] matrix: ReLU is
    monotone, so the picks' values are the same (when fewer than k are positive the extra picks are 0 either
    way and get no gradient), and one pass over the largest tensor of the step is saved.

    With AuxK the encoder product is split by column, live latents and dead ones (the weight rows gathered,
    [n, d], rather than the dead pre-activations, [batch, n_dead]: never more bytes while batch >= d). The
    dead block's top max(k_aux, k) are both AuxK's picks and the dead candidates of the main top-k, so the
    main top-k runs over the live columns' top-k and those: the same picks as one top-k over every column,
    with no top-k over the dead columns for the main code. The combined code [idx | aux_idx] is sorted once
    (`TransposedCode`, lazily) for the encoder's gradient and, through `_PairBag`, the decoder's.

    b_dec is subtracted here rather than by the caller so that its gradient is -(grad b_enc) @ W_enc, an
    [n] x [n, d] product, instead of the sum over the batch of grad x = g @ W_enc[picks], which is only
    formed when x itself requires a gradient (the SAE's inputs are data)."""

    @staticmethod
    def forward(ctx, x, b_dec, weight, bias, k: int, dead_ids, k_aux: int, live_ids=None, code_box=None):
        x = x - b_dec                                     # [batch, d]
        if dead_ids is None:
            pre = F.linear(x, weight, bias)               # [batch, n_latents], the step's one dense matmul
            val, idx = pre.topk(k, dim=-1, sorted=False)  # [batch, k]
            aval, aidx = val.new_zeros(x.shape[0], 0), idx.new_zeros(x.shape[0], 0)
        else:
            aval, aidx, val, idx = _split_topk(x, weight, bias, k, dead_ids, k_aux, live_ids)
        val, aval = val.clamp_min(0), aval.clamp_min(0)
        comb = torch.cat([idx, aidx], 1)                  # [batch, k + k_aux]
        ctx.code = TransposedCode(comb, torch.cat([val, aval], 1), weight.shape[0])
        if code_box is not None:
            code_box.append(ctx.code)                     # for the decoder's backward (_PairBag)
        ctx.save_for_backward(x, weight, comb, ctx.code.val)
        ctx.mark_non_differentiable(idx, aidx)
        return val, idx, aval, aidx

    @staticmethod
    def backward(ctx, grad_val, _grad_idx, grad_aval, _grad_aidx):
        x, weight, idx, val = ctx.saved_tensors
        # unused outputs arrive as zeros (autograd materialises them), so both parts are always there
        g = torch.cat([grad_val, grad_aval], 1) * (val > 0)   # ReLU derivative: zero-valued picks get no gradient
        g = g.to(weight.dtype)
        grad_x = grad_bdec = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, weight, per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[2]:
            grad_w = ctx.code.csr_with(g) @ x             # the code's sort, shared with the decoder's backward
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, idx.reshape(-1), g.reshape(-1))                 # [n_latents]
            if ctx.needs_input_grad[1]:
                grad_bdec = -(grad_b @ weight)                                   # [d]
        return (grad_x, grad_bdec, grad_w, grad_b if ctx.needs_input_grad[3] else None,
                None, None, None, None, None)


def _split_topk(x, weight, bias, k: int, dead_ids, k_aux: int, live_ids):
    """(AuxK's pre-ReLU picks and ids [batch, k_aux], the main top-k's [batch, k]) from the dead and live
    column blocks of the encoder product (see _TopKEncode)."""
    n_dead = dead_ids.numel()
    # the bias as one more input column: the rows are gathered anyway, and addmm's bias would first be
    # broadcast-copied into the whole [batch, n] output
    wb = torch.cat([weight, bias[:, None]], 1)                                 # [n_latents, d + 1]
    x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)                           # [batch, d + 1]
    pre_d = x @ wb[dead_ids].T                                                 # [batch, n_dead]
    kd = max(k_aux, min(k, n_dead))
    dval, dj = pre_d.topk(kd, dim=-1, sorted=False)                            # [batch, kd]
    del pre_d
    if kd > k_aux:                                                             # k > k_aux: AuxK's are the best
        aval, a = dval.topk(k_aux, dim=-1, sorted=False)
        aj = dj.gather(1, a)
    else:
        aval, aj = dval, dj
    cval, cidx = dval, dead_ids[dj]
    if live_ids.numel():
        pre_l = x @ wb[live_ids].T                                             # [batch, n_live]
        lval, lj = pre_l.topk(min(k, live_ids.numel()), dim=-1, sorted=False)
        cval, cidx = torch.cat([lval, cval], 1), torch.cat([live_ids[lj], cidx], 1)
    val, c = cval.topk(k, dim=-1, sorted=False)                                # [batch, k]
    return aval, dead_ids[aj], val, cidx.gather(1, c)


class SharedCodePaths:
    """For joint models (common/joint.py, common/poly.py): one TopK encoder `self.sae` whose code feeds several
    additive paths, named in `PATHS` and computed by `paths_from(idx, val)`."""
    PATHS: tuple = ()

    def paths(self, x: torch.Tensor, aux: bool = False):
        """Each path's output [batch, d] for normalised x [batch, d], and the code (idx, val)
        (plus AuxK's dead-latent picks when aux=True, for training)."""
        if aux:
            idx, val, picks = self.sae.encode_with_aux(x)
            return self.paths_from(idx, val), idx, val, picks
        idx, val = self.sae.encode(x)
        return self.paths_from(idx, val), idx, val

    def forward(self, x: torch.Tensor, paths=None) -> torch.Tensor:
        """The sum of the chosen paths (default: all of PATHS)."""
        out, _, _ = self.paths(x)
        return sum(out[p] for p in (paths or self.PATHS))


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if cfg.init == "linear-default-tied":
            # the reference: the decoder nn.Linear(n_latents, d)'s default init (uniform +-1/sqrt(n_latents), squared
            # row norms ~ d / (3 n_latents)), the encoder weight set to the decoder's transpose (both [n_latents, d])
            w = nn.Linear(cfg.n_latents, cfg.d).weight.data.T.contiguous()
            w_enc, w_dec = w.clone(), w.clone()
        else:
            enc = nn.Linear(cfg.d, cfg.n_latents)         # Kaiming-uniform init, as sparsify
            w_enc, w_dec = enc.weight.data.clone(), F.normalize(enc.weight.data.clone(), dim=1)
        self.W_enc = nn.Parameter(w_enc)                                    # [n_latents, d]
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))               # [n_latents]
        self.W_dec = nn.Parameter(w_dec)                                    # [n_latents, d], tied init
        # [d]; without b_dec (the reference) it stays zero and untrained, so every code path is the same
        self.b_dec = nn.Parameter(torch.zeros(cfg.d), requires_grad=cfg.b_dec)
        # tokens since each latent last fired (AuxK's notion of "dead"); not a parameter
        self.register_buffer("since_fired", torch.zeros(cfg.n_latents, dtype=torch.long))

    # ------------------------------------------------------------------ fast (sparse) path
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [batch, d] (normalised) -> (idx [batch, k] long, val [batch, k] >= 0)."""
        val, idx, _, _ = _TopKEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, self.cfg.k, None, 0)
        return idx, val

    def encode_with_aux(self, x: torch.Tensor):
        """Training encode: (idx, val, aux) where aux = (aux_idx [batch, k_aux], aux_val) holds AuxK's
        top-k_aux dead latents from the same encoder product, or None when no latent is dead (or AuxK is off).
        k_aux = min(d/2, n_dead): the reference picks its top k_aux of the pre-activations with the live ones
        zeroed, so past n_dead it picks zeros, which ReLU leaves without value or gradient."""
        idx, val, aux, _ = self._encode_aux(x)
        return idx, val, aux

    def _encode_aux(self, x: torch.Tensor):
        """encode_with_aux, plus the combined code's TransposedCode (for `_PairBag`), or None without AuxK."""
        dead = self.since_fired >= self.cfg.dead_tokens
        dead_ids = dead.nonzero().squeeze(1)                                        # [n_dead]
        n_dead = dead_ids.numel()
        if n_dead == 0 or self.cfg.auxk_alpha == 0:
            return (*self.encode(x), None, None)
        k_aux = min(self.cfg.d // 2, n_dead)
        box: list = []
        val, idx, aval, aidx = _TopKEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, self.cfg.k, dead_ids, k_aux,
                                                 (~dead).nonzero().squeeze(1), box)
        return idx, val, (aidx, aval), box[0]

    def decode(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=val, mode="sum") + self.b_dec  # [batch, d]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, val = self.encode(x)
        return self.decode(idx, val), idx, val

    # ------------------------------------------------------------------ dense reference path
    def forward_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain formulation: dense code f [batch, n_latents], x_hat = f @ W_dec + b_dec."""
        pre = F.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)
        val, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter(1, idx, val)
        return f @ self.W_dec + self.b_dec, f

    # ------------------------------------------------------------------ training pieces
    def auxk_loss(self, aux, x: torch.Tensor, x_hat: torch.Tensor, aux_hat: torch.Tensor | None = None) -> torch.Tensor:
        """OpenAI's AuxK (train.py): normalized_mse(decode_sparse(auxk_inds, auxk_vals),
        x - recons.detach() + pre_bias.detach()), normalized_mse(r, t) = ||r - t||^2 / ||t - mean(t)||^2.
        The denominator is the variance of the residual e = x - x_hat (of the global batch under torchrun).
        aux_hat: decode(*aux) when the caller has it already."""
        if aux is None:
            return x.new_zeros(())
        e = (x - x_hat).detach()                                  # [batch, d]
        target = e + self.b_dec.detach()      # decode adds b_dec: the value cancels, b_dec still gets a gradient
        aux_hat = self.decode(*aux) if aux_hat is None else aux_hat
        return (aux_hat - target).pow(2).sum() / dist.total_variance(e).clamp_min(1e-12)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        idx, val, aux, code = self._encode_aux(x)
        if aux is None:
            x_hat, aux_hat = self.decode(idx, val), None
        else:                 # both decodes in one op: one CSR product, on the encoder's sort, for W_dec's gradient
            x_hat, aux_hat = _PairBag.apply(idx, val, aux[0], aux[1], self.W_dec, code)
            x_hat, aux_hat = x_hat + self.b_dec, aux_hat + self.b_dec
        total_var = dist.total_variance(x).clamp_min(1e-12)     # of the global batch under torchrun
        sse = (x - x_hat).pow(2).sum()
        fvu = sse / total_var
        auxk = self.auxk_loss(aux, x, x_hat, aux_hat)
        self.track_firing(idx, val, x.shape[0])
        main = fvu if self.cfg.loss == "fvu" else sse / (x.numel() * dist.world())   # mse: of the global batch
        return dist.scaled_loss(main + self.cfg.auxk_alpha * auxk, {"fvu": fvu.detach(), "auxk": auxk.detach()})

    @torch.no_grad()
    def track_firing(self, idx: torch.Tensor, val: torch.Tensor, n_tokens: int) -> None:
        """Update the tokens-since-last-fired counters that define AuxK's dead latents."""
        fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
        fired[idx[val > 0]] = True
        if dist.initialized():                       # a latent is alive if it fired on any rank's rows
            fired = dist.all_reduce_(fired.int(), "max").bool()
            n_tokens *= dist.world()
        self.since_fired += n_tokens
        self.since_fired[fired] = 0

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor) -> None:
        if self.cfg.b_dec:
            self.b_dec.copy_(x.mean(0))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        if self.W_dec.grad is not None and self.cfg.unit_norm:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def renorm_decoder(self) -> None:
        if self.cfg.unit_norm:
            self.W_dec.data = F.normalize(self.W_dec.data, dim=1)

    # ------------------------------------------------------------------ (de)serialisation
    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + k: v for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], cfg: dict, prefix: str = "") -> "TopKSAE":
        sae = cls(SAEConfig(**cfg))
        sae.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
        return sae.eval()

    def hparams(self) -> dict:
        return asdict(self.cfg)


def default_dead_tokens(steps: int, batch_size: int) -> int:
    """OpenAI's 10M tokens without firing, capped at a tenth of a short run so AuxK can act at all."""
    return min(10_000_000, max(batch_size, steps * batch_size // 10))


OPTIMIZERS = ("signsgd-sf", "adam", "adam-reference")
DEFAULT_OPTIMIZER = "signsgd-sf"


def default_lr(n_latents: int, optimizer: str = DEFAULT_OPTIMIZER) -> float:
    """Learning rate scaled with 1/sqrt(dictionary size), as sparsify and dictionary_learning do:
    5e-3 / sqrt(n/2^14) for schedule-free SignSGD (sparsify's default), 2e-4 / sqrt(n/2^14) for Adam; the
    reference's Adam, 1e-4 at any size (common/recipe.py)."""
    if optimizer == "adam-reference":
        from .recipe import LR
        return LR
    base = 5e-3 if optimizer == "signsgd-sf" else 2e-4
    return base / math.sqrt(n_latents / 2 ** 14)


def encode_all(sae: TopKSAE, x: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k codes for many rows: (idx [n, k] long, val [n, k] float32), on the CPU."""
    from .train import batched
    return batched(lambda xb: sae.encode(xb.float()), x, batch=batch, device=module_device(sae))


def reconstruct_all(sae: TopKSAE, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    from .train import batched
    return batched(lambda xb: sae(xb.float())[0], x, batch=batch, device=module_device(sae))


def train_sae(sae: TopKSAE, train_x, select_x: torch.Tensor, steps: int, batch_size: int,
              lr: float, eval_every: int, seed: int, desc: str, optimizer: str = DEFAULT_OPTIMIZER,
              ckpt=None, tag: str = "sae", keep_latest: bool = False):
    """Train on normalised rows train_x (a tensor [n, d] or a Rows, common/rows.py: read per batch); select the
    best step by FVU on select_x. Returns FitResult. ckpt/tag: training state for --resume (TrainCheckpoints)."""
    from .metrics import recon_stats
    from .rows import as_rows
    from .train import fit

    dev = module_device(sae)
    rows = as_rows(train_x)
    first = torch.randperm(rows.n, generator=torch.Generator().manual_seed(seed))[:batch_size]
    sae.init_b_dec(rows.take(first).to(dev).float())

    def step_loss(idx):
        return sae.loss(rows.gather(idx).to(dev, non_blocking=True).float())

    def evaluate():
        st = recon_stats(sae, select_x)
        return {"val_loss": st["fvu"], "val_fvu": st["fvu"], "val_l0": st["l0"]}

    res = fit(sae, rows.n, batch_size, steps, lr, step_loss, evaluate, eval_every, seed, desc,
              before_step=sae.remove_parallel_grad, after_step=sae.renorm_decoder, optimizer=optimizer,
              eval_transform=sae.renorm_decoder if sae.cfg.unit_norm else None, ckpt=ckpt, tag=tag,
              shuffle=rows.shuffle, keep_latest=keep_latest)
    rows.release()                                      # the block cache: not needed after training
    return res


def load_topk_sae(path, flag: str = "--sae", kind: str = "sae"):
    """(sae, normalizer, config) from a checkpoint folder in this project's format (part1, part3, part5's
    baseline). Stages load SAEs through common/loading.py, which also accepts SAELens folders."""
    from .checkpoint import load
    from .normalize import Normalizer

    tensors, cfg = load(path, kind, flag)
    sae = TopKSAE.from_tensors({k: v for k, v in tensors.items() if not k.startswith(("norm.", "init."))}, cfg["hparams"])
    return sae, Normalizer.from_tensors(tensors, cfg["normalize"]), cfg


@torch.no_grad()
def batch_codes(sae: TopKSAE, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one batch of normalised rows: (idx [b, k], val [b, k], r = x - x_hat [b, d]) on the SAE's device.
    What the streaming stages compute per training batch, instead of holding codes for every token."""
    x = x_norm.to(module_device(sae), non_blocking=True).float()
    idx, val = sae.encode(x)
    return idx, val, x - sae.decode(idx, val)


@torch.no_grad()
def codes_and_residuals(sae: TopKSAE, x_norm: torch.Tensor, batch: int = 4096):
    """For normalised rows: top-k code (idx, val) and the residual r = x - x_hat, all [n, ...]."""
    from .train import batched
    idx, val = encode_all(sae, x_norm, batch)
    x_hat = batched(sae.decode, idx, val, batch=batch, device=module_device(sae))
    return idx, val, x_norm.float() - x_hat
