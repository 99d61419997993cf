"""part7: decoder geometry of the standalone SAE(s) and the joint model side by side.

Decoder-side weights of feature i, defined the same way for every model: its effective linear decoder
e_i = W_dec[i] (+ W_lin[i] for the joint model, whose NFM linear path is a second linear decoder of the same
code), in the model's normalised units. Reported per model:
  - squared norms ||e_i||^2: distribution, a 1- vs 2-component Gaussian-mixture BIC test of bimodality, and
    the same norms at initialisation (saved by part1/part5), with the share of features still at their init
    value (|change| < 1e-3): modes made of untrained features are init artifacts, not structure;
  - Gram statistics: the max |cos| of each e_i to any other and the mean off-diagonal |cos|, computed in row
    chunks (no n x n matrix);
  - joint model only, on held-out tokens: each feature's direct (SAE path), NFM-linear and NFM-interaction
    contribution (common/featurestats.py), its NFM share, the Pearson and Spearman correlation of the NFM
    share with the squared norm (95% CIs), and the group shares below / above --threshold (the study's
    82.8% vs 71.3% computation, here in output units rather than raw weight norms);
  - joint model only, the study's computation in its own terms ("seed_bimodality", common/featurestats.py:
    ||W_dec[i]||^2 of the SAE decoder alone split at --seed-threshold 0.2, ratios of plain weight norms,
    Student t per ratio, Spearman rho), meaningful for unconstrained decoders (--recipe reference).

Demo (after part1 and part5):
    python part7_gram_analysis.py
Paper setup:
    python part7_gram_analysis.py --preset paper --sae checkpoints/paper/part1_sae --joint checkpoints/paper/part5_joint --out checkpoints/paper/part7_gram

Writes to --out: metrics.json, squared_norms.png, shares_vs_squared_norm.png, max_cosine.png and, for
unconstrained decoders, seed_ratios_vs_squared_norm.png.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from common import cli, plots
from common.data import DataSpec, get_activations
from common.featurestats import (SEED_THRESHOLD, corr_with_ci, feature_contributions, gmm_bic, max_abs_cosine,
                                 seed_bimodality, seed_ratios)
from common.joint import load_joint_checkpoint
from common.loading import load_sae_checkpoint
from common.sae import encode_all
from safetensors import safe_open


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/part7_gram")
    p.add_argument("--sae", default="checkpoints/part1_sae", help="standalone SAE (part1) folder; '' to skip (default: checkpoints/part1_sae)")
    p.add_argument("--joint", default="checkpoints/part5_joint", help="joint model (part5) folder; its baseline_sae/ is "
                                                                      "included when present (default: checkpoints/part5_joint)")
    p.add_argument("--threshold", type=float, default=None,
                   help="squared-norm threshold for the group shares (default: between the two mixture modes when "
                        "bimodal, else the median)")
    p.add_argument("--chunk", type=int, default=1024, help="rows per chunk of the Gram computation (default: 1024)")
    p.add_argument("--seed-threshold", type=float, default=SEED_THRESHOLD,
                   help="the original study's squared-norm split of ||W_dec[i]||^2 for its own analysis "
                        "(seed_bimodality, for unconstrained decoders: --recipe reference) (default: 0.2)")
    cli.add_data_args(p, with_model_source=False)
    return p


def init_sq_norm(path: Path, n: int) -> tuple[torch.Tensor, str]:
    if (path / "model.safetensors").is_file():          # a SAELens folder (common/saelens.py) has none
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            if "init.sq_norm" in f.keys():
                return f.get_tensor("init.sq_norm"), "saved at training time"
        return torch.ones(n), "not saved; assumed 1 (unit-norm decoder rows, W_lin = 0 at init)"
    return torch.ones(n), "not recorded (an imported SAELens SAE); 1 shown for reference only"


def geometry(E: torch.Tensor, init: torch.Tensor, chunk: int) -> dict:
    sq = E.detach().double().pow(2).sum(1)
    best, mean_abs = max_abs_cosine(E.detach(), chunk)
    return {"squared_norm": sq, "max_cos": best,
            "summary": {"n_features": int(sq.numel()), "squared_norm_mean": float(sq.mean()),
                        "squared_norm_quantiles": dict(zip(("p05", "p25", "p50", "p75", "p95"),
                                                           np.quantile(sq.numpy(), [.05, .25, .5, .75, .95]).tolist())),
                        "bimodality": gmm_bic(sq.numpy()),
                        "share_unchanged_from_init": float(((sq - init.double()).abs() < 1e-3).float().mean()),
                        "note": ("every squared norm is 1: the unit-norm decoder recipe fixes them, so there is no "
                                 "distribution to test" if bool(((sq - 1).abs() < 1e-5).all()) else ""),
                        "init_squared_norm_mean": float(init.double().mean()),
                        "mean_abs_offdiagonal_cos": mean_abs, "mean_max_abs_cos": float(best.mean())}}


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="part7")
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    t0 = time.time()
    models, results = {}, {}
    if args.sae:
        sae, _, _ = load_sae_checkpoint(args.sae)
        models["part1 SAE"] = (sae.W_dec, *init_sq_norm(Path(args.sae), sae.cfg.n_latents))
    joint = None
    if args.joint:
        joint, jnorm, jcfg = load_joint_checkpoint(args.joint)
        if (Path(args.joint) / "baseline_sae" / "config.json").exists():
            base, _, _ = load_sae_checkpoint(Path(args.joint) / "baseline_sae")
            models["standalone SAE (joint's parameters)"] = (base.W_dec, *init_sq_norm(Path(args.joint) / "baseline_sae", base.cfg.n_latents))
        models["joint (W_dec + W_lin)"] = (joint.sae.W_dec + joint.nfm.W_lin, *init_sq_norm(Path(args.joint), joint.sae.cfg.n_latents))
    if not models:
        raise cli.UserError("nothing to analyse: pass --sae and/or --joint")
    for name, (E, init, init_note) in models.items():
        g = geometry(E, init, args.chunk)
        results[name] = {**g["summary"], "init_source": init_note}
        models[name] = (g, init)

    shares = seed = None
    if joint is not None:
        # the original study's own analysis of the joint SAE decoder's squared norms (meaningful for free norms)
        seed = seed_bimodality(joint.sae.W_dec, joint.nfm.W_lin, joint.nfm.V, args.seed_threshold)
        results["joint (W_dec + W_lin)"]["seed_bimodality"] = seed
        device = cli.env_device(args.device)
        joint.to(device)
        acts = get_activations(args, DataSpec.from_description(jcfg["data"]), width=joint.sae.cfg.d, parent=jcfg["data"],
                               need_train=False)
        _, x_test = acts.normalized_halves(jnorm.encode)
        idx, val = encode_all(joint.sae, x_test)
        c = feature_contributions(joint.nfm, idx, val, joint.sae.cfg.n_latents, joint.sae.W_dec.detach())
        total = c["direct"] + c["linear"] + c["interaction"]
        active = (c["freq"] > 0) & (total > 0)
        sq = models["joint (W_dec + W_lin)"][0]["squared_norm"]
        bim = results["joint (W_dec + W_lin)"]["bimodality"]
        thr = args.threshold if args.threshold is not None else (
            float(np.mean(bim["means"])) if bim["two_modes"] else float(sq[active].median()))
        share = {k: (c[k] / total.clamp_min(1e-30))[active].numpy() for k in ("direct", "linear", "interaction")}
        share["nfm"] = share["linear"] + share["interaction"]
        s_act = sq[active].numpy()
        low, high = s_act < thr, s_act >= thr
        shares = {"threshold": thr, "n_active_features": int(active.sum()), "n_never_active": int((~active).sum()),
                  "n_tokens": int(idx.shape[0]),
                  "group_means": {grp: {k: float(v[m].mean()) if m.any() else None for k, v in share.items()} | {"n": int(m.sum())}
                                  for grp, m in (("below_threshold", low), ("above_threshold", high))},
                  "correlation_nfm_share_vs_squared_norm": corr_with_ci(s_act, share["nfm"]),
                  "correlation_log_frequency_vs_squared_norm": corr_with_ci(s_act, np.log10(c["freq"][active].numpy()))}
        results["joint (W_dec + W_lin)"]["shares"] = shares

    metrics = {"stage": "part7_gram_analysis", "models": results, "definitions": __doc__.split("Demo")[0].strip(),
               "seconds": time.time() - t0}
    cli.write_json(out / "metrics.json", metrics)
    pngs = [plots.overlaid_histograms({name: (g["squared_norm"].numpy(), init.numpy()) for name, (g, init) in models.items()},
                                      out / "squared_norms.png", "squared norm of the effective decoder row"),
            plots.histogram_grid({name: g["max_cos"].tolist() for name, (g, _) in models.items()}, out / "max_cosine.png",
                                 "max |cos| to another feature", log10=False)]
    if shares is not None:
        pngs.append(plots.scatter_panels(s_act, {k: share[k] for k in ("nfm", "linear", "interaction", "direct")},
                                         out / "shares_vs_squared_norm.png", "squared norm", thr))
    if seed is not None and not seed["all_unit_norm"]:
        pngs.append(plots.scatter_panels(*seed_ratios(joint.sae.W_dec, joint.nfm.W_lin, joint.nfm.V),
                                         out / "seed_ratios_vs_squared_norm.png", "||W_dec[i]||^2 (joint SAE decoder)",
                                         args.seed_threshold))
    for name, r in results.items():
        b = r["bimodality"]
        print(f"{name}: squared norm mean {r['squared_norm_mean']:.3f} (init {r['init_squared_norm_mean']:.3f}, "
              f"{r['share_unchanged_from_init']:.1%} unchanged); two modes: {b['two_modes']} (dBIC {b['delta_bic']:.1f}); "
              f"mean max |cos| {r['mean_max_abs_cos']:.3f}")
    if seed is not None:
        r = seed["ratios"]["nfm_total"]
        print(f"the study's own analysis (||W_dec[i]||^2 split at {seed['threshold']}): " + (
            "every squared norm is 1 (unit-norm decoder): not applicable; train with --recipe reference" if seed["all_unit_norm"]
            else f"n low {seed['n_low']} / high {seed['n_high']}, nfm_total {r['mean_low']} vs {r['mean_high']}, "
                 f"Spearman rho {r.get('spearman_rho', float('nan')):+.3f} (built in: R_i = sqrt(s_i))"))
    if shares is not None:
        g = shares["group_means"]
        cor = shares["correlation_nfm_share_vs_squared_norm"]["spearman"]
        print(f"joint NFM share below / above {thr:.3f}: {g['below_threshold']['nfm']} / {g['above_threshold']['nfm']}; "
              f"Spearman r {cor['r']:+.3f} [{cor['ci'][0]:+.3f}, {cor['ci'][1]:+.3f}]")
    cli.report(out, out / "metrics.json", pngs)


if __name__ == "__main__":
    cli.run_main(main)
