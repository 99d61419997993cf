"""Roofline: this machine's fp32 matmul peak, and the TopK SAE training step as a share of its encoder roofline.

    .venv/bin/python bench/bench_roofline.py           # about a minute on 2 cores
    .venv/bin/python bench/bench_roofline.py --quick   # smoke run

The SAE step's one dense piece of work is the encoder forward, pre = x W_enc^T ([batch, d] x [d, n]):
2·batch·d·n FLOPs. Everything else (top-k, the embedding-bag decoder, the top-k-only encoder backward, AuxK,
the optimizer) is O(batch·k·d + n·d). So the step can be no faster than 2·batch·d·n / peak, the "encoder
roofline"; we report share = roofline time / measured step time (= achieved encoder FLOP/s / peak).

The peak is measured in the same run: the best of large square fp32 matmuls and of the encoder's own shape,
timed alternately with the SAE step (medians over repeats).
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
}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes, few repeats")
    p.add_argument("--rounds", type=int, default=3, help="alternations of peak and step timing (default: 3)")
    p.add_argument("--repeats", type=int, default=3, help="timings per turn (default: 3)")
    a = p.parse_args()
    shapes = {"quick": (128, 1024, 16, 512)} if a.quick else SHAPES
    rounds, repeats = (1, 2) if a.quick else (a.rounds, a.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    sq = 512 if a.quick else 2048
    A, B = torch.randn(sq, sq), torch.randn(sq, sq)
    for name, (d, n, k, batch) in shapes.items():
        torch.manual_seed(0)
        sae = TopKSAE(SAEConfig(d=d, n_latents=n, k=k))
        opt = ScheduleFreeSignSGD(sae.parameters(), lr=1e-3)
        x = torch.randn(batch, d)
        enc_in = torch.randn(batch, d)

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
            t_sq += timed(square, repeats)
            t_enc += timed(encoder_mm, repeats)
            t_step += timed(step, repeats)
        peak_sq = 2 * sq ** 3 / min(t_sq)
        peak_enc = 2 * batch * d * n / min(t_enc)
        peak = max(peak_sq, peak_enc)
        enc_flops = 2 * batch * d * n
        med = statistics.median(t_step)
        shares = [enc_flops / t / peak for t in t_step]
        print(f"{name}: d {d}, n_latents {n}, k {k}, batch {batch}")
        print(f"  fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (square {sq}: {peak_sq / 1e9:.1f}; encoder shape: "
              f"{peak_enc / 1e9:.1f}, median {enc_flops / statistics.median(t_enc) / 1e9:.1f})")
        print(f"  SAE step {med * 1e3:.1f} ms = {batch / med:,.0f} tokens/s; encoder roofline "
              f"{enc_flops / peak * 1e3:.1f} ms; share {enc_flops / med / peak:.0%} "
              f"[{min(shares):.0%}-{max(shares):.0%}] (target >= 60%)")


if __name__ == "__main__":
    main()
