"""Scoring a trained pipeline against planted ground truth (common/synthetic.py).

  share(y, p)      = sum_t <y_t - mean(y), p_t - mean(p)> / sum_t ||p_t - mean(p)||^2
                     the part of the (centred) planted component p that an output y carries, by projection;
                     centred so that a constant offset (which any bias can fit) does not count as recovery
  left in residual = share(r, p) with r = x - x_hat (normalised units); absorbed by the SAE = share(x_hat, p).
                     On planted data the two add up to share(x, p) (1 up to the small overlap of p with the
                     features and noise); on null data, which holds no p, both are about 0
  decoder match    = mean over true features of the max cosine between its direction and any decoder row
  pair ranking     = true features matched to their best-cosine latent; every pair of true features scored by
                     the NFM's pair effect ||NFM(a, b) - NFM(a) - NFM(b) + NFM()|| of the matched latents at
                     their typical (mean active) values (0 when both map to one latent: the NFM cannot see
                     that pair). Headline: AUC and precision@|P| of the planted pairs against the decoy pairs,
                     which co-occur as often (same mechanism in common/synthetic.py) but carry no interaction,
                     so chance (0.5) is what a score of co-occurrence alone gets. Second figure, labelled
                     *_vs_all_pairs: against every other pair, most of which are rarely co-active, so it
                     confounds "interacts" with "co-occurs". coactive_rate: the share of rows where both
                     features of a pair are active (true activations), averaged over planted pairs, decoys
                     and all pairs, to show that planted and decoys are matched. auc_chance_sd: the AUC's
                     standard deviation when planted pairs and decoys do not differ (Mann-Whitney, no ties),
                     the scale on which to read a null AUC's distance from 0.5
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata


def share(y: torch.Tensor, p: torch.Tensor) -> float:
    y, p = y.double(), p.double()
    yc, pc = y - y.mean(0), p - p.mean(0)
    return float((yc * pc).sum() / pc.pow(2).sum().clamp_min(1e-30))


def r2(y: torch.Tensor, p: torch.Tensor) -> float:
    """1 - ||p - y||^2 / ||p - mean(p)||^2: the share of p's variance that y reproduces."""
    y, p = y.double(), p.double()
    return 1.0 - float((p - y).pow(2).sum() / (p - p.mean(0)).pow(2).sum().clamp_min(1e-30))


def match_latents(decoder_dirs: torch.Tensor, true_dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each true direction [n_true, d]: (best latent index, its cosine) among decoder rows [n_latents, d]."""
    cos = torch.nn.functional.normalize(true_dirs.double(), dim=1) @ torch.nn.functional.normalize(decoder_dirs.double(), dim=1).T
    best, idx = cos.max(1)
    return idx, best


def all_pairs(n: int) -> torch.Tensor:
    return torch.combinations(torch.arange(n), 2)                      # [n (n-1) / 2, 2]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / n_pos n_neg), ties averaged."""
    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, kind="stable")[:k]
    return float(positive[top].mean())


def typical_values(idx: torch.Tensor, val: torch.Tensor, n_features: int) -> torch.Tensor:
    """Mean value of each feature over the rows where it is active (1 where it never is)."""
    active = val > 0
    total = torch.zeros(n_features, dtype=torch.float64).index_add_(0, idx[active], val[active].double())
    count = torch.bincount(idx[active], minlength=n_features).double()
    return torch.where(count > 0, total / count.clamp_min(1), torch.ones_like(total)).float()


def pair_ranking(nfm, latent_of: torch.Tensor, typical: torch.Tensor, planted_pairs: torch.Tensor,
                 decoy_pairs: torch.Tensor, true_acts: torch.Tensor) -> dict:
    """Planted pairs ranked by NFM pair effect against the co-occurrence-matched decoys (`auc`,
    `precision_at_P`) and against all other pairs of true features (`*_vs_all_pairs`); latent_of [n_true]
    maps true features to latents, true_acts [n, n_true] gives each pair's co-activation rate."""
    n_true = latent_of.shape[0]
    pairs = all_pairs(n_true)
    a, b = latent_of[pairs[:, 0]], latent_of[pairs[:, 1]]
    dev = nfm.V.device
    scores = nfm.pair_effect(a.to(dev), b.to(dev), typical[a].to(dev), typical[b].to(dev)).cpu().double()
    scores[a == b] = 0.0
    score_of = torch.zeros(n_true, n_true, dtype=torch.float64)          # symmetric lookup by feature pair
    score_of[pairs[:, 0], pairs[:, 1]] = score_of[pairs[:, 1], pairs[:, 0]] = scores
    on = (true_acts > 0).float()                                         # counts stay exact in float32
    coactive = (on.T @ on).double() / on.shape[0]                        # [n_true, n_true]
    P, D = planted_pairs.long(), decoy_pairs.long()
    matched = torch.cat([score_of[P[:, 0], P[:, 1]], score_of[D[:, 0], D[:, 1]]]).numpy()
    positive = np.arange(len(matched)) < len(P)
    planted = {tuple(sorted(p)) for p in P.tolist()}
    positive_all = np.array([tuple(p) in planted for p in pairs.tolist()])
    shared = latent_of[:, None] == latent_of[None, :]
    return {"auc": auc(matched, positive), "precision_at_P": precision_at(matched, positive, len(P)),
            "auc_chance_sd": float(np.sqrt((len(P) + len(D) + 1) / (12 * len(P) * len(D)))),
            "auc_vs_all_pairs": auc(scores.numpy(), positive_all),
            "precision_at_P_vs_all_pairs": precision_at(scores.numpy(), positive_all, len(P)),
            "coactive_rate": {"planted": float(coactive[P[:, 0], P[:, 1]].mean()),
                              "decoys": float(coactive[D[:, 0], D[:, 1]].mean()),
                              "all_pairs": float(coactive[pairs[:, 0], pairs[:, 1]].mean())},
            "planted_pairs_sharing_one_latent": int(shared[P[:, 0], P[:, 1]].sum()),
            "decoys_sharing_one_latent": int(shared[D[:, 0], D[:, 1]].sum())}


def oracle_codes(true_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, val) of the true activations, padded to the largest active count with zero weights."""
    k = max(1, int((true_acts > 0).sum(1).max()))
    val, idx = true_acts.topk(k, dim=1)
    return idx, val
