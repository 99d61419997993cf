"""AuxK recipes side by side (issue 12): OpenAI's (what common/sae.py implements) vs EleutherAI sparsify's,
and the mixture common/sae.py had before issue 12, on bench_sae_peers.py's data.

    .venv/bin/python bench/bench_auxk_recipes.py            # demo + synthetic, 2 rounds (seeds 0, 1)
    .venv/bin/python bench/bench_auxk_recipes.py --quick    # smoke run

Everything but the AuxK loss is part1's recipe (`common.sae.train_sae`), with bench_sae_peers.py's sizes
(n_latents 4096, k 32, batch 4096, 200 steps), data (demo layer-2 activations, synthetic superposition),
held-out split and FVU function, and the same seed per round for every recipe. Per run: held-out FVU, L0 and
dead fraction (latents that never fire on the held-out rows), and the dead fraction at the end of training
(AuxK's own counters). The two recipes that common/sae.py does not implement are subclasses below, each
overriding only `auxk_loss` (the fused AuxK selection, k_aux = min(d/2, n_dead), is shared):
  - sparsify (`SparseCoder.forward`): scale * ||e_hat + b_dec - e||^2 / ||x - mean(x)||^2 with
    scale = min(n_dead / (d // 2), 1), the d // 2 taken before it is clamped to n_dead;
  - pre-issue-12: ||e_hat - e||^2 / ||x - mean(x)||^2 (no b_dec, the variance of x, a scale that was always 1).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.nn.functional as F

from common import dist
from common.sae import SAEConfig, TopKSAE, default_dead_tokens, default_lr, train_sae


class SparsifyAuxK(TopKSAE):
    def auxk_loss(self, aux, x, x_hat):
        if aux is None:
            return x.new_zeros(())
        n_dead = int((self.since_fired >= self.cfg.dead_tokens).sum())   # the set encode_with_aux used
        scale = min(n_dead / (self.cfg.d // 2), 1.0)
        return scale * (self.decode(*aux) - (x - x_hat).detach()).pow(2).sum() / dist.total_variance(x).clamp_min(1e-12)


class PreIssue12AuxK(TopKSAE):
    def auxk_loss(self, aux, x, x_hat):
        if aux is None:
            return x.new_zeros(())
        e_hat = F.embedding_bag(aux[0], self.W_dec, per_sample_weights=aux[1], mode="sum")   # without b_dec
        return (e_hat - (x - x_hat).detach()).pow(2).sum() / dist.total_variance(x).clamp_min(1e-12)


RECIPES = {"openai": TopKSAE, "sparsify": SparsifyAuxK, "pre-issue-12": PreIssue12AuxK}


def train(recipe, x, x_sel, n, k, batch, steps, seed):
    import torch

    torch.manual_seed(seed)
    sae = RECIPES[recipe](SAEConfig(d=x.shape[1], n_latents=n, k=k, dead_tokens=default_dead_tokens(steps, batch)))
    t = time.perf_counter()
    train_sae(sae, x, x_sel, steps, batch, default_lr(n), eval_every=steps, seed=seed, desc=recipe)
    return sae, time.perf_counter() - t


def run_dataset(name, x_tr, x_te, a):
    from bench_sae_peers import heldout_fvu

    from common.metrics import recon_stats

    steps = max(1, a.tokens // a.batch)
    cut = x_te.shape[0] // 2
    x_sel, x_test = x_te[:cut], x_te[cut:]
    print(f"\n== {name}: train {tuple(x_tr.shape)}, held-out test {tuple(x_test.shape)}; n_latents {a.n_latents}, "
          f"k {a.k}, batch {a.batch}, {steps} steps", flush=True)
    res = {r: {"fvu": [], "l0": [], "dead": [], "dead_train": []} for r in RECIPES}
    for rnd in range(a.rounds):
        order = list(RECIPES)
        for recipe in order[rnd % len(order):] + order[:rnd % len(order)]:
            sae, secs = train(recipe, x_tr, x_sel, a.n_latents, a.k, a.batch, steps, seed=rnd)
            st = recon_stats(sae, x_test)
            row = {"fvu": heldout_fvu(lambda xb: sae(xb)[0], x_test), "l0": st["l0"], "dead": st["dead_fraction"],
                   "dead_train": float((sae.since_fired >= sae.cfg.dead_tokens).float().mean())}
            for key, v in row.items():
                res[recipe][key].append(v)
            print(f"  seed {rnd} {recipe:12s} held-out FVU {row['fvu']:.5f}  L0 {row['l0']:.2f}  dead (held-out) "
                  f"{row['dead']:.1%}  dead (training counters) {row['dead_train']:.1%}  {secs:.0f} s", flush=True)
    for recipe, v in res.items():
        print(f"  {recipe:12s} median: FVU {statistics.median(v['fvu']):.5f} [{min(v['fvu']):.5f}-{max(v['fvu']):.5f}]"
              f"  L0 {statistics.median(v['l0']):.2f}  dead {statistics.median(v['dead']):.1%}"
              f"  dead (training) {statistics.median(v['dead_train']):.1%}")
    return res


def main():
    from bench_sae_peers import bench_parser, demo_data, synthetic_data

    p = bench_parser(__doc__)
    p.add_argument("--rounds", type=int, default=2, help="rounds = seeds 0..rounds-1 (default: 2)")
    a = p.parse_args()
    # bench_sae_peers.py's sizes (its defaults, and its --quick ones)
    a.n_latents, a.k, a.batch, a.tokens = (512, 16, 512, 2048) if a.quick else (4096, 32, 4096, 819_200)
    a.rounds = 1 if a.quick else a.rounds
    n_synth = 8192 if a.quick else 200_000
    sets = {"demo": ("demo activations (layer 2 of the demo Llama)", lambda: demo_data(a.quick)),
            "synthetic": ("synthetic superposition (d 256, 8192 true features)",
                          lambda: synthetic_data(256, 8192, n_synth, n_synth // 5))}
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in (sets if a.data == "both" else (a.data,)):
        title, load = sets[name]
        run_dataset(title, *load(), a)


if __name__ == "__main__":
    main()
