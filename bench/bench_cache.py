"""Cached vs uncached activations for part1 + part2: wall time of running `part1_train_topk_sae.py` then
`part2_train_residual_nfm.py` as subprocesses on the demo (as a researcher would), A and B alternated,
medians of repeats.

  uncached   both stages with --cache-dir '': each collects its own activations through the LM
  cached     both stages pointed at one activation cache that was filled once beforehand
  fill       the one-time cost of filling that cache: a subprocess that loads the LM and collects the train
             and validation splits exactly as part1 does (`get_activations` with part1's parsed flags)

    .venv/bin/python bench/bench_cache.py            # 3 rounds, 30k/6k tokens, about 5-8 min on 2 cores
    .venv/bin/python bench/bench_cache.py --quick    # 1 round, 10k/3k tokens

Prints seconds per part1+part2 pair for each, the ratio uncached/cached, and the fill cost.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FILL = """
import sys
sys.path.insert(0, {root!r})
import part1_train_topk_sae as p1
from common import cli
from common.data import DataSpec, get_activations
args = cli.parse(p1.build_parser(), sys.argv[1:])
a = get_activations(args, DataSpec.from_args(args))
print('filled', a.train.shape, a.val.shape, a.train.dtype)
"""


def run(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return dt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 10k/3k tokens, 20 steps")
    p.add_argument("--rounds", type=int, default=3, help="A/B alternations (default: 3)")
    p.add_argument("--train-tokens", type=int, default=30_000, help="training tokens per stage (default: 30000)")
    p.add_argument("--val-tokens", type=int, default=6_000, help="held-out tokens per stage (default: 6000)")
    p.add_argument("--steps", type=int, default=50, help="training steps of each stage (default: 50)")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.train_tokens, a.val_tokens, a.steps = 1, 10_000, 3_000, 20
    py = sys.executable
    from common.demo import ensure_demo_model
    ensure_demo_model()                                   # build the demo once, outside the timings

    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        data = ["--model", "demo", "--train-tokens", str(a.train_tokens), "--val-tokens", str(a.val_tokens)]
        train = ["--steps", str(a.steps)]
        cache = str(tmp / "cache")

        def pair(cache_dir: str, tag: str) -> float:
            out1, out2 = tmp / f"p1-{tag}", tmp / f"p2-{tag}"
            t = run([py, "part1_train_topk_sae.py", *data, *train, "--cache-dir", cache_dir, "--out", str(out1)])
            t += run([py, "part2_train_residual_nfm.py", "--sae", str(out1), *data[2:], *train,
                      "--cache-dir", cache_dir, "--out", str(out2)])
            return t

        fill = run([py, "-c", FILL.format(root=str(ROOT)), *data, "--cache-dir", cache])
        print(f"demo, layer 2, {a.train_tokens} train + {a.val_tokens} val tokens, {a.steps} steps per stage, "
              f"{a.rounds} round(s)")
        print(f"one-time cache fill (LM load + collect train and val): {fill:6.1f} s")
        tu, tc = [], []
        for r in range(a.rounds):
            tu.append(pair("", f"u{r}"))
            tc.append(pair(cache, f"c{r}"))
            print(f"  round {r + 1}: uncached {tu[-1]:6.1f} s   cached {tc[-1]:6.1f} s")
        mu, mc = statistics.median(tu), statistics.median(tc)
        print(f"part1+part2 uncached {mu:6.1f} s   cached {mc:6.1f} s   uncached/cached {mu / mc:5.2f}x   "
              f"(saved {mu - mc:5.1f} s per pair; fill {fill:5.1f} s pays off after {fill / max(mu - mc, 1e-9):4.2f} pairs)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
