"""End to end: time every stage of the README's main command (`make demo`) and show each stage's share.

    .venv/bin/python bench/bench_end_to_end.py            # runs the demo pipeline from scratch (~8 min)
    .venv/bin/python bench/bench_end_to_end.py --dry-run  # list the stages only (the smoke test)

The stage commands are read from `make -n demo`, so this always times exactly what the README runs. With
--from-scratch (the default) the demo model, the activation cache and the stage outputs are deleted first
(`make clean` and
checkpoints/demo), as on a fresh clone; the one-time virtualenv install is not part of it (`make setup` first).
Writes bench/end_to_end.json with the per-stage seconds.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage_commands() -> list[str]:
    """The commands `make demo` would run, minus the setup step and echo-only lines."""
    out = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    cmds = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith(".venv/bin/python"):
            cmds.append(line)
    return cmds


def label(cmd: str) -> str:
    parts = shlex.split(cmd)
    name = parts[2] if parts[1] == "-m" else Path(parts[1]).stem
    out = parts[parts.index("--out") + 1] if "--out" in parts else ""
    return f"{name} {Path(out).name}".strip() if out else name


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the stages without running them")
    p.add_argument("--keep", action="store_true", help="do not `make clean` first (reuse the demo model and cache)")
    a = p.parse_args()
    cmds = stage_commands()
    if not cmds:
        sys.exit("`make -n demo` listed no stage commands; run from the repository root with make installed")
    if a.dry_run:
        for c in cmds:
            print(label(c), "::", c)
        return
    subprocess.run(["make", "setup"], cwd=ROOT, check=True)
    if not a.keep:
        subprocess.run(["make", "clean"], cwd=ROOT, check=True)
        subprocess.run(["rm", "-rf", "checkpoints/demo"], cwd=ROOT, check=True)   # rebuilt by common.demo
    rows = []
    t_all = time.perf_counter()
    for c in cmds:
        t = time.perf_counter()
        subprocess.run(c, cwd=ROOT, shell=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows.append((label(c), time.perf_counter() - t))
        print(f"{rows[-1][0]:45s} {rows[-1][1]:7.1f} s", flush=True)
    total = time.perf_counter() - t_all
    print(f"\n{'stage':45s} {'seconds':>8s} {'share':>6s}")
    for name, s in sorted(rows, key=lambda r: -r[1]):
        print(f"{name:45s} {s:8.1f} {s / total:6.1%}")
    print(f"{'total (without the venv install)':45s} {total:8.1f}   target <= 600 s: {'met' if total <= 600 else 'NOT met'}")
    (ROOT / "bench" / "end_to_end.json").write_text(json.dumps({"total_s": total, "stages": dict(rows)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
