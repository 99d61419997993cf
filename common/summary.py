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
    if stage.startswith("part4"):
        return (f"{m['model']} NFM: linear share of output magnitude {h['linear_share_of_output_magnitude']:.1%}; "
                f"top interaction partners of feature {m['partners']['feature']}: "
                + ", ".join(str(r["feature"]) for r in m["partners"]["ranking"][:5]))
    if stage.startswith("part5"):
        z, c = h["fvu_zero_ablation"], m["comparisons"]
        return (f"FVU joint {z['full']:.4f} (its SAE path {z['sae']:.4f}) vs standalone SAE of equal parameters "
                f"{c['standalone_sae']['fvu']:.4f}: {c['joint_vs_standalone_relative_fvu_reduction']:+.1%}")
    if stage.startswith("part6"):
        v = m["variants"]
        keys = [k for k in ("sae", "sae+nfm", "joint_sae", "joint_full", "standalone_sae") if k in v]
        return "KL per token: " + ", ".join(f"{k} {v[k]['kl']:.4f}" for k in keys) + (
            f"; SAE / eps-random {v['sae']['kl_ratio_to_eps_random']:.2f}x" if "kl_ratio_to_eps_random" in v.get("sae", {}) else "")
    if stage.startswith("part8"):
        pr = m["primary"]
        s = "significant primary features (q < 0.05): " + ", ".join(f"{k} {v}" for k, v in pr["significant_at_q05"].items())
        if "secondary" in m and m["secondary"]["top_by_interaction_F"]:
            t = m["secondary"]["top_by_interaction_F"][0]
            s += f"; top integration feature {t['feature']} (interaction F {t['F']:.1f})"
        return s
    if stage.startswith("part9"):
        tgt = m["conditions"]["target"]
        tested = [(k, v) for k, v in tgt.items() if "A:B" in v]
        return (f"clamping {m['kind']} feature {m['feature']}: " + ", ".join(
            f"{k} F {v['A:B']['F']:.2f} p {v['A:B']['p']:.3g}" for k, v in tested)) if tested else "no logit changed"
    if stage.startswith("part7"):
        return "; ".join(f"{name}: sq-norm mean {r['squared_norm_mean']:.3f}, two modes {r['bimodality']['two_modes']}"
                         for name, r in m["models"].items())
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
