"""Conjunction latents: interactions the primary SAE has absorbed into latents of its own.

When the data hold a pair interaction, x = ... + a_i d_i + a_j d_j + g(a_i, a_j) u_ij, a TopK SAE learns a latent
c that fires when i and j are both present, with a decoder row W_c ~ alpha d_i + beta d_j + gamma u_ij: a
direction u_ij outside span(d_i, d_j), and the parents' own latents then fire less (absorption; in the planted
validation they fire on 15-45% of the rows where both features are present). A pair that merely co-occurs (a
decoy) may get a latent too, but its decoder stays in span(d_i, d_j) and the data hold nothing beyond the two
parents along any new direction. Co-firing alone cannot tell the two apart, so the detector combines three
principles. Notation: x a row in the SAE's normalised space, mu the mean row, W = W_dec [n_latents, d], F_c
the rows where latent c fires (value > 0), P(.) a share of rows.

Pass 1 (fit rows): centroids and parents.
    M_c     = mean_{F_c} x - mu                           centred centroid of c's rows              [n, d]
    tau_a   = <M_a, W_a>                                  a's typical signal on its own rows
    candidates(c) = the n_candidates latents a with the largest shift <M_c, W_a> / sd_a (sd_a^2 = W_a' Cov(x) W_a),
                    a != c, not a near-duplicate of c (|cos(W_a, W_c)| < dup_cos), firing on >= min_rows rows
    excess(a|c)   = P(a fires | c fires) - P(a fires)     counted for the candidates only (pass 1b)
    parents(c)    = the two candidates with the largest excess co-firing. An absorbed parent still co-fires with
                    c far above its base rate, while a latent that only shares decoder cross-talk with c does not
                    (it named 24, 23 and 24 of the 24 planted pairs at validation seeds 0, 1, 2).
    pi(a|c)       = <M_c, W_a> / tau_a                    presence of a's *signal* on c's rows, 1 = as strong
                                                          as where a fires itself; counts absorbed parents
Principle G, geometry (a new direction): regress W_c on the parents' rows,
    W_c = coef_a W_a + coef_b W_b + rest,   rho_c = ||rest|| / ||W_c||,   n_c = rest / ||rest||
  rho ~ 0 for a co-occurrence latent (it only re-adds its parents), 0.7-0.95 for a planted conjunction latent.

Pass 2 (test rows, by default the fit rows): row-level presence and the two row principles.
    a present in x  <=>  <x - mu, W_a> >= presence_threshold * tau_a        (stand-in for the true feature)
Principle F, firing: c's firing set against the parents' co-presence set B = {a and b present}:
    recall_c = P(c fires | B),  precision_c = P(B | c fires),  jaccard_c = |F_c & B| / |F_c | B|
Principle D, data: an interaction contrast along the new direction. t = <x - mu, n_c>, rows in the 2 x 2 cells
of (a present, b present):
    Delta_c  = mean(t | a, b) - mean(t | a, not b) - mean(t | not a, b) + mean(t | not a, not b)
    z_c      = Delta_c / sqrt(sum_cells var(t | cell) / n_cell)
    effect_c = Delta_c / (E[value_c | c fires] <W_c, n_c>)    the share of what c writes along n_c that the
                                                               data's non-additivity accounts for
  Delta_c reads the data, not the SAE: 0 for a pair that adds, E[g] <u_ij, n_c> for a planted interaction.
  It is *not* an unbiased test: presence is a threshold on projections, and in superposition c's own feature
  leaks into both parents' projections, so an ordinary latent shows Delta > 0 too (null data: z 2-12 at
  54k rows, effect up to ~0.8). z and effect therefore serve as gates next to the firing evidence, which is
  what excludes ordinary latents, not as calibrated p-values.

Detection: a latent c is a conjunction latent with parents (a, b) when
    it fires on >= min_rows fit rows,  min(excess) >= min_excess,  min(pi) >= min_presence   (F, fit rows)
    recall >= min_recall,  jaccard >= min_jaccard                                           (F, test rows)
    rho >= min_rho                                                                          (G)
    effect >= min_effect,  z >= z_crit (one-sided Bonferroni at alpha over the examined latents)   (D)
and it is not an *echo*: when a detected c has a detected parent p whose own parents include c (a parent latent
of a conjunction latent looks like a conjunction of the conjunction), only the higher-scoring one is kept.
    score_c = jaccard_c * rho_c * clip(effect_c, 0, 1)       (0 unless detected)
pair_scores(result, a, b) = the largest score of a detected c with parents {a, b}, 0 when there is none.

Validation (validate_planted_interactions.py defaults: d 64, 256 features, 24 planted pairs and 24 decoys with
the same co-occurrence, 60k rows, SAE 512 latents k 8; detector on the 54k training rows): planted pairs
against decoys AUC 0.98 / 0.98 / 0.96 and precision@24 0.96 / 0.96 / 0.92 at seeds 0 / 1 / 2; null data
(same features and co-occurrence, nothing planted, SAE fitted to it): no planted or decoy pair flagged (AUC
0.5, precision 0), one unrelated latent flagged per seed; an SAE fitted to the null data and run on the
planted data (no absorption) has no conjunction latents and nothing is found (AUC 0.5): that interaction is
left in the residual, for the NFM. The gate values were set on seed 0 and held at seeds 1 and 2. In that family the SAE learns no latent for a decoy co-occurrence, so the decoys are beaten
by the attribution already; the hand-built case of tests/test_conjunctions.py has one and needs G or D.
Limits: parents must have decoder rows that read their feature (the presence stand-in); a conjunction of three
or more features is attributed to its two strongest parents; an interaction with no direction of its own (g
along d_i or d_j) leaves no new direction; when one feature nearly always comes with the other (co-occurrence
0.9), the SAE folds the interaction into the leading feature's own latent and no separate conjunction latent
exists (nothing is found); a latent that fires exactly when two others co-fire, without absorbing them (the
co-firing clusters of frequent tokens in the demo LM), is an AND of them as far as the data can tell and is
reported (its parents' a_fires_given_c stays near 1).

Memory: streaming over row batches; O(n_latents d + d^2) accumulators, O(chunk x n_latents) for the candidate
search, O(batch x n_latents) per batch; no [rows, n_latents] tensor and no [n_latents, n_latents] table.
`screen` (default on) runs pass 2 only for the latents that pass the fit-row gates (excess, presence, rho).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import torch

from .errors import UserError


@dataclass
class DetectConfig:
    min_rows: int = 20                  # c (and a parent) must fire on at least this many fit rows
    n_candidates: int = 16              # parent candidates per latent whose co-firing is counted
    dup_cos: float = 0.9                # a parent may not be a near-duplicate of c
    presence_threshold: float = 0.5     # a is present in a row when its projection >= this x tau_a
    min_excess: float = 0.1             # F: both parents co-fire with c this much above their base rate
    min_presence: float = 0.4           # F: both parents' signal present on c's rows at least this (x tau)
    min_recall: float = 0.3             # F: c fires on at least this share of the rows holding both parents
    min_jaccard: float = 0.05           # F: c's firing set overlaps the co-presence set at least this
    min_rho: float = 0.3                # G: new-direction share of c's decoder row
    min_effect: float = 0.2             # D: interaction share of what c writes along its new direction
    alpha: float = 0.01                 # D: family-wise level of the z gate (Bonferroni over examined latents)
    z_crit: float | None = None         # D: the z gate itself (None: from alpha)
    screen: bool = True                 # pass 2 only for latents that pass the fit-row gates (excess,
                                        # presence, rho); False: every examined latent (per-principle figures)
    batch: int = 4096                   # rows per batch
    chunk: int | None = None            # latents per chunk of the [chunk, n_latents] candidate search
                                        # (None: default_batch(n_latents))

    def validate(self) -> None:
        if self.min_rows < 2 or self.batch < 1 or (self.chunk is not None and self.chunk < 1) or self.n_candidates < 2:
            raise UserError("min_rows and n_candidates must be >= 2, batch and chunk >= 1")
        if not 0 < self.alpha < 1:
            raise UserError(f"alpha must be in (0, 1), got {self.alpha}")


def default_batch(n_latents: int, budget: int = 2 ** 25) -> int:
    """Rows per batch so that a [batch, n_latents] float tensor stays within `budget` elements."""
    return int(min(4096, max(64, budget // max(1, n_latents))))


@dataclass
class Conjunctions:
    """One entry per examined latent (fires on >= min_rows fit rows and has two usable parent candidates).
    Row figures (recall ... effect, test rows) are NaN (counts -1) for latents the screen left out."""
    latent: torch.Tensor                # [m] long
    parent_a: torch.Tensor              # [m] long, the parent with the larger excess co-firing
    parent_b: torch.Tensor              # [m] long
    score: torch.Tensor                 # [m] jaccard * rho * clip(effect, 0, 1), 0 unless detected
    detected: torch.Tensor              # [m] bool
    n_fit_rows: torch.Tensor            # [m] fit rows where c fires
    excess_a: torch.Tensor              # [m] P(a fires | c) - P(a fires), fit rows
    excess_b: torch.Tensor
    presence_a: torch.Tensor            # [m] pi(a|c), fit rows
    presence_b: torch.Tensor
    rho: torch.Tensor                   # [m] G: new-direction share of W_c
    coef_a: torch.Tensor                # [m] W_c regressed on W_a, W_b
    coef_b: torch.Tensor
    recall: torch.Tensor                # [m] F: P(c fires | a and b present), test rows
    precision: torch.Tensor             # [m] F: P(a and b present | c fires)
    jaccard: torch.Tensor               # [m] F
    n_both: torch.Tensor                # [m] test rows with a and b present
    n_a_only: torch.Tensor              # [m] test rows with a present, b absent
    n_b_only: torch.Tensor              # [m] test rows with b present, a absent
    delta: torch.Tensor                 # [m] D: interaction contrast along n_c
    z: torch.Tensor                     # [m] D: its z
    effect: torch.Tensor                # [m] D: Delta / (E[value_c] <W_c, n_c>)
    a_fires_given_c: torch.Tensor       # [m] P(a fires | c fires), test rows (absorption: well below 1)
    b_fires_given_c: torch.Tensor
    passes: dict = field(default_factory=dict)   # principle -> [m] bool: passes that principle's gates
    z_crit: float = 0.0
    n_fit: int = 0
    n_test: int = 0
    info: dict = field(default_factory=dict)

    COLUMNS = ("latent", "parent_a", "parent_b", "score", "detected", "rho", "jaccard", "recall", "precision",
               "effect", "z", "delta", "excess_a", "excess_b", "presence_a", "presence_b", "coef_a", "coef_b",
               "a_fires_given_c", "b_fires_given_c", "n_fit_rows", "n_both", "n_a_only", "n_b_only")

    def rows(self, only_detected: bool = True) -> list[dict]:
        """The table as dicts: detected latents by score (or every examined latent by score, then jaccard)."""
        keep = self.detected if only_detected else torch.ones_like(self.detected)
        jac = self.jaccard.nan_to_num(-1.0)
        order = sorted(torch.nonzero(keep).squeeze(1).tolist(),
                       key=lambda i: (-float(self.score[i]), -float(jac[i]), int(self.latent[i])))
        cols = {c: getattr(self, c).tolist() for c in self.COLUMNS}
        return [{c: cols[c][i] for c in self.COLUMNS} for i in order]


# ---------------------------------------------------------------------------------------------- streaming
def sae_batches(sae, x: torch.Tensor, batch: int = 4096):
    """Yield (x [b, d] float32, idx [b, k], val [b, k]) batches of the normalised rows x, coded by the SAE."""
    from .train import module_device
    dev = module_device(sae)
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            xb = x[s:s + batch].to(dev).float()
            idx, val = sae.encode(xb)
            yield xb, idx, val


def cached_batches(sae, x: torch.Tensor, batch: int, max_entries: int = 2 ** 24):
    """A callable returning an iterator of sae_batches(sae, x, batch). When the code fits (rows x k <=
    max_entries) it is computed once and replayed, else every pass encodes the rows again."""
    if x.shape[0] * sae.cfg.k > max_entries:
        return lambda: sae_batches(sae, x, batch)
    stored = list(sae_batches(sae, x, batch))
    return lambda: iter(stored)


def firing_mask(idx: torch.Tensor, val: torch.Tensor, n_latents: int) -> torch.Tensor:
    """The batch's code as a dense [b, n_latents] float tensor, 1 where a latent fires. Padding slots with
    value 0 may repeat an index; they add nothing."""
    return torch.zeros(idx.shape[0], n_latents, device=idx.device).scatter_add_(1, idx, (val > 0).float())


def firing_centroids(batches, n_latents: int) -> dict:
    """Pass 1: per latent its firing count, mean value and centred centroid M_c [n, d]; mean and covariance
    of the rows. Per batch in float32 (dense [b, n_latents] code: cheaper than a sparse product at k / n_latents
    >= 1/300), accumulated in float64, so the result does not depend on the batch size beyond rounding."""
    acc = None
    for x, idx, val in batches:
        x = x.float()
        if acc is None:
            d, dev = x.shape[1], x.device
            acc = {"sums": torch.zeros(n_latents, d, dtype=torch.float64, device=dev),
                   "total": torch.zeros(d, dtype=torch.float64, device=dev),
                   "second": torch.zeros(d, d, dtype=torch.float64, device=dev),
                   "count": torch.zeros(n_latents, dtype=torch.float64, device=dev),
                   "vsum": torch.zeros(n_latents, dtype=torch.float64, device=dev), "n": 0}
        F = firing_mask(idx, val, n_latents)                                 # [b, n]
        acc["sums"] += (F.T @ x).double()                                    # F^T x: [n, d]
        acc["count"] += F.sum(0).double()
        acc["vsum"] += torch.bincount(idx[val > 0], weights=val[val > 0].float(), minlength=n_latents).double()
        acc["total"] += x.sum(0).double()
        acc["second"] += (x.T @ x).double()
        acc["n"] += x.shape[0]
    if acc is None or acc["n"] == 0:
        raise UserError("no rows to detect conjunctions on")
    n, count = acc["n"], acc["count"].round().long()
    mu = acc["total"] / n
    M = acc.pop("sums")                                 # in place: at 50,000 latents x 3200 each copy is 1.3 GB
    M /= count.clamp_min(1)[:, None]
    M -= mu
    M[count == 0] = 0
    return {"count": count, "M": M.float(), "mu": mu.float(), "cov": acc["second"] / n - torch.outer(mu, mu),
            "mean_val": (acc["vsum"] / count.clamp_min(1)).float(), "n": n}


def parent_candidates(M: torch.Tensor, W: torch.Tensor, count: torch.Tensor, cov: torch.Tensor, cfg: DetectConfig):
    """For every latent c with >= min_rows rows: its n_candidates largest shifts <M_c, W_a> / sd_a over usable
    latents a. Returns (latents [m], candidates [m, K], shifts [m, K], tau [n]); memory chunk x n_latents."""
    chunk = cfg.chunk or default_batch(W.shape[0])
    tau = (M * W).sum(1)                                                     # [n]
    sd = torch.cat([((w @ cov.float()) * w).sum(1) for w in W.split(chunk)]).clamp_min(1e-12).sqrt()   # [n]
    usable = (count >= cfg.min_rows) & (tau > 1e-6)                          # a parent needs a signal of its own
    Wn = torch.nn.functional.normalize(W, dim=1)
    lat = torch.nonzero(count >= cfg.min_rows).squeeze(1)
    K = min(cfg.n_candidates, W.shape[0] - 1)
    cand, shift = [torch.zeros(0, K, dtype=torch.long, device=W.device)], [torch.zeros(0, K, device=W.device)]
    for s in range(0, lat.numel(), chunk):
        c = lat[s:s + chunk]
        sh = (M[c] @ W.T) / sd                                               # [chunk, n]
        bad = ~usable[None, :] | ((Wn[c] @ Wn.T).abs() >= cfg.dup_cos)
        bad[torch.arange(c.numel(), device=W.device), c] = True
        v, i = sh.masked_fill(bad, float("-inf")).topk(K, dim=1)             # [chunk, K]
        cand.append(i)
        shift.append(v)
    cand, shift = torch.cat(cand), torch.cat(shift)
    ok = torch.isfinite(shift[:, 1]) if K >= 2 else torch.zeros(lat.numel(), dtype=torch.bool, device=W.device)
    return lat[ok], cand[ok], shift[ok], tau


def cofiring(batches, lat: torch.Tensor, cand: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Pass 1b: n(c and a fire) [m, K] for every examined latent c and its candidates. Per batch the only dense
    tensors are the firing mask [b, n_latents] and [b * k, K]."""
    pos = torch.full((n_latents,), -1, dtype=torch.long, device=cand.device)
    pos[lat] = torch.arange(lat.numel(), device=cand.device)
    counts = torch.zeros(cand.shape, dtype=torch.float64, device=cand.device)
    K = cand.shape[1]
    for x, idx, val in batches:
        fired = (firing_mask(idx, val, n_latents) > 0).reshape(-1)          # [b * n_latents]
        p = pos[idx]                                                         # [b, k] row of c in the table, or -1
        keep = (val > 0) & (p >= 0)
        base = (torch.arange(x.shape[0], device=x.device) * n_latents)[:, None].expand_as(idx)[keep]   # [e]
        pk = p[keep]
        hit = fired[base[:, None] + cand[pk]]                                # [e, K]: does candidate j fire too
        slot = pk[:, None] * K + torch.arange(K, device=x.device)            # its place in the [m, K] table
        counts += torch.bincount(slot[hit], minlength=counts.numel()).view(counts.shape).double()
    return counts


def choose_parents(lat, cand, shift, co, count, n: int):
    """The two candidates with the largest excess co-firing (ties, e.g. parents that never fire with c, broken
    by the shift). Returns (parents [m, 2], excess [m, 2])."""
    excess = co / count[lat].double().clamp_min(1)[:, None] - count[cand].double() / n       # [m, K]
    key = excess.clamp_min(0) + 1e-6 * torch.tanh(shift.double().nan_to_num(neginf=-1e6))
    key = key.masked_fill(~torch.isfinite(shift), float("-inf"))
    top = key.topk(2, dim=1).indices                                         # [m, 2]
    return cand.gather(1, top), excess.gather(1, top).float()


def new_direction(W: torch.Tensor, c: torch.Tensor, parents: torch.Tensor):
    """Principle G: W_c regressed on W_a, W_b (2 x 2 normal equations). Returns (rho [m], unit residual n_c
    [m, d] (0 where there is none), coefficients [m, 2])."""
    w = W[c].double()                                                        # [m, d]
    P = W[parents].double()                                                  # [m, 2, d]
    G = P @ P.transpose(1, 2) + 1e-9 * torch.eye(2, dtype=torch.float64, device=W.device)
    coef = torch.linalg.solve(G, P @ w[:, :, None])[:, :, 0]                 # [m, 2]
    rest = w - (coef[:, :, None] * P).sum(1)
    rho = rest.norm(dim=1) / w.norm(dim=1).clamp_min(1e-12)
    n_c = torch.where(rho[:, None] > 1e-6, torch.nn.functional.normalize(rest, dim=1), torch.zeros_like(rest))
    return rho.float(), n_c.float(), coef.float()


def cell_statistics(batches, mu, W, tau, c, parents, directions, n_latents: int, threshold: float) -> dict:
    """Pass 2: per examined latent c the 2 x 2 cells of (a present, b present), with the count, sum and sum of
    squares of t = <x - mu, n_c> in each, and the firing counts of c, a, b. Memory O(batch x max(m, n_latents))."""
    m, dev = c.numel(), W.device
    A, B = parents[:, 0], parents[:, 1]
    WA, WB, N = W[A].T, W[B].T, directions.T                                 # [d, m] each
    thrA, thrB = threshold * tau[A], threshold * tau[B]
    cnt = torch.zeros(m, 4, dtype=torch.float64, device=dev)                 # cells: 0 none, 1 b only, 2 a only, 3 both
    s1, s2 = torch.zeros_like(cnt), torch.zeros_like(cnt)
    fire = {k: torch.zeros(m, dtype=torch.float64, device=dev) for k in ("c", "c_both", "c_a", "c_b")}
    n = 0
    mix = torch.tensor([[1, 0, 0, 0], [-1, 0, 1, 0], [-1, 1, 0, 0], [1, -1, -1, 1]], dtype=torch.float64,
                       device=dev)             # [source: all, a, b, both] x [cell: none, b only, a only, both]
    for x, idx, val in batches:
        xc = x.float() - mu                                                  # [b, d]
        hasA = ((xc @ WA) >= thrA).float()                                   # [b, m]
        hasB = ((xc @ WB) >= thrB).float()
        both = hasA * hasB
        t = xc @ N                                                           # [b, m]
        tt = t * t
        # sums over all rows, rows with a, rows with b, rows with both; the cells by inclusion-exclusion.
        # sum_r w[r, m] t[r, m] = <sum_r w[r, m] x_r, n_m>: one [m, b] x [b, d] product per mask
        c0 = torch.stack([torch.full_like(t[0], x.shape[0]), hasA.sum(0), hasB.sum(0), both.sum(0)], 1)
        s10 = torch.stack([t.sum(0)] + [((w.T @ xc) * directions).sum(1) for w in (hasA, hasB, both)], 1)
        s20 = torch.stack([tt.sum(0), (hasA * tt).sum(0), (hasB * tt).sum(0), (both * tt).sum(0)], 1)
        cnt += c0.double() @ mix
        s1 += s10.double() @ mix
        s2 += s20.double() @ mix
        F = firing_mask(idx, val, n_latents)                                 # [b, n_latents], this batch only
        fc = F.index_select(1, c)                                            # [b, m]
        fire["c"] += fc.sum(0).double()
        fire["c_both"] += (fc * both).sum(0).double()
        fire["c_a"] += (fc * F.index_select(1, A)).sum(0).double()
        fire["c_b"] += (fc * F.index_select(1, B)).sum(0).double()
        n += x.shape[0]
    return {"cnt": cnt, "s1": s1, "s2": s2, **{f"fire_{k}": v for k, v in fire.items()}, "n": n}


def interaction_contrast(st: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Principle D: (Delta [m], z [m]) from the cell sums; z = 0 where a cell has < 2 rows or no spread."""
    cnt = st["cnt"]
    mean = st["s1"] / cnt.clamp_min(1)
    var = (st["s2"] / cnt.clamp_min(1) - mean ** 2).clamp_min(0) * cnt / (cnt - 1).clamp_min(1)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64, device=cnt.device)
    delta = (mean * sign).sum(1)
    se = (var / cnt.clamp_min(1)).sum(1).sqrt()
    ok = (cnt >= 2).all(1) & (se > 1e-12)
    z = torch.where(ok, delta / se.clamp_min(1e-12), torch.zeros_like(delta))
    return delta.float(), z.float()


def bonferroni_z(alpha: float, m: int) -> float:
    """One-sided normal critical value at level alpha / m."""
    return NormalDist().inv_cdf(1 - alpha / max(1, m))


def drop_echoes(latent, parents, detected, score) -> torch.Tensor:
    """Keep the higher-scoring of two detected latents that name each other as parents (a parent latent of a
    conjunction latent c co-fires with c and its partner, so it can look like a conjunction of them)."""
    keep = detected.clone()
    row = {int(l): i for i, l in enumerate(latent.tolist())}
    for i in torch.nonzero(detected).squeeze(1).tolist():
        for p in parents[i].tolist():
            j = row.get(p)
            if j is not None and detected[j] and int(latent[i]) in parents[j].tolist():
                lose = j if (float(score[i]), -i) > (float(score[j]), -j) else i
                keep[lose] = False
    return keep


# ---------------------------------------------------------------------------------------------- the detector
@dataclass
class ParentFit:
    """Pass 1's result: the examined latents, their parents and new directions (fit rows)."""
    W: torch.Tensor
    latent: torch.Tensor
    parents: torch.Tensor
    excess: torch.Tensor
    presence: torch.Tensor
    rho: torch.Tensor
    directions: torch.Tensor
    coef: torch.Tensor
    tau: torch.Tensor
    mu: torch.Tensor
    count: torch.Tensor
    mean_val: torch.Tensor
    n: int


def fit_parents(W_dec: torch.Tensor, fit_batches, cfg: DetectConfig) -> ParentFit:
    """Passes 1 and 1b on the fit rows: candidates, parents (excess co-firing), presence, new directions."""
    W = W_dec.detach().float()
    p1 = firing_centroids(fit_batches(), W.shape[0])
    M, count, mu = p1["M"].to(W.device), p1["count"].to(W.device), p1["mu"].to(W.device)
    c, cand, shift, tau = parent_candidates(M, W, count, p1["cov"].to(W.device), cfg)
    co = cofiring(fit_batches(), c, cand, W.shape[0]) if c.numel() else torch.zeros(0, cand.shape[1], dtype=torch.float64)
    parents, excess = choose_parents(c, cand, shift, co.to(W.device), count, p1["n"])
    presence = (M[c][:, None, :] * W[parents]).sum(2) / tau[parents]        # [m, 2] pi(a|c)
    rho, dirs, coef = new_direction(W, c, parents)
    return ParentFit(W, c, parents, excess, presence, rho, dirs, coef, tau, mu, count, p1["mean_val"].to(W.device), p1["n"])


def row_evidence(fit: ParentFit, test_batches, cfg: DetectConfig) -> Conjunctions:
    """Pass 2 on the test rows (for the screened latents), the gates and the score. Latents left out by the
    screen get NaN row figures and are not detected."""
    W, c = fit.W, fit.latent
    screened = (fit.excess.min(1).values >= cfg.min_excess) & (fit.presence.min(1).values >= cfg.min_presence) \
        & (fit.rho >= cfg.min_rho) if cfg.screen else torch.ones_like(fit.rho, dtype=torch.bool)
    s = torch.nonzero(screened).squeeze(1)
    st = cell_statistics(test_batches(), fit.mu, W, fit.tau, c[s], fit.parents[s], fit.directions[s], W.shape[0],
                         cfg.presence_threshold)
    delta, z = interaction_contrast(st)
    claim = fit.mean_val[c[s]] * fit.rho[s] * W[c[s]].norm(dim=1)           # E[value_c] <W_c, n_c>
    effect = torch.where(claim > 1e-9, delta / claim.clamp_min(1e-9), torch.zeros_like(delta))
    both, inter, fc = st["cnt"][:, 3], st["fire_c_both"], st["fire_c"]
    union = fc + both - inter
    row = {"jaccard": torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter)),
           "recall": inter / both.clamp_min(1), "precision": inter / fc.clamp_min(1), "delta": delta, "z": z,
           "effect": effect, "a_fires_given_c": st["fire_c_a"] / fc.clamp_min(1),
           "b_fires_given_c": st["fire_c_b"] / fc.clamp_min(1), "n_both": both, "n_a_only": st["cnt"][:, 2],
           "n_b_only": st["cnt"][:, 1]}
    full = {}
    for k, v in row.items():            # scatter the screened latents' figures into [m], NaN elsewhere
        f = torch.full((c.numel(),), float("nan"), device=W.device)
        f[s] = v.float()
        full[k] = f
    z_crit = cfg.z_crit if cfg.z_crit is not None else bonferroni_z(cfg.alpha, c.numel())
    passes = {"firing": (fit.excess.min(1).values >= cfg.min_excess) & (fit.presence.min(1).values >= cfg.min_presence)
                        & (full["recall"] >= cfg.min_recall) & (full["jaccard"] >= cfg.min_jaccard),
              "geometry": fit.rho >= cfg.min_rho,
              "data": (full["effect"] >= cfg.min_effect) & (full["z"] >= z_crit)}
    detected = screened & passes["firing"] & passes["geometry"] & passes["data"]
    score = (full["jaccard"] * fit.rho * full["effect"].clamp(0, 1)).nan_to_num(0.0)
    detected = drop_echoes(c.cpu(), fit.parents.cpu(), detected.cpu(), score.cpu()).to(score.device)
    score = torch.where(detected, score, torch.zeros_like(score))
    cpu = lambda t: t.detach().cpu()
    counts = {k: cpu(full[k].nan_to_num(-1).long()) for k in ("n_both", "n_a_only", "n_b_only")}
    return Conjunctions(
        latent=cpu(c), parent_a=cpu(fit.parents[:, 0]), parent_b=cpu(fit.parents[:, 1]), score=cpu(score),
        detected=cpu(detected), n_fit_rows=cpu(fit.count[c]), excess_a=cpu(fit.excess[:, 0]),
        excess_b=cpu(fit.excess[:, 1]), presence_a=cpu(fit.presence[:, 0]), presence_b=cpu(fit.presence[:, 1]),
        rho=cpu(fit.rho), coef_a=cpu(fit.coef[:, 0]), coef_b=cpu(fit.coef[:, 1]),
        **{k: cpu(full[k]) for k in ("recall", "precision", "jaccard", "delta", "z", "effect", "a_fires_given_c",
                                     "b_fires_given_c")}, **counts,
        passes={k: cpu(v) for k, v in passes.items()}, z_crit=float(z_crit), n_fit=fit.n, n_test=int(st["n"]),
        info={"n_latents": int(W.shape[0]), "examined": int(c.numel()), "screened": int(s.numel()),
              "detected": int(detected.sum()), "config": asdict(cfg)})


def detect(W_dec: torch.Tensor, fit_batches, test_batches=None, cfg: DetectConfig | None = None) -> Conjunctions:
    """Find conjunction latents. W_dec [n_latents, d]: the SAE's decoder, in the space of the rows.
    fit_batches / test_batches: callables that return a fresh iterator of (x, idx, val) row batches (x the
    normalised rows [b, d], (idx, val) their TopK code [b, k]; see sae_batches). Parents and new directions
    come from fit_batches; the row evidence (F, D) from test_batches (default: the fit rows again)."""
    cfg = cfg or DetectConfig()
    cfg.validate()
    return row_evidence(fit_parents(W_dec, fit_batches, cfg), test_batches or fit_batches, cfg)


def detect_sae(sae, x_fit: torch.Tensor, x_test: torch.Tensor | None = None,
               cfg: DetectConfig | None = None) -> Conjunctions:
    """detect() for a TopKSAE on normalised rows x_fit [n, d] (and x_test [n', d] for pass 2)."""
    cfg = cfg or DetectConfig(batch=default_batch(sae.cfg.n_latents))
    fit = cached_batches(sae, x_fit, cfg.batch)
    test = cached_batches(sae, x_test, cfg.batch) if x_test is not None else None
    return detect(sae.W_dec, fit, test, cfg)


# ---------------------------------------------------------------------------------------------- pair scores
PRINCIPLES = {"attribution": None, "firing": "jaccard", "geometry": "rho", "data": "effect"}


def principle_score(r: Conjunctions, key: str | None) -> torch.Tensor:
    """Each examined latent's figure under one principle on its own: attribution = 1 for every examined latent
    (a pair scores when any latent names it as parents, no gate); firing = jaccard, geometry = rho,
    data = effect, each where the latent passes that principle's own gates (else 0); 'score' = the combined
    score of detected latents."""
    if key == "score":
        return r.score
    if key is None:
        return torch.ones_like(r.score)
    name = {v: k for k, v in PRINCIPLES.items()}.get(key)
    v = getattr(r, key).nan_to_num(0.0).clamp_min(0)
    return torch.where(r.passes[name], v, torch.zeros_like(v)) if name in r.passes else v


def pair_scores(result: Conjunctions, a, b, key: str | None = "score") -> torch.Tensor:
    """Score of the latent pairs (a[i], b[i]) [p]: the largest `key` figure of a latent whose parents are
    {a[i], b[i]} (either order); 0 when no latent has these parents (for 'score': no detected one)."""
    a = torch.as_tensor(a).long().reshape(-1)
    b = torch.as_tensor(b).long().reshape(-1)
    v = principle_score(result, key).double().tolist()
    best: dict[tuple[int, int], float] = {}
    for p, q, s in zip(result.parent_a.tolist(), result.parent_b.tolist(), v):
        k = (min(p, q), max(p, q))
        if s > best.get(k, 0.0):
            best[k] = s
    return torch.tensor([best.get((min(i, j), max(i, j)), 0.0) for i, j in zip(a.tolist(), b.tolist())],
                        dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- planted truth
def ranking(scores, n_pos: int) -> dict:
    """AUC and precision@P of the first n_pos scores (positives) against the rest. Precision counts a pair only
    when its score is > 0: a pair scored 0 was not singled out, so ties at 0 never count as retrieved."""
    import numpy as np
    from .groundtruth import auc
    s = np.asarray(scores, dtype=np.float64)
    pos = np.arange(len(s)) < n_pos
    top = np.argsort(-s, kind="stable")[:n_pos]
    return {"auc": auc(s, pos), "precision_at_P": float((pos[top] & (s[top] > 0)).sum() / n_pos),
            "flagged_planted": int((s[pos] > 0).sum()), "flagged_decoys": int((s[~pos] > 0).sum())}


def evaluate_against_truth(sae_dir, data_dir, truth: dict, cfg: DetectConfig | None = None) -> dict:
    """The detector on one SAE and one data set with planted ground truth (common/synthetic.py). Fitted and
    measured on the training rows (part1's split); planted pairs ranked against the decoys by pair_scores of
    their matched latents (common.groundtruth.match_latents of W_dec * norm.scale, as the validation does).
    Keys: auc, precision_at_P, flagged_* (combined score), by_principle {attribution, firing, geometry, data}
    (each figure on its own, no gate), held_out (the same with pass 2 on the held-out rows), n_detected, ..."""
    import time
    from .data import load_activation_file, split_rows
    from .groundtruth import match_latents
    from .loading import load_sae_checkpoint

    t0 = time.time()
    sae, norm, _ = load_sae_checkpoint(sae_dir)
    sae.eval()
    acts, docs = load_activation_file(f"{data_dir}/activations.safetensors", "--activations", sae.cfg.d)
    (tr, _), (va, _) = split_rows(acts, docs)
    cfg = cfg or DetectConfig(batch=default_batch(sae.cfg.n_latents), screen=False)   # every latent's figures
    cfg.validate()
    x_tr, x_va = norm.encode(tr), norm.encode(va)
    train_rows = cached_batches(sae, x_tr, cfg.batch)
    fit = fit_parents(sae.W_dec, train_rows, cfg)
    res = row_evidence(fit, train_rows, cfg)
    res_ho = row_evidence(fit, cached_batches(sae, x_va, cfg.batch), cfg)
    latent_of, _ = match_latents(sae.W_dec.detach() * norm.scale, truth["directions"])
    P, D = truth["pairs"].long(), truth["decoy_pairs"].long()
    pairs = torch.cat([P, D])
    a, b = latent_of[pairs[:, 0]], latent_of[pairs[:, 1]]

    def rank(r, key):
        s = pair_scores(r, a, b, key)
        s[a == b] = 0.0                         # both features on one latent: no pair to attribute
        return ranking(s.numpy(), len(P))

    out = rank(res, "score")
    out["by_principle"] = {name: rank(res, key) for name, key in PRINCIPLES.items()}
    out["held_out"] = {"n_rows": res_ho.n_test, **rank(res_ho, "score")}
    planted = {(min(p, q), max(p, q)) for p, q in zip(a[:len(P)].tolist(), b[:len(P)].tolist())}
    decoys = {(min(p, q), max(p, q)) for p, q in zip(a[len(P):].tolist(), b[len(P):].tolist())}
    det = [(min(r["parent_a"], r["parent_b"]), max(r["parent_a"], r["parent_b"])) for r in res.rows()]
    # latent level: each figure's AUC for the examined latents whose parents are a planted pair against the rest
    from .groundtruth import auc as _auc
    lab = torch.tensor([(min(p, q), max(p, q)) in planted for p, q in zip(res.parent_a.tolist(), res.parent_b.tolist())])
    figs = {"excess": torch.minimum(res.excess_a, res.excess_b), "presence": torch.minimum(res.presence_a, res.presence_b),
            "recall": res.recall, "jaccard": res.jaccard, "rho": res.rho, "effect": res.effect, "z": res.z, "score": res.score}
    out["latent_level_auc"] = ({k: _auc(v.double().numpy(), lab.numpy()) for k, v in figs.items()}
                               if 0 < int(lab.sum()) < len(lab) else None)
    out["n_examined_on_planted_pairs"] = int(lab.sum())
    out.update({"n_detected": len(det), "n_detected_on_planted_pairs": sum(k in planted for k in det),
                "n_detected_on_decoys": sum(k in decoys for k in det), "n_examined": res.info["examined"],
                "z_crit": res.z_crit, "n_fit_rows": res.n_fit, "seconds": time.time() - t0})
    return out
