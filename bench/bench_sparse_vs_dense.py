"""Sparse (embedding_bag) vs dense reference paths: one training step (forward + backward + Adam) of the
TopK SAE and of the NFM, measured side by side in one run (A and B alternated, medians of repeats).

    .venv/bin/python bench/bench_sparse_vs_dense.py                 # small scale, about a minute on 2 cores
    .venv/bin/python bench/bench_sparse_vs_dense.py --scale paper   # NFM at n=50k, k=250, dim=300, d=3200
    .venv/bin/python bench/bench_sparse_vs_dense.py --scale paper --k 1024   # the joint model's K
    .venv/bin/python bench/bench_sparse_vs_dense.py --scale paper --device cuda   # on a GPU (bench/gpu_check.sh)

Prints ms per step for each path (median, and min-max over all timed steps) and the ratio of medians, and on
CUDA each path's torch.cuda.max_memory_allocated (timings synchronised). Indices are uniform random (each row k
distinct features), values uniform in [0, 1).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.nfm import NFM, NFMConfig  # noqa: E402
from common.sae import SAEConfig, TopKSAE  # noqa: E402
from common.train import make_adam  # noqa: E402
from bench.bench_roofline import sync  # noqa: E402

SCALES = {
    "small": dict(d=256, n=4096, k=32, dim=64, batch=4096),
    "paper": dict(d=3200, n=50_000, k=250, dim=300, batch=256),
}


def time_steps(step, repeats: int, dev: torch.device) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        step()
        sync(dev)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def peak_gib(step, dev: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated over one step (None off CUDA)."""
    if dev.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) / 2**30


def alternate(a, b, rounds: int, repeats: int, dev: torch.device):
    ta, tb = [], []
    a(), b()  # warm-up
    for _ in range(rounds):
        ta += time_steps(a, repeats, dev)
        tb += time_steps(b, repeats, dev)
    return ta, tb


def sae_steps(s, dev):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d=s["d"], n_latents=s["n"], k=s["k"])).to(dev)
    opt = make_adam(sae.parameters(), 1e-4)
    x = torch.randn(s["batch"], s["d"], device=dev)

    def sparse():
        loss, _ = sae.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def dense():
        x_hat, _ = sae.forward_dense(x)
        loss = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return sparse, dense


def nfm_steps(s, dev):
    torch.manual_seed(0)
    nfm = NFM(NFMConfig(n_features=s["n"], d=s["d"], dim=s["dim"], hidden=s["dim"])).to(dev)
    opt = make_adam(nfm.parameters(), 1e-4)
    idx = torch.stack([torch.randperm(s["n"])[:s["k"]] for _ in range(s["batch"])]).to(dev)
    val = torch.rand(s["batch"], s["k"]).to(dev)
    r = torch.randn(s["batch"], s["d"]).to(dev)

    def sparse():
        loss = (nfm(idx, val) - r).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def dense():
        f = torch.zeros(s["batch"], s["n"], device=dev).scatter(1, idx, val)   # the reference's dense [batch, n_features] input
        loss = (nfm.forward_dense(f) - r).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return sparse, dense


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="small", help="problem size (default: small)")
    p.add_argument("--rounds", type=int, default=3, help="A/B alternations (default: 3)")
    p.add_argument("--repeats", type=int, default=3, help="steps timed per turn (default: 3)")
    p.add_argument("--k", type=int, default=None, help="active features per row (default: the scale's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    a = p.parse_args()
    dev = torch.device(a.device)
    s = dict(SCALES[a.scale], **({"k": a.k} if a.k else {}))
    print(f"scale {a.scale}: {s}, torch {torch.__version__}, "
          + (torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"))
    benches = [("NFM step", nfm_steps)] + ([("TopK SAE step", sae_steps)] if a.scale == "small" else [])
    for name, make in benches:
        sparse, dense = make(s, dev)
        mem = {path: peak_gib(fn, dev) for path, fn in (("sparse", sparse), ("dense", dense))}
        if dev.type == "cuda":
            print(f"{name:14s} max_memory_allocated: sparse {mem['sparse']:.2f} GiB, dense {mem['dense']:.2f} GiB")
        t_sparse, t_dense = alternate(sparse, dense, a.rounds, a.repeats, dev)
        ms_sparse, ms_dense = statistics.median(t_sparse), statistics.median(t_dense)
        print(f"{name:14s} sparse {ms_sparse:8.1f} ms ({min(t_sparse):.1f}-{max(t_sparse):.1f})   "
              f"dense {ms_dense:8.1f} ms ({min(t_dense):.1f}-{max(t_dense):.1f})   "
              f"dense/sparse {ms_dense / ms_sparse:5.2f}x")


if __name__ == "__main__":
    main()
