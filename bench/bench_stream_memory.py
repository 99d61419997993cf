"""Host memory against training tokens (issue 14, "streaming training stages"): peak RSS of each training stage
on an activation file of N rows and of 4N rows, and the ratio. The target is a ratio below 1.5: a stage that
streams its tokens holds shards, the model and the optimizer, not [train tokens, ...] tensors.

    .venv/bin/python bench/bench_stream_memory.py                         # 250k and 1M rows, d 256 (~10 min)
    .venv/bin/python bench/bench_stream_memory.py --rows 2000 --d 16 --steps 5 --stages part1   # the smoke size

Each stage runs as its own subprocess (as a researcher runs it) under a launcher that reports the child's
peak resident set size (getrusage RUSAGE_CHILDREN ru_maxrss, Linux: KiB). The activation files are random
Gaussian rows with 100-row documents, written once per size under --work; every stage trains for --steps
steps only, since what grows with the file is what a stage loads and derives from it, not the step count.
Held-out rows are capped at --val-tokens at both sizes (held-out sets stay in memory by design).
Stage chain per size: part1 (SAE) -> part2 (NFM, on that SAE, controls off) -> part3 (secondary SAE on that
NFM), and part5 (joint model, standalone baseline from the part1 SAE). Writes bench/stream_memory.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def write_file(path: Path, rows: int, d: int, seed: int) -> Path:
    import torch

    from common.data import save_activation_file

    if not path.is_file():
        g = torch.Generator().manual_seed(seed)
        acts = torch.randn(rows, d, generator=g) * torch.linspace(0.5, 2.0, d)
        save_activation_file(path, acts, torch.arange(rows) // 100)
    return path


def peak_rss(cmd: list[str]) -> float:
    """Run cmd as a child of a launcher; the child's peak RSS in MB."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    kib = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB")][-1]
    return kib / 1024


def stage_commands(acts: Path, out: Path, a) -> dict[str, list[str]]:
    py = [sys.executable]
    # held-out rows are kept in memory by design (capped by --val-tokens): the same cap at both sizes, so what
    # is measured is the training tokens
    small = ["--steps", str(a.steps), "--eval-every", str(a.steps), "--overwrite", "--val-tokens", str(a.val_tokens)]
    pre = [] if a.precompute_mb is None else ["--precompute-mb", str(a.precompute_mb)]
    return {
        "part1": py + ["part1_train_topk_sae.py", "--activations", str(acts), "--n-latents", str(a.n_latents),
                       "--k", str(a.k), "--out", str(out / "p1"), *small],
        "part2": py + ["part2_train_residual_nfm.py", "--sae", str(out / "p1"), "--activations", str(acts),
                       "--nfm-dim", "32", "--controls", "none", "--out", str(out / "p2"), *small, *pre],
        "part3": py + ["part3_train_secondary_sae.py", "--nfm", str(out / "p2"), "--activations", str(acts),
                       "--expansion", "4", "--k", "8", "--out", str(out / "p3"), *small, *pre],
        "part5": py + ["part5_joint_sae_nfm.py", "--activations", str(acts), "--n-latents", str(a.n_latents),
                       "--k", str(a.k), "--nfm-dim", "32", "--baseline-sae", str(out / "p1"),
                       "--out", str(out / "p5"), *small],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=250_000, help="rows of the small file; the large one has 4x (default: 250000)")
    p.add_argument("--d", type=int, default=256, help="activation width (default: 256)")
    p.add_argument("--n-latents", type=int, default=2048, help="SAE latents (default: 2048)")
    p.add_argument("--k", type=int, default=32, help="SAE TopK (default: 32)")
    p.add_argument("--val-tokens", type=int, default=20_000, help="held-out rows at both sizes (default: 20000)")
    p.add_argument("--precompute-mb", type=float, default=None,
                   help="part2/part3 --precompute-mb (default: theirs, 1024: derived tensors kept when they fit)")
    p.add_argument("--steps", type=int, default=20, help="training steps per stage (default: 20)")
    p.add_argument("--stages", nargs="+", default=["part1", "part2", "part3", "part5"],
                   choices=["part1", "part2", "part3", "part5"], help="stages to measure (default: all four)")
    p.add_argument("--work", default=str(ROOT / "checkpoints" / "bench_stream_memory"),
                   help="folder for the activation files and stage outputs (default: checkpoints/bench_stream_memory)")
    p.add_argument("--json", default=str(ROOT / "bench" / "stream_memory.json"), help="where to write the figures")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"rows": [a.rows, 4 * a.rows], "d": a.d, "val_tokens": a.val_tokens, "precompute_mb": a.precompute_mb,
              "stages": {}}
    for rows in (a.rows, 4 * a.rows):
        acts = write_file(work / f"acts_{rows}_{a.d}.safetensors", rows, a.d, seed=0)
        cmds = stage_commands(acts, work / f"run_{rows}", a)
        for stage in ("part1", "part2", "part3", "part5"):
            needed = stage in a.stages or (stage in ("part1", "part2") and {"part2", "part3"} & set(a.stages))
            if not needed:
                continue
            mb = peak_rss(cmds[stage])
            if stage in a.stages:
                result["stages"].setdefault(stage, {})[str(rows)] = mb
                print(f"{stage:6s} {rows:>9,d} rows x {a.d}: peak RSS {mb:8.0f} MB", flush=True)
    print(f"\npeak RSS ratio, {4 * a.rows:,} vs {a.rows:,} rows (target < 1.5):")
    for stage, by in result["stages"].items():
        ratio = by[str(4 * a.rows)] / by[str(a.rows)]
        by["ratio"] = ratio
        print(f"  {stage:6s} {ratio:5.2f}  {'met' if ratio < 1.5 else 'NOT met'}")
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {a.json}")


if __name__ == "__main__":
    main()
