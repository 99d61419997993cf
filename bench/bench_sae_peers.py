"""TopK SAE training: ours (part1's recipe) vs EleutherAI sparsify vs SAELens, side by side on the same data.

    .venv/bin/python bench/bench_sae_peers.py           # full run (first use also builds bench/.venv-peers, ~3 min)
    .venv/bin/python bench/bench_sae_peers.py --quick   # smoke run: tiny sizes, one round

The peers are never runtime dependencies: on first use this script creates bench/.venv-peers, installs
torch==2.13.0 first (so nothing pulls CUDA wheels), then requirements.txt and bench/requirements-peers.txt
(`eai-sparsify` = EleutherAI sparsify; the PyPI package `sparsify` is an unrelated one; `sae-lens`), and
re-runs itself there.

Every library trains on the same normalised activation tensor, with the same n_latents, k, batch size, token
budget and batch order, and is scored by the same held-out FVU function. Two data sets:
  - demo: layer-2 residual stream of the embedded demo Llama (part1's default data, held-out documents);
  - synthetic: superposition, n_true unit directions in R^d with Zipf-distributed firing and log-normal
    magnitudes, plus 1% isotropic noise; the held-out rows are fresh draws.
Each library runs with its own default recipe, as its trainer would run it:
  - ours: `common.sae.train_sae` with part1's defaults (what `part1_train_topk_sae.py` runs), and
    "ours-noauxk", the same with AuxK off (`--auxk-alpha 0`), which is sparsify's default;
  - sparsify 1.3: `SparseCoder` + its trainer's default step (SignSGD in ScheduleFree, lr 5e-3/sqrt(n/2^14),
    b_dec = first-batch mean, unit-norm decoder, parallel-gradient removal, auxk_alpha 0), a faithful copy of
    `sparsify.trainer.Trainer`'s inner loop without the LM hook plumbing; evaluated at the averaged (`eval()`)
    weights, as its trainer saves them;
  - SAELens 6: `TopKTrainingSAE` + `SAETrainer.fit()` with its defaults (Adam lr 3e-4 constant, AuxK 1).
Rounds rotate the order of the libraries; tokens/s counts the training call only (the same for all).
Prints per-round figures, medians with min-max, and the ratios the issue targets.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / "bench" / ".venv-peers"
sys.path.insert(0, str(ROOT))


def ensure_peer_env() -> None:
    """Re-exec inside bench/.venv-peers (built on first use) unless the peers are importable here."""
    try:
        import sae_lens  # noqa: F401
        import sparsify  # noqa: F401
        return
    except ImportError:
        pass
    py = build_peer_env()
    os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


def build_peer_env() -> Path:
    """bench/.venv-peers (built on first use); returns its python."""
    py = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / ".installed"
    if not stamp.exists():
        print(f"building the peer environment {PEER_VENV} (torch==2.13.0 first, then the peers) ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(PEER_VENV)])
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.check_call(pip + ["torch==2.13.0"])
        subprocess.check_call(pip + ["-r", str(ROOT / "requirements.txt"), "-r", str(ROOT / "bench" / "requirements-peers.txt")])
        stamp.touch()
    return py


# ------------------------------------------------------------------------------------------------ data

def demo_data(quick: bool):
    """(train, held-out) normalised demo activations, exactly as part1 gets them."""
    import part1_train_topk_sae as part1
    from common.data import DataSpec, get_activations
    from common.normalize import Normalizer

    argv = ["--train-tokens", "20000", "--val-tokens", "4000"] if quick else []
    args = part1.build_parser().parse_args(argv)
    acts = get_activations(args, DataSpec.from_args(args))
    norm = Normalizer.fit(acts.train, "scalar")
    return norm.encode(acts.train.load()), norm.encode(acts.val)


def synthetic_data(d: int, n_true: int, n_train: int, n_test: int, seed: int = 0):
    """Superposition: x = sum_i a_i d_i + noise, ~`mean_active` features per row, Zipf(1) firing rates."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_true, d, generator=g), dim=1)               # [n_true, d]
    rate = 1.0 / torch.arange(1, n_true + 1).float()                              # Zipf firing frequencies
    rate = rate[torch.randperm(n_true, generator=g)]
    mean_active = 24

    def draw(n):
        idx = torch.multinomial(rate.expand(n, -1), mean_active, replacement=False, generator=g)  # [n, 24]
        a = torch.exp(0.5 * torch.randn(n, mean_active, generator=g))                            # log-normal
        a = a * (torch.rand(n, mean_active, generator=g) < 0.75)                                 # ~18 active
        x = F.embedding_bag(idx, dirs, per_sample_weights=a, mode="sum")
        return x + 0.1 * x.std() * torch.randn(n, d, generator=g)

    x_tr, x_te = draw(n_train), draw(n_test)
    scale = x_tr.pow(2).sum(1).mean().div(d).sqrt()                               # the same scalar norm as part1
    return x_tr / scale, x_te / scale


# ------------------------------------------------------------------------------------------ libraries

def batches(n_rows: int, batch: int, steps: int, seed: int):
    """The one batch order every library sees: reshuffled epochs, as common.train.fit draws them."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n_rows, generator=gen), 0
    for _ in range(steps):
        if pos + batch > n_rows:
            perm, pos = torch.randperm(n_rows, generator=gen), 0
        yield perm[pos:pos + batch]
        pos += batch


def train_ours(x, x_sel, n, k, batch, steps, seed, auxk_alpha=1 / 32):
    import torch
    from common.sae import SAEConfig, TopKSAE, default_dead_tokens, default_lr, train_sae

    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d=x.shape[1], n_latents=n, k=k, dead_tokens=default_dead_tokens(steps, batch),
                            auxk_alpha=auxk_alpha))
    t = time.perf_counter()
    train_sae(sae, x, x_sel, steps, batch, default_lr(n), eval_every=steps, seed=seed, desc="ours")
    secs = time.perf_counter() - t
    return secs, lambda xb: sae(xb)[0]


def train_sparsify(x, x_sel, n, k, batch, steps, seed):
    import torch
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(seed)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=n, k=k))
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (n / 2 ** 14) ** 0.5)]), momentum=0.95)
    opt.train()
    t = time.perf_counter()
    for step, idx in enumerate(batches(x.shape[0], batch, steps, seed)):
        xb = x[idx]
        if step == 0:
            sae.b_dec.data = xb.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(xb)
        out.fvu.backward()                       # sparsify's default auxk_alpha is 0
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    opt.eval()                                   # the averaged weights, which its trainer saves
    secs = time.perf_counter() - t
    return secs, lambda xb: sae(xb).sae_out


def train_saelens(x, x_sel, n, k, batch, steps, seed):
    import logging

    import torch
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=n, k=k, device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=3e-4,
                           lr_end=3e-4, device="cpu")
    data = (x[idx] for idx in batches(x.shape[0], batch, steps, seed))
    t = time.perf_counter()
    SAETrainer(cfg=cfg, sae=sae, data_provider=data).fit()
    secs = time.perf_counter() - t
    return secs, lambda xb: sae(xb)


def train_ours_noauxk(x, x_sel, n, k, batch, steps, seed):
    """Ours with AuxK off (`--auxk-alpha 0`), the setting sparsify runs by default: the same work per step."""
    return train_ours(x, x_sel, n, k, batch, steps, seed, auxk_alpha=0.0)


LIBS = {"ours": train_ours, "ours-noauxk": train_ours_noauxk, "sparsify": train_sparsify, "saelens": train_saelens}


def heldout_fvu(recon, x) -> float:
    import torch
    with torch.no_grad():
        err = sum(float((recon(x[s:s + 4096]) - x[s:s + 4096]).pow(2).sum()) for s in range(0, x.shape[0], 4096))
    return err / float((x - x.mean(0)).pow(2).sum())


def run_dataset(name, x_tr, x_te, a):
    import torch
    steps = max(1, a.tokens // a.batch)
    cut = x_te.shape[0] // 2
    x_sel, x_test = x_te[:cut], x_te[cut:]          # ours selects its best step on x_sel; all report x_test
    print(f"\n== {name}: train {tuple(x_tr.shape)}, held-out test {tuple(x_test.shape)}; n_latents {a.n_latents}, "
          f"k {a.k}, batch {a.batch}, {steps} steps = {steps * a.batch:,} tokens", flush=True)
    res = {lib: {"tps": [], "fvu": []} for lib in LIBS}
    order = list(LIBS)
    for r in range(a.rounds):
        for lib in order[r % len(order):] + order[:r % len(order)]:      # rotate who goes first
            secs, recon = LIBS[lib](x_tr, x_sel, a.n_latents, a.k, a.batch, steps, seed=r)
            fvu = heldout_fvu(recon, x_test)
            res[lib]["tps"].append(steps * a.batch / secs)
            res[lib]["fvu"].append(fvu)
            print(f"  round {r + 1} {lib:11s} {steps * a.batch / secs:9.0f} tokens/s   held-out FVU {fvu:.5f}", flush=True)
            torch.manual_seed(0)
    print(f"  {'library':11s} {'tokens/s median [min-max]':>32s}   {'held-out FVU median [min-max]':>32s}")
    for lib, v in res.items():
        print(f"  {lib:11s} {statistics.median(v['tps']):10.0f} [{min(v['tps']):.0f}-{max(v['tps']):.0f}]"
              f"{'':8s}{statistics.median(v['fvu']):.5f} [{min(v['fvu']):.5f}-{max(v['fvu']):.5f}]")
    for ours, peer, target in (("ours", "sparsify", 1.2), ("ours", "saelens", 2.0), ("ours-noauxk", "sparsify", 1.2)):
        ratios = [o / p for o, p in zip(res[ours]["tps"], res[peer]["tps"])]
        print(f"  speed {ours}/{peer}: median {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] "
              f"(target >= {target}x: {'met' if statistics.median(ratios) >= target else 'NOT met'})")
    f_o, f_s = statistics.median(res["ours"]["fvu"]), statistics.median(res["sparsify"]["fvu"])
    print(f"  quality: held-out FVU ours {f_o:.5f} vs sparsify {f_s:.5f} "
          f"(target ours <= sparsify: {'met' if f_o <= f_s else 'NOT met'})")
    return res


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments this bench shares with bench_auxk_recipes.py (the same data sets and smoke mode)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one round")
    p.add_argument("--data", choices=("demo", "synthetic", "both"), default="both", help="data sets (default: both)")
    return p


def main():
    p = bench_parser(__doc__)
    p.add_argument("--n-latents", type=int, default=4096, help="dictionary size (default: 4096 = 16x the demo width)")
    p.add_argument("--k", type=int, default=32, help="TopK (default: 32)")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step (default: 4096)")
    p.add_argument("--tokens", type=int, default=819_200, help="training tokens per run (default: 819,200 = 200 steps)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each trains every library once (default: 2)")
    a = p.parse_args()
    if a.quick:
        a.n_latents, a.k, a.batch, a.tokens, a.rounds = 512, 16, 512, 2048, 1
    ensure_peer_env()
    import torch
    import sae_lens
    import sparsify  # noqa: F401
    from importlib.metadata import version
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; eai-sparsify {version('eai-sparsify')}, "
          f"sae-lens {sae_lens.__version__}")
    if a.data in ("demo", "both"):
        run_dataset("demo activations (layer 2 of the demo Llama)", *demo_data(a.quick), a)
    if a.data in ("synthetic", "both"):
        n_tr = 8192 if a.quick else 200_000
        run_dataset("synthetic superposition (d 256, 8192 true features)",
                    *synthetic_data(256, 8192, n_tr, n_tr // 5), a)


if __name__ == "__main__":
    main()
