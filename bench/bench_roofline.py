"""Roofline: this machine's fp32 matmul peak, and the TopK SAE training step as a share of its encoder roofline.

    .venv/bin/python bench/bench_roofline.py           # about a minute on 2 cores
    .venv/bin/python bench/bench_roofline.py --quick   # smoke run
    .venv/bin/python bench/bench_roofline.py --device cuda --dtype bfloat16 --shapes demo wide paper_k1024 paper_k64

The SAE step's one dense piece of work is the encoder forward, pre = x W_enc^T ([batch, d] x [d, n]):
2·batch·d·n FLOPs. Everything else (top-k, the embedding-bag decoder, the top-k-only encoder backward, AuxK,
the optimizer) is O(batch·k·d + n·d). So the step can be no faster than 2·batch·d·n / peak, the "encoder
roofline"; we report share = roofline time / measured step time (= achieved encoder FLOP/s / peak).

The peak is measured in the same run: the best of large square matmuls (in --dtype) and of the encoder's own
shape, timed alternately with the SAE step (medians over repeats). --dtype is the SAE's parameter and input dtype;
on CUDA every timing synchronises, and the step's torch.cuda.max_memory_allocated is printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.optim import ScheduleFreeSignSGD  # noqa: E402
from common.sae import SAEConfig, TopKSAE  # noqa: E402

SHAPES = {  # (d, n_latents, k, batch)
    "demo": (256, 4096, 32, 4096),
    "wide": (1024, 16384, 64, 2048),
    "paper_k1024": (3200, 50_000, 1024, 4096),     # --preset paper's SAE (a GPU shape: ~7 s a step on 2 cores)
    "paper_k64": (3200, 50_000, 64, 4096),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device = torch.device("cpu")) -> list[float]:
    """Seconds per call; on CUDA each call is synchronised before the clock stops."""
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes, few repeats")
    p.add_argument("--rounds", type=int, default=3, help="alternations of peak and step timing (default: 3)")
    p.add_argument("--repeats", type=int, default=3, help="timings per turn (default: 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the SAE's parameters and inputs (default: float32)")
    p.add_argument("--shapes", nargs="+", default=["demo", "wide"], choices=sorted(SHAPES),
                   help="shapes to time (default: demo wide)")
    a = p.parse_args()
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    if dev.type == "cpu" and dt != torch.float32:
        # the SAE step's sparse CSR products (common/sparse.py) have only float32/float64 kernels on CPU
        raise SystemExit(f"bench_roofline: --dtype {a.dtype} needs --device cuda (torch's CPU sparse CSR product "
                         f"has no {a.dtype} kernel); use --dtype float32 on a CPU")
    shapes = {"quick": (128, 1024, 16, 512)} if a.quick else {s: SHAPES[s] for s in a.shapes}
    rounds, repeats = (1, 2) if a.quick else (a.rounds, a.repeats)
    print(f"torch {torch.__version__}, {a.device}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f", {torch.get_num_threads()} threads")
          + f", {a.dtype}")
    sq = 512 if a.quick else (8192 if dev.type == "cuda" else 2048)
    A, B = torch.randn(sq, sq, device=dev, dtype=dt), torch.randn(sq, sq, device=dev, dtype=dt)
    for name, (d, n, k, batch) in shapes.items():
        torch.manual_seed(0)
        sae = TopKSAE(SAEConfig(d=d, n_latents=n, k=k)).to(dev, dt)
        opt = ScheduleFreeSignSGD(sae.parameters(), lr=1e-3)
        x = torch.randn(batch, d, device=dev, dtype=dt)
        enc_in = torch.randn(batch, d, device=dev, dtype=dt)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        def step():
            loss, _ = sae.loss(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_grad()
            opt.step()
            sae.renorm_decoder()

        def square():
            torch.mm(A, B)

        def encoder_mm():
            torch.nn.functional.linear(enc_in, sae.W_enc.detach(), sae.b_enc.detach())

        step(), square(), encoder_mm()   # warm-up
        t_step, t_sq, t_enc = [], [], []
        for _ in range(rounds):
            t_sq += timed(square, repeats, dev)
            t_enc += timed(encoder_mm, repeats, dev)
            t_step += timed(step, repeats, dev)
        peak_sq = 2 * sq ** 3 / min(t_sq)
        peak_enc = 2 * batch * d * n / min(t_enc)
        peak = max(peak_sq, peak_enc)
        enc_flops = 2 * batch * d * n
        med = statistics.median(t_step)
        shares = [enc_flops / t / peak for t in t_step]
        print(f"{name}: d {d}, n_latents {n}, k {k}, batch {batch}")
        print(f"  {a.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s (square {sq}: {peak_sq / 1e9:.1f}; encoder shape: "
              f"{peak_enc / 1e9:.1f}, median {enc_flops / statistics.median(t_enc) / 1e9:.1f})")
        print(f"  SAE step {med * 1e3:.1f} ms = {batch / med:,.0f} tokens/s; encoder roofline "
              f"{enc_flops / peak * 1e3:.1f} ms; share {enc_flops / med / peak:.0%} "
              f"[{min(shares):.0%}-{max(shares):.0%}] (target >= 60%)"
              + (f"; max_memory_allocated {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB"
                 if dev.type == "cuda" else ""))


if __name__ == "__main__":
    main()
