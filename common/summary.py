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
        s = (f"residual reduction: both {red['both']:.3f}, linear only {red['linear_only[mean_ablation]']:.3f}, "
             f"interaction only {red['interaction_only[mean_ablation]']:.3f} (other path mean-ablated)")
        for name, c in h.get("controls", {}).items():
            s += f"; {name} {c['residual_reduction']:.3f}"
        ev = h.get("integration_evidence")
        if ev:
            s += (f"; integration evidence (NFM - {ev['best_code_control']}) {ev['gain']:+.4f} "
                  f"[{ev['ci'][0]:+.4f}, {ev['ci'][1]:+.4f}]")
        return s
    if stage.startswith("part4"):
        return (f"{m['model']} NFM: linear share of output magnitude {h['linear_share_of_output_magnitude[mean_ablation]']:.1%} "
                f"(paths minus their training means); top interaction partners of feature {m['partners']['feature']}: "
                + ", ".join(str(r["feature"]) for r in m["partners"]["ranking"][:5]))
    if stage.startswith("part5"):
        f, c = h["fvu"], m["comparisons"]
        return (f"FVU joint {f['full']:.4f} (its SAE path {f['sae[mean_ablation]']:.4f}, NFM paths mean-ablated) vs "
                f"standalone SAE of equal parameters {c['standalone_sae']['fvu']:.4f}: "
                f"{c['joint_vs_standalone_relative_fvu_reduction']:+.1%}")
    if stage.startswith("part6"):
        v = m["variants"]
        keys = [k for k in ("sae", "sae+nfm", "joint_sae[mean_ablation]", "joint_full", "standalone_sae") if k in v]
        return "KL per token: " + ", ".join(f"{k} {v[k]['kl']:.4f}" for k in keys) + (
            f"; SAE / eps-random {v['sae']['kl_ratio_to_eps_random']:.2f}x" if "kl_ratio_to_eps_random" in v.get("sae", {}) else "")
    if stage.startswith("part8"):
        pr = m["primary"]
        sig = pr["significant_at_q05"]["permutation"]
        s = "significant primary features (permutation q < 0.05, selection half): " + ", ".join(f"{k} {v}" for k, v in sig.items())
        if "secondary" in m and m["secondary"]["top_by_interaction_F"]:
            t = m["secondary"]["top_by_interaction_F"][0]
            s += f"; top integration feature {t['feature']} (interaction F {t['F']:.1f}, q_perm {t['q_perm']:.2g})"
        return s
    if stage.startswith("part9"):
        tgt = m["conditions"]["target"]
        spec = m.get("null_features", {}).get("specificity", {})
        tested = [(k, v) for k, v in tgt.items() if "A:B" in v]
        return (f"clamping {m['kind']} feature {m['feature']}, interaction (words x prompts, min F'): " + ", ".join(
            f"{k} F {v['A:B']['F']:.2f} p {v['A:B']['p']:.3g}"
            + (f" (null-feature percentile {spec[k]['percentile']:.0f})" if k in spec else "") for k, v in tested)
                ) if tested else "no logit changed"
    if stage.startswith("detect_conjunctions"):
        top = ", ".join(f"{r['latent']} = {r['parent_a']} & {r['parent_b']}" for r in m["conjunction_latents"][:3])
        return (f"{m['n_conjunction_latents']} conjunction latents among {m['n_examined']} examined "
                f"({m['n_conjunction_latents_also_detected_on_held_out_rows']} also on held-out test rows)"
                + (f"; top: {top}" if top else ""))
    if stage.startswith("browse_features"):
        n = {k: len(v) for k, v in m["pages"].items()}
        return (f"feature pages: {', '.join(f'{k} {v}' for k, v in n.items())} ({m['n_test_tokens']:,} held-out test "
                f"tokens); open {m['index']}")
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
