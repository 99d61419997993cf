"""Print the headline held-out numbers of finished stages and where their files are.

    python -m common.summary checkpoints/part1_sae checkpoints/part2_nfm checkpoints/part3_secondary_sae
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def headline(m: dict) -> str:
    h = m.get("held_out_test", {})
    stage = m.get("stage", "")
    if stage.startswith("part2"):
        red = h["residual_reduction"]
        s = (f"residual reduction: both {red['both']:.3f}, linear only {red['linear_only']:.3f}, "
             f"interaction only {red['interaction_only']:.3f}")
        if "baseline_residual_sae" in m:
            s += f"; residual-SAE control {m['baseline_residual_sae']['residual_reduction']:.3f}"
        return s
    s = f"FVU {h['fvu']:.4f}, L0 {h['l0']:.1f}, dead {h['dead_fraction']:.1%}"
    if "nfm_residual_reduction_with_secondary_reconstruction" in h:
        s += (f"; NFM residual reduction {h['nfm_residual_reduction_intact']:.3f} intact -> "
              f"{h['nfm_residual_reduction_with_secondary_reconstruction']:.3f} through the secondary SAE")
    return s


def main(dirs: list[str]) -> None:
    print("\n=== results (held-out documents) ===")
    for d in map(Path, dirs):
        f = d / "metrics.json"
        if not f.is_file():
            print(f"{d}: no metrics.json (stage not run)")
            continue
        m = json.loads(f.read_text())
        print(f"{m.get('stage', d.name)}: {headline(m)}")
        print(f"    {f.resolve()}")
        for png in sorted(d.glob("*.png")):
            print(f"    {png.resolve()}")


if __name__ == "__main__":
    main(sys.argv[1:])
