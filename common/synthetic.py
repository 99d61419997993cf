"""Synthetic activations with planted ground truth: features in superposition plus planted pair interactions.

    x = sum_i a_i d_i  +  sum_{(i,j) in P} g(a_i, a_j) u_ij  +  noise             # [n, d]
        '---- s ----'     '----------- p (planted) -----------'

  - n_true unit directions d_i in R^d with n_true > d (superposition);
  - each feature active with probability p_active, magnitude a_i ~ LogNormal(0, sigma) (positive, heavy-tailed);
  - planted pairs P (disjoint): when i is active, j is switched on too with probability `cooccur`, so that the
    pair is observed together often enough to learn; the same co-occurrence is applied in null mode;
  - decoy pairs (n_decoys, disjoint from each other and from P): the same co-occurrence mechanism, but no
    interaction term. They are the fair negatives for pair ranking: a score that tracks how often a pair is
    co-active rather than whether it interacts ranks planted pairs and decoys alike;
  - g per pair, cycling through `g_kinds`: "product" a_i a_j (what an NFM's bi-interaction computes exactly),
    "min" min(a_i, a_j) and "gated" a_i * 1[a_j > 0] (non-multiplicative); g = 0 unless both are active;
  - u_ij its own random unit direction; p scaled so that Var(p) / (Var(s) + Var(p)) = interaction_share;
  - isotropic Gaussian noise with variance noise_share * Var(s + p);
  - null mode: the same features, activations, co-occurrence (planted and decoy pairs) and noise, with p = 0.

Writes DIR/activations.safetensors (`activations` [n, d], `doc_ids` = row index), read by every stage with
`--activations`, and DIR/truth.safetensors (`directions` [n_true, d], `pairs` [P, 2], `decoy_pairs`
[n_decoys, 2], `pair_dirs` [P, d], `g_kind` [P], `planted` [n, d], `true_acts` [n, n_true], `g_values` [n, P])
with DIR/truth.json (the config).

    python -m common.synthetic --out checkpoints/synthetic/planted
    python -m common.synthetic --out checkpoints/synthetic/null --null
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import atomic_save_tensors, atomic_write_bytes
from .errors import UserError

G_KINDS = ("product", "min", "gated")


@dataclass
class SyntheticConfig:
    d: int = 64
    n_true: int = 256
    n_pairs: int = 24
    n_decoys: int | None = None        # None: as many as n_pairs
    p_active: float = 0.02
    magnitude_sigma: float = 0.5
    cooccur: float = 0.5
    g_kinds: tuple = ("product", "min")
    interaction_share: float = 0.1
    noise_share: float = 0.01
    seed: int = 0

    def __post_init__(self):
        if self.n_decoys is None:
            self.n_decoys = self.n_pairs

    def validate(self) -> None:
        if self.n_pairs < 1 or self.n_decoys < 1:
            raise UserError("--n-pairs and --n-decoys must be >= 1 (the pair ranking needs positives and negatives)")
        if 2 * (self.n_pairs + self.n_decoys) > self.n_true:
            raise UserError(f"--n-pairs {self.n_pairs} + --n-decoys {self.n_decoys} need 2x that many features, but "
                            f"--n-true is {self.n_true}: raise --n-true or lower --n-decoys")
        if not 0 <= self.interaction_share < 1 or self.noise_share < 0:
            raise UserError("--interaction-share must be in [0, 1) and --noise-share >= 0")
        bad = [g for g in self.g_kinds if g not in G_KINDS]
        if bad or not self.g_kinds:
            raise UserError(f"unknown g {bad}; choose from {', '.join(G_KINDS)}")


def apply_g(kind: str, ai: torch.Tensor, aj: torch.Tensor) -> torch.Tensor:
    both = (ai > 0) & (aj > 0)
    if kind == "product":
        v = ai * aj
    elif kind == "min":
        v = torch.minimum(ai, aj)
    else:  # gated: i's magnitude, passed only when j is present
        v = ai
    return v * both


def generate(cfg: SyntheticConfig, n: int, null: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of one data set. The same cfg (seed) gives the same features, pairs and activations
    whether null or not; only the planted component differs."""
    cfg.validate()
    g = torch.Generator().manual_seed(cfg.seed)
    directions = torch.nn.functional.normalize(torch.randn(cfg.n_true, cfg.d, generator=g), dim=1)
    perm = torch.randperm(cfg.n_true, generator=g)[: 2 * (cfg.n_pairs + cfg.n_decoys)]
    pairs, decoys = perm[: 2 * cfg.n_pairs].view(cfg.n_pairs, 2), perm[2 * cfg.n_pairs:].view(cfg.n_decoys, 2)
    pair_dirs = torch.nn.functional.normalize(torch.randn(cfg.n_pairs, cfg.d, generator=g), dim=1)
    kinds = torch.tensor([G_KINDS.index(cfg.g_kinds[p % len(cfg.g_kinds)]) for p in range(cfg.n_pairs)])

    active = torch.rand(n, cfg.n_true, generator=g) < cfg.p_active
    linked = torch.cat([pairs, decoys])                                 # one co-occurrence mechanism for both
    follow = torch.rand(n, linked.shape[0], generator=g) < cfg.cooccur
    active[:, linked[:, 1]] |= active[:, linked[:, 0]] & follow
    mags = torch.exp(cfg.magnitude_sigma * torch.randn(n, cfg.n_true, generator=g))
    a = mags * active                                                   # [n, n_true]
    s = a @ directions                                                  # [n, d]
    gv = torch.stack([apply_g(G_KINDS[int(kinds[p])], a[:, pairs[p, 0]], a[:, pairs[p, 1]])
                      for p in range(cfg.n_pairs)], dim=1)              # [n, n_pairs]
    p_raw = gv @ pair_dirs                                              # [n, d]
    var_s = (s - s.mean(0)).pow(2).sum(1).mean()
    var_p = (p_raw - p_raw.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
    scale = torch.sqrt(cfg.interaction_share / (1 - cfg.interaction_share) * var_s / var_p)
    planted = p_raw * scale
    noise_std = torch.sqrt(cfg.noise_share * (var_s + scale ** 2 * var_p) / cfg.d)
    noise = torch.randn(n, cfg.d, generator=g) * noise_std
    if null:
        planted = torch.zeros_like(planted)
    return {"activations": s + planted + noise, "doc_ids": torch.arange(n), "directions": directions,
            "pairs": pairs, "decoy_pairs": decoys, "pair_dirs": pair_dirs, "g_kind": kinds, "planted": planted,
            "true_acts": a, "g_values": gv * scale}


def write(out_dir: str | Path, cfg: SyntheticConfig, n: int, null: bool = False) -> Path:
    out = Path(out_dir)
    t = generate(cfg, n, null)
    atomic_save_tensors(out / "activations.safetensors", {"activations": t["activations"], "doc_ids": t["doc_ids"]})
    atomic_save_tensors(out / "truth.safetensors", {k: v for k, v in t.items() if k not in ("activations", "doc_ids")})
    atomic_write_bytes(out / "truth.json", (json.dumps({**asdict(cfg), "n": n, "null": null}, indent=2) + "\n").encode())
    return out


def read_truth(out_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    out = Path(out_dir)
    if not (out / "truth.safetensors").is_file():
        raise UserError(f"{out}: no truth.safetensors; generate it with python -m common.synthetic --out {out}")
    return load_file(str(out / "truth.safetensors")), json.loads((out / "truth.json").read_text())


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("synthetic data")
    c = SyntheticConfig()
    g.add_argument("--d", type=int, default=c.d, help=f"activation width (default: {c.d})")
    g.add_argument("--n-true", type=int, default=c.n_true, help=f"true features, > d for superposition (default: {c.n_true})")
    g.add_argument("--n-pairs", type=int, default=c.n_pairs, help=f"planted interacting pairs (default: {c.n_pairs})")
    g.add_argument("--n-decoys", type=int, default=None,
                   help="decoy pairs: co-occur like the planted pairs but carry no interaction; the negatives of "
                        "the pair ranking (default: as many as --n-pairs)")
    g.add_argument("--p-active", type=float, default=c.p_active, help=f"probability each feature is active (default: {c.p_active})")
    g.add_argument("--cooccur", type=float, default=c.cooccur,
                   help=f"P(second feature of a pair active | first active), planted and decoy pairs, also in null "
                        f"data (default: {c.cooccur})")
    g.add_argument("--g", default=",".join(c.g_kinds),
                   help=f"comma-separated g per pair, cycled: {', '.join(G_KINDS)} (default: {','.join(c.g_kinds)})")
    g.add_argument("--interaction-share", type=float, default=c.interaction_share,
                   help=f"Var(planted) / Var(features + planted) (default: {c.interaction_share})")
    g.add_argument("--noise-share", type=float, default=c.noise_share,
                   help=f"noise variance as a share of the signal variance (default: {c.noise_share})")


def config_from_args(a) -> SyntheticConfig:
    return SyntheticConfig(d=a.d, n_true=a.n_true, n_pairs=a.n_pairs, n_decoys=a.n_decoys, p_active=a.p_active,
                           cooccur=a.cooccur, g_kinds=tuple(x.strip() for x in a.g.split(",") if x.strip()),
                           interaction_share=a.interaction_share, noise_share=a.noise_share, seed=a.seed)


def main(argv=None) -> None:
    from .cli import run_main
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for activations.safetensors and the truth sidecar")
    p.add_argument("--n", type=int, default=60_000, help="samples (rows) (default: 60000)")
    p.add_argument("--null", action="store_true", help="plant nothing (same features and co-occurrence)")
    p.add_argument("--seed", type=int, default=0, help="seed of features, pairs and samples (default: 0)")
    add_args(p)

    def run():
        a = p.parse_args(argv)
        out = write(a.out, config_from_args(a), a.n, a.null)
        print(f"wrote {out}/activations.safetensors and {out}/truth.safetensors")
    run_main(run)


if __name__ == "__main__":
    main()
