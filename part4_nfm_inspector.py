"""part4: inspect a trained NFM (sequential, part2) or the NFM paths of a joint model (part5).

  - per primary feature: Gini, effective rank and L0 of its embedding row v_i and of its linear weights
    W_lin[i] (definitions in common/featurestats.py);
  - linear vs interaction share of the NFM output magnitude on held-out tokens, each path minus its mean
    output on training tokens (mean-ablation: the paths carry constant offsets that cancel), and of the raw
    outputs as a labelled second figure ('[zero_ablation]');
  - the top contributors of each path on held-out tokens and their overlap;
  - the top interaction partners of --feature N, ranked by the learned pair effect
    ||NFM(N, j) - NFM(N) - NFM(j) + NFM()|| at typical activations, weighted by how often N and j are
    active together on held-out tokens.

Demo (after part2 / part5):
    python part4_nfm_inspector.py --nfm checkpoints/part2_nfm --out checkpoints/part4_inspect_sequential
    python part4_nfm_inspector.py --joint checkpoints/part5_joint --out checkpoints/part4_inspect_joint
Paper setup:
    python part4_nfm_inspector.py --preset paper --nfm checkpoints/paper/part2_nfm --out checkpoints/paper/part4_inspect

Writes to --out: metrics.json (rankings), weight_stats.png, top_features.png.
"""
from __future__ import annotations

import time

import torch

from common import checkpoint, cli, plots
from common.data import DataSpec, get_activations
from common.featurestats import coactivation, effective_rank, feature_contributions, gini, l0, top_overlap
from common.groundtruth import typical_values
from common.joint import load_joint_checkpoint
from common.nfm import NFM, PATHS, predict
from common.loading import load_sae_checkpoint
from common.sae import encode_all


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/part4_inspect")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--nfm", default=None, help="part2 output folder (default: checkpoints/part2_nfm unless --joint)")
    src.add_argument("--joint", default=None, help="part5 output folder: inspect the joint model's NFM paths")
    p.add_argument("--feature", type=int, default=None,
                   help="primary feature whose interaction partners to rank (default: the top interaction contributor)")
    p.add_argument("--top", type=int, default=20, help="how many top features / partners to list (default: 20)")
    cli.add_data_args(p, with_model_source=False)
    return p


def load_models(args):
    """(nfm, sae, norm, data description, kind, W_dec or None)."""
    if args.joint:
        joint, norm, cfg = load_joint_checkpoint(args.joint)
        return joint.nfm, joint.sae, norm, cfg["data"], "joint", joint.sae.W_dec.detach()
    path = args.nfm or "checkpoints/part2_nfm"
    t, nfm_cfg = checkpoint.load(path, "nfm", "--nfm")
    sae, norm, sae_cfg = load_sae_checkpoint(nfm_cfg["parents"]["sae"]["path"])
    checkpoint.check_parent(nfm_cfg, "sae", sae_cfg, "--nfm", "the SAE it records")
    return NFM.from_tensors(t, nfm_cfg["hparams"]), sae, norm, sae_cfg["data"], "sequential", None


def output_shares(nfm, idx, val) -> dict:
    """The linear path's share of the NFM output, by magnitude (mean |.|) and energy (sum of squares), on
    held-out codes: '[mean_ablation]' measures each path minus its mean output on training tokens, i.e. what
    the path says about the token (the headline: the paths carry constant offsets that cancel);
    '[zero_ablation]' measures the raw outputs, offsets included."""
    out = {}
    for how in ("mean", "zero"):
        mag, en = {}, {}
        for path in PATHS:
            y = predict(nfm, idx, val, (path,)) - (nfm.path_mean(path) if how == "mean" else 0)
            mag[path], en[path] = float(y.abs().mean()), float(y.pow(2).sum())
        out[f"linear_share_of_output_magnitude[{how}_ablation]"] = mag["linear"] / (mag["linear"] + mag["interaction"])
        out[f"linear_share_of_output_energy[{how}_ablation]"] = en["linear"] / (en["linear"] + en["interaction"])
        out[f"mean_abs_linear[{how}_ablation]"], out[f"mean_abs_interaction[{how}_ablation]"] = mag["linear"], mag["interaction"]
    return out


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="part4")
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    t0 = time.time()
    nfm, sae, norm, data_desc, kind, W_dec = load_models(args)
    device = cli.env_device(args.device)
    nfm.to(device)
    sae.to(device)
    n = nfm.cfg.n_features
    if args.feature is not None and not 0 <= args.feature < n:
        raise cli.UserError(f"--feature {args.feature} is out of range: the SAE has {n} latents (0..{n - 1}); pass a feature in that range")

    weights = {}
    for name, w in (("embedding_row", nfm.V.detach().cpu()), ("linear_weights", nfm.W_lin.detach().cpu())):
        g, er, z = gini(w), effective_rank(w), l0(w)
        weights[name] = {"gini": g, "effective_rank": er, "l0": z, "length": w.shape[1]}

    acts = get_activations(args, DataSpec.from_description(data_desc), width=sae.cfg.d, parent=data_desc, need_train=False)
    _, x_test = acts.normalized_halves(norm.encode)
    idx, val = encode_all(sae, x_test)
    shares = output_shares(nfm, idx, val)
    contrib = feature_contributions(nfm, idx, val, n, W_dec.to(device) if W_dec is not None else None)
    feature = args.feature if args.feature is not None else int(contrib["interaction"].argmax())
    typical = typical_values(idx, val, n)
    co = coactivation(idx, val, feature, n)
    others = torch.arange(n)
    effect = nfm.pair_effect(torch.full((n,), feature, device=device), others.to(device),
                             typical[feature].expand(n).to(device), typical.to(device)).cpu().double()
    effect[feature] = 0
    score = effect * co
    top_partners = score.topk(min(args.top, n)).indices.tolist()

    def ranked(t, top=args.top):
        return [{"feature": int(i), "value": float(t[i])} for i in t.topk(min(top, n)).indices]

    metrics = {
        "stage": "part4_nfm_inspector", "model": kind, "checkpoint": args.joint or args.nfm or "checkpoints/part2_nfm",
        "held_out_test": {"n_tokens": int(idx.shape[0]), **shares},
        "weights": {name: {"gini_mean": float(v["gini"].mean()), "effective_rank_mean": float(v["effective_rank"].mean()),
                           "l0_mean": float(v["l0"].float().mean()), "length": v["length"],
                           "highest_gini": [{"feature": int(i), "gini": float(v["gini"][i])}
                                            for i in v["gini"].topk(min(10, n)).indices],
                           "lowest_effective_rank": [{"feature": int(i), "effective_rank": float(v["effective_rank"][i])}
                                                     for i in (-v["effective_rank"]).topk(min(10, n)).indices]}
                    for name, v in weights.items()},
        "top_contributors": {"linear": ranked(contrib["linear"]), "interaction": ranked(contrib["interaction"]),
                             "overlap": top_overlap(contrib["linear"], contrib["interaction"], min(args.top, n))},
        "partners": {"feature": feature, "feature_activation_frequency": float(contrib["freq"][feature]),
                     "ranking": [{"feature": int(j), "score": float(score[j]), "pair_effect": float(effect[j]),
                                  "coactivation_frequency": float(co[j])} for j in top_partners]},
        "definitions": __doc__.split("Demo")[0].strip() + " Weighted score = pair effect x co-activation frequency.",
        "seconds": time.time() - t0,
    }
    cli.write_json(out / "metrics.json", metrics)
    pngs = [plots.histogram_grid({f"{name}: {stat}": v[stat].float().tolist() for name, v in weights.items()
                                  for stat in ("gini", "effective_rank")}, out / "weight_stats.png", "value", log10=False),
            plots.bar_panels({"top linear contributors": ranked(contrib["linear"]),
                              "top interaction contributors": ranked(contrib["interaction"]),
                              f"interaction partners of feature {feature}": [{"feature": int(j), "value": float(score[j])}
                                                                             for j in top_partners]},
                             out / "top_features.png")]
    h = metrics["held_out_test"]
    print(f"{kind} NFM: linear share of output magnitude {h['linear_share_of_output_magnitude[mean_ablation]']:.1%} "
          f"(energy {h['linear_share_of_output_energy[mean_ablation]']:.1%}; each path minus its training mean; "
          f"raw outputs: {h['linear_share_of_output_magnitude[zero_ablation]']:.1%}); top-{min(args.top, n)} contributor overlap "
          f"{metrics['top_contributors']['overlap']['shared']}; partners of feature {feature}: "
          + ", ".join(str(j) for j in top_partners[:5]))
    cli.report(out, out / "metrics.json", pngs)


if __name__ == "__main__":
    cli.run_main(main)
