"""The demo's headline figures over several seeds: mean and range, for the README's results table.

    .venv/bin/python bench/demo_seeds.py                  # seeds 0 1 2 (~6 min each on 2 CPU cores)
    .venv/bin/python bench/demo_seeds.py --seeds 0 --dry-run

Runs every stage of `make demo` (read from `make -n demo`, as bench_end_to_end.py does) once per seed, with
`--seed S` and every stage folder under checkpoints/seeds/seedS/ (the demo LM, its corpus and the activation
cache are shared: the LM is the shipped one, the same on every machine). Then collects the headline figures
of each run's metrics.json and writes bench/demo_seeds.json and bench/demo_seeds.md (a table: figure, mean,
min, max, and the value at each seed). The seed changes every trained model's initialisation, data order and
dropout, part6's random baselines and part9's generations; it does not change the held-out documents.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_end_to_end import stage_commands  # noqa: E402

# (label, stage folder, path into its metrics.json)
FIGURES = [
    ("part1 SAE FVU", "part1_sae", ["held_out_test", "fvu"]),
    ("part1 dead latents", "part1_sae", ["held_out_test", "dead_fraction"]),
    ("part2 NFM residual reduction", "part2_nfm", ["held_out_test", "residual_reduction", "both"]),
    ("part2 linear path only [mean_ablation]", "part2_nfm", ["held_out_test", "residual_reduction", "linear_only[mean_ablation]"]),
    ("part2 interaction path only [mean_ablation]", "part2_nfm", ["held_out_test", "residual_reduction", "interaction_only[mean_ablation]"]),
    ("part2 linear path only [zero_ablation]", "part2_nfm", ["held_out_test", "residual_reduction", "linear_only[zero_ablation]"]),
    ("part2 control linear_from_x", "part2_nfm", ["held_out_test", "controls", "linear_from_x", "residual_reduction"]),
    ("part2 control mlp_on_code", "part2_nfm", ["held_out_test", "controls", "mlp_on_code", "residual_reduction"]),
    ("part2 control mlp_from_x", "part2_nfm", ["held_out_test", "controls", "mlp_from_x", "residual_reduction"]),
    ("part2 residual-SAE control", "part2_nfm", ["held_out_test", "controls", "residual_sae", "residual_reduction"]),
    ("part2 integration evidence (NFM - mlp_on_code)", "part2_nfm", ["held_out_test", "integration_evidence", "gain"]),
    ("part3 secondary SAE FVU", "part3_secondary_sae", ["held_out_test", "fvu"]),
    ("part3 --joint secondary SAE FVU", "part3_secondary_sae_joint", ["held_out_test", "fvu"]),
    ("part5 joint FVU (all paths)", "part5_joint", ["held_out_test", "fvu", "full"]),
    ("part5 joint SAE path [mean_ablation]", "part5_joint", ["held_out_test", "fvu", "sae[mean_ablation]"]),
    ("part5 joint SAE path [zero_ablation]", "part5_joint", ["held_out_test", "fvu", "sae[zero_ablation]"]),
    ("part5 standalone SAE, equal parameters", "part5_joint", ["comparisons", "standalone_sae", "fvu"]),
    ("part5 PolySAE joint FVU (all paths)", "part5_poly", ["held_out_test", "fvu", "full"]),
    ("part5 PolySAE linear dictionary alone [mean_ablation]", "part5_poly", ["held_out_test", "fvu", "sae[mean_ablation]"]),
    ("detect_conjunctions: conjunction latents", "conjunctions", ["n_conjunction_latents"]),
    ("part6 KL: SAE", "part6_kl", ["variants", "sae", "kl"]),
    ("part6 KL: SAE + NFM", "part6_kl", ["variants", "sae+nfm", "kl"]),
    ("part6 KL: SAE + linear path [mean_ablation]", "part6_kl", ["variants", "sae+nfm_linear[mean_ablation]", "kl"]),
    ("part6 KL: SAE + interaction path [mean_ablation]", "part6_kl", ["variants", "sae+nfm_interaction[mean_ablation]", "kl"]),
    ("part6 KL: SAE + linear path [zero_ablation]", "part6_kl", ["variants", "sae+nfm_linear[zero_ablation]", "kl"]),
    ("part6 KL: SAE + linear_from_x", "part6_kl", ["variants", "sae+linear_from_x", "kl"]),
    ("part6 KL: SAE + mlp_on_code", "part6_kl", ["variants", "sae+mlp_on_code", "kl"]),
    ("part6 KL: SAE + mlp_from_x", "part6_kl", ["variants", "sae+mlp_from_x", "kl"]),
    ("part6 KL: SAE + KL-trained linear adapter", "part6_kl", ["variants", "sae+kl_adapter", "kl"]),
    ("part6 SAE + NFM vs SAE + mlp_on_code, relative KL", "part6_kl",
     ["paired_comparisons", "sae+nfm vs sae+mlp_on_code", "kl", "relative_to_b"]),
    ("part6 KL: joint, all paths", "part6_kl", ["variants", "joint_full", "kl"]),
    ("part6 KL: PolySAE joint, all paths", "part6_kl", ["variants", "poly_full", "kl"]),
    ("part6 KL: standalone SAE", "part6_kl", ["variants", "standalone_sae", "kl"]),
    ("part6 SAE + NFM vs SAE, relative KL", "part6_kl", ["paired_comparisons", "sae+nfm vs sae", "kl", "relative_to_b"]),
    ("part6 SAE KL / eps-random", "part6_kl", ["variants", "sae", "kl_ratio_to_eps_random"]),
    ("part6 SAE KL / cov-random", "part6_kl", ["variants", "sae", "kl_ratio_to_cov_random"]),
    ("part4 sequential linear share of output [mean_ablation]", "part4_inspect_sequential",
     ["held_out_test", "linear_share_of_output_magnitude[mean_ablation]"]),
    ("part4 sequential linear share of output [zero_ablation]", "part4_inspect_sequential",
     ["held_out_test", "linear_share_of_output_magnitude[zero_ablation]"]),
    ("part8 primary features, formality (perm. q < 0.05)", "part8_stimuli", ["primary", "significant_at_q05", "permutation", "formality"]),
    ("part8 primary features, emotion (perm. q < 0.05)", "part8_stimuli", ["primary", "significant_at_q05", "permutation", "emotion"]),
    ("part8 primary features, interaction (perm. q < 0.05)", "part8_stimuli",
     ["primary", "significant_at_q05", "permutation", "formality x emotion"]),
    ("part8 secondary features, interaction (perm. q < 0.05)", "part8_stimuli",
     ["secondary", "significant_at_q05", "permutation", "formality x emotion"]),
    ("part8 top secondary feature: interaction F, selection half", "part8_stimuli", ["secondary", "top_by_interaction_F", 0, "F"]),
    ("part8 top secondary feature: interaction F, test half", "part8_stimuli", ["secondary", "held_out_confirmation", "A:B", 0, "F"]),
]
PART9_SETTING = "mult=8"
PART9 = [
    ("part9 target interaction min F' (x8)", ["conditions", "target", PART9_SETTING, "A:B", "F"]),
    ("part9 target interaction p (x8, headline)", ["conditions", "target", PART9_SETTING, "A:B", "p"]),
    ("part9 target vs null features: empirical p (x8)", ["null_features", "specificity", PART9_SETTING, "empirical_p"]),
    ("part9 null features with interaction p < 0.05 (x8)", ["null_features", "specificity", PART9_SETTING,
                                                            "null_share_significant_at_05", "A:B"]),
    ("part9 null features with formality p < 0.05 (x8)", ["null_features", "specificity", PART9_SETTING,
                                                          "null_share_significant_at_05", "A"]),
    ("part9 linear-path control interaction p (x8)", ["conditions", "linear_path_control", PART9_SETTING, "A:B", "p"]),
]
FIGURES += [(name, "part9_clamp", path) for name, path in PART9]


def seeded(cmd: str, seed: int) -> str:
    """The stage command with --seed and its checkpoints/<stage> folders moved under checkpoints/seeds/seedS/."""
    parts = shlex.split(cmd)
    if parts[1] == "-m":                                        # python -m common.demo / common.summary: shared
        return cmd
    out = []
    for p in parts:
        if p.startswith("checkpoints/") and not p.startswith(("checkpoints/demo", "checkpoints/activation_cache")):
            p = f"checkpoints/seeds/seed{seed}/" + p[len("checkpoints/"):]
        out.append(p)
    return shlex.join(out + ["--seed", str(seed)])


def dig(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def collect(seeds: list[int]) -> dict:
    table = {}
    for name, stage, path in FIGURES:
        vals = []
        for s in seeds:
            f = ROOT / "checkpoints" / "seeds" / f"seed{s}" / stage / "metrics.json"
            try:
                vals.append(float(dig(json.loads(f.read_text()), path)))
            except (OSError, KeyError, IndexError, TypeError, ValueError):
                vals.append(float("nan"))
        v = np.array(vals)
        table[name] = {"mean": float(np.nanmean(v)) if np.isfinite(v).any() else None,
                       "min": float(np.nanmin(v)) if np.isfinite(v).any() else None,
                       "max": float(np.nanmax(v)) if np.isfinite(v).any() else None,
                       "by_seed": dict(zip(map(str, seeds), vals))}
    return table


def fmt(x) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default: 0 1 2)")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    p.add_argument("--collect-only", action="store_true", help="only collect the figures of earlier runs")
    a = p.parse_args()
    cmds = [c for c in stage_commands() if "common.summary" not in c]
    if not a.collect_only:
        for s in a.seeds:
            for c in cmds:
                c = seeded(c, s)
                print(c, flush=True)
                if not a.dry_run:
                    subprocess.run(c, cwd=ROOT, shell=True, check=True, stdout=subprocess.DEVNULL)
        if a.dry_run:
            return
    table = collect(a.seeds)
    (ROOT / "bench" / "demo_seeds.json").write_text(json.dumps({"seeds": a.seeds, "figures": table}, indent=2) + "\n")
    lines = [f"| figure | mean | range | {' | '.join(f'seed {s}' for s in a.seeds)} |",
             "|---|---|---|" + "---|" * len(a.seeds)]
    for name, r in table.items():
        lines.append(f"| {name} | {fmt(r['mean'])} | {fmt(r['min'])} – {fmt(r['max'])} | "
                     + " | ".join(fmt(r["by_seed"][str(s)]) for s in a.seeds) + " |")
    (ROOT / "bench" / "demo_seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {ROOT / 'bench' / 'demo_seeds.json'} and {ROOT / 'bench' / 'demo_seeds.md'}")


if __name__ == "__main__":
    main()
