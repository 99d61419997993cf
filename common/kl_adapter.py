"""A KL-restoring control for part6 (Karvonen 2025): the frozen SAE plus a linear adapter trained on the KL
divergence of the spliced LM's next-token distribution from the original one.

    x_spliced = x_hat + x A + f B + c       x: the normalised layer-L activation [n, d]; f: the SAE's code
    loss      = mean over kept positions of KL(P_orig || P_spliced)

Why: Karvonen (arXiv 2503.17272) and Chen et al. (ICML 2025) found that small generic corrections trained on
KL (KL fine-tunes, LoRA, linear adapters) close 20-55% of the splice gap, so an NFM's KL gain means little until
it is read beside one. Size: a linear map of x alone has d^2 + d parameters, far below the NFM's; reading the
code as well (B has one row per latent, the shape of the NFM's linear path) gives (n_latents + d) d + d, the
largest linear adapter on the inputs the SAE and the NFM have. Both counts are recorded in part6's metrics.
A, B and c start at zero, so training starts from the SAE alone. Training sequences come from the training
split; the step kept is the one with the lowest KL on selection-half held-out documents, never the test half
part6 reports on; if no evaluated step beats the zero adapter there, the zero adapter (the SAE alone) is kept.
Adam at a small learning rate (default 1e-4): at 1e-3 its per-parameter steps random-walk A and B into
reconstructions farther from x than the SAE's own error, and the demo's held-out KL rose 31%.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from .data import batch_sequences, iter_documents, iter_heldout_half_sequences, iter_sequences, keep_mask
from .hooks import splice
from .sparse import TransposedCode, _WeightedBag
from .train import fit


class LinearAdapter(nn.Module):
    """x A + f B + c for normalised x [n, d] and the code (idx, val) [n, k]."""

    def __init__(self, n_latents: int, d: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(d, d))              # [d, d]
        self.B = nn.Parameter(torch.zeros(n_latents, d))      # [n_latents, d]
        self.c = nn.Parameter(torch.zeros(d))                 # [d]
        self.n_latents = n_latents

    def forward(self, x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        bag = _WeightedBag.apply(idx, val, self.B, TransposedCode(idx, val, self.n_latents))
        return x @ self.A + bag + self.c

    def hparams(self) -> dict:
        return {"n_latents": self.n_latents, "d": self.A.shape[0]}


def _pool(seqs, n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n sequences, right-padded: (ids, mask) [n, pos]."""
    got = [s for s, *_ in itertools.islice(seqs, n)]
    if not got:
        raise ValueError("no sequences")
    return batch_sequences(got, pad)


def spliced_kl(lm, tok, spec, sae, norm, adapter, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(P_orig || P_spliced) over kept positions for a batch of sequences, with gradients to the adapter."""
    keep = keep_mask(tok, mask, spec.keep_bos).to(ids.device)                 # [batch, pos]
    with torch.no_grad():
        logp_o = lm(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)

    def fn(h):
        x = norm.encode(h[keep].float())                                       # [n_kept, d]
        with torch.no_grad():
            x_hat, idx, val = sae(x)
        new = h.clone()
        new[keep] = norm.decode(x_hat + adapter(x, idx, val)).to(h.dtype)
        return new

    with splice(lm, spec.layer, fn):
        logp = lm(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    kl = (logp_o.exp() * (logp_o - logp)).sum(-1)                              # [batch, pos]
    return kl[keep].mean()


def train_kl_adapter(lm, tok, spec, sae, norm, steps: int, batch_seqs: int, lr: float, seed: int,
                     selection_docs: int = 16) -> tuple[LinearAdapter, dict]:
    """Fit the adapter for `steps` steps of `batch_seqs` training sequences; returns it and its budget."""
    device = next(lm.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_pool = max(batch_seqs, min(steps * batch_seqs, 4096))
    ids, mask = _pool(iter_sequences(tok, iter_documents(spec.dataset, "train", spec.val_fraction), spec.seq_len),
                      n_pool, pad)
    sel_ids, sel_mask = _pool(iter_heldout_half_sequences(tok, spec, selection_docs, "selection"), 4 * selection_docs, pad)
    adapter = LinearAdapter(sae.cfg.n_latents, sae.cfg.d).to(device)

    def step_loss(rows):
        kl = spliced_kl(lm, tok, spec, sae, norm, adapter, ids[rows].to(device), mask[rows].to(device))
        return kl, {"kl": kl.item()}

    @torch.no_grad()
    def evaluate():
        kl = sum(float(spliced_kl(lm, tok, spec, sae, norm, adapter, sel_ids[s:s + batch_seqs].to(device),
                                  sel_mask[s:s + batch_seqs].to(device))) * min(batch_seqs, sel_ids.shape[0] - s)
                 for s in range(0, sel_ids.shape[0], batch_seqs)) / sel_ids.shape[0]
        return {"val_loss": kl}

    torch.manual_seed(seed)
    start_kl = evaluate()["val_loss"]               # the zero adapter: the SAE alone
    res = fit(adapter, ids.shape[0], batch_seqs, steps, lr, step_loss, evaluate, max(1, steps // 5), seed,
              "train KL adapter (control)")
    best_kl = min(h["val_loss"] for h in res.history if "val_loss" in h)
    if best_kl >= start_kl:                         # no evaluated step beat the SAE alone on the selection half
        for p in adapter.parameters():
            p.data.zero_()
    n_tokens = int(keep_mask(tok, mask, spec.keep_bos).sum())
    return adapter, {"params": sum(p.numel() for p in adapter.parameters()), "steps": steps,
                     "best_step": res.best_step if best_kl < start_kl else 0,
                     "selection_kl": {"sae_alone": start_kl, "best_step": best_kl},
                     "sequences_per_step": batch_seqs, "lr": lr,
                     "training_sequences": int(ids.shape[0]), "training_tokens_in_pool": n_tokens,
                     "tokens_seen": int(steps * batch_seqs * n_tokens / ids.shape[0]),
                     "selection": f"lowest KL on {sel_ids.shape[0]} sequences of {selection_docs} selection-half "
                                  f"held-out documents", "history": res.history}
