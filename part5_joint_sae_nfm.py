"""part5: joint SAE + NFM: one TopK encoder feeding the SAE decoder, the NFM linear path and the NFM
interaction path, trained together on FVU to x (+ AuxK). See common/joint.py.

Reported on held-out documents (FVU in the LM's units; a removed NFM path is mean-ablated, i.e. replaced by its
mean output on training tokens (saved with the model), and, as a labelled second figure, zero-ablated as the
study did; the paths carry constant offsets that cancel, so zero-ablation measures the constant too):
  - the joint model's SAE path alone, SAE + linear, SAE + interaction, and all three;
  - a standalone TopK SAE with the same parameter count (a wider dictionary) and the same token budget,
    trained here or given with --baseline-sae; the joint model is reported against it *and* against its
    own SAE path (the reference's "41.3%" used only the latter);
  - optionally the part1 SAE (--sae) on the same held-out tokens.

--decoder poly trains a PolySAE instead (common/poly.py; Koromilas et al. 2026): the same TopK encoder and
linear dictionary W_dec f + b_dec, plus a low-rank pairwise + triple interaction decoder of the code on a
projection shared by both orders, in place of the NFM's two paths; same data, steps and recipe, its rank chosen
so that its parameter count matches the joint NFM model that the same flags (--n-latents, --k, --nfm-dim,
--nfm-hidden) build. Reported: the linear dictionary alone (interaction path mean-ablated, and zero-ablated)
and the full model, against the same equal-parameter standalone SAE.

Demo (after part1):
    python part5_joint_sae_nfm.py --sae checkpoints/part1_sae
Paper setup (50k latents, K=1024, NFM dim 300; 5M tokens):
    python part5_joint_sae_nfm.py --preset paper --out checkpoints/paper/part5_joint
PolySAE decoder instead of the NFM:
    python part5_joint_sae_nfm.py --decoder poly --sae checkpoints/part1_sae --out checkpoints/part5_poly
Your own activations:
    python part5_joint_sae_nfm.py --activations acts.safetensors --out checkpoints/mine/part5_joint
Several GPUs (DDP; --batch-size is the global batch):
    torchrun --standalone --nproc_per_node=4 part5_joint_sae_nfm.py --preset paper --out checkpoints/paper/part5_joint

Writes to --out: model.safetensors + config.json (kind "joint"), baseline_sae/ (a part1-style SAE
checkpoint), metrics.json, training_curves.png, fvu_by_variant.png.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from common import checkpoint, cli, dist, plots, recipe
from common.controls import per_document, row_errors
from common.data import DataSpec, get_activations, split_selection_test
from common.joint import VARIANTS, JointModel, path_outputs
from common.metrics import ReconAccumulator, recon_stats
from common.loading import load_sae_checkpoint
from common.nfm import NFMConfig, combine_paths
from common.poly import VARIANTS as POLY_VARIANTS, PolyConfig, PolyJointModel, joint_nfm_param_count, matched_ranks
from common.normalize import MODES, Normalizer
from common.stats import ratio_of_sums_ci
from common.sae import (SAEConfig, TopKSAE, batch_codes, default_dead_tokens, default_lr, reconstruct_all, recipe_options,
                        train_sae)
from common.train import TrainCheckpoints, fit


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/part5_joint")
    cli.add_data_args(p)
    g = p.add_argument_group("joint model")
    g.add_argument("--decoder", choices=["nfm", "poly"], default="nfm",
                   help="what the shared code feeds besides the SAE decoder: the NFM's linear + interaction paths, or "
                        "a PolySAE pairwise + triple decoder of the joint NFM model's parameter count (default: nfm)")
    g.add_argument("--n-latents", type=int, default=2048, help="dictionary size of the shared encoder (default: 2048)")
    g.add_argument("--k", type=int, default=32, help="active latents per token (default: 32)")
    g.add_argument("--nfm-dim", type=int, default=64, help="NFM embedding dimension (default: 64)")
    g.add_argument("--nfm-hidden", type=int, default=None, help="interaction MLP hidden width (default: --nfm-dim)")
    g.add_argument("--dropout", type=float, default=0.15, help="dropout on the bi-interaction vector (default: 0.15)")
    g.add_argument("--normalize", choices=MODES, default="scalar", help="activation normalisation (default: scalar)")
    g.add_argument("--auxk-alpha", type=float, default=1 / 32, help="AuxK coefficient (default: 1/32)")
    cli.add_training_args(p, None, "2e-4 / sqrt(n_latents / 2^14), Adam for the joint model and the baseline alike")
    b = p.add_argument_group("comparisons")
    b.add_argument("--baseline-sae", default=None, metavar="DIR",
                   help="a trained standalone SAE to compare against instead of training the parameter-matched one")
    b.add_argument("--sae", default=None, metavar="DIR", help="also report this part1 SAE on the same held-out tokens")
    b.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over documents (default: 1000)")
    cli.add_recipe_args(p, parent=False)
    cli.add_defect_args(p, "part5")
    cli.add_resume_args(p)
    return p


POLY_DESCRIPTION = ("poly: TopK encoder + linear dictionary W_dec f + b_dec + PolySAE interaction path lambda2 (fU[:, :R2])^2 "
                    "C2^T + lambda3 (fU[:, :R3])^3 C3^T (Koromilas et al. 2026, github.com/pakoromilas/PolySAE "
                    "sae_lens/saes/polysae.py, shared-U mode; common/poly.py); '[mean_ablation]' of 'sae' replaces "
                    "the interaction path by its training mean")


def build_poly(sae_cfg: SAEConfig, nfm_cfg: NFMConfig):
    """The PolySAE joint model whose parameter count is nearest the joint NFM model's for the same flags
    (ranks R2 >= R3), and the record of that matching."""
    n, d = sae_cfg.n_latents, sae_cfg.d
    target = joint_nfm_param_count(n, d, nfm_cfg.dim, nfm_cfg.hidden)
    r2, r3 = matched_ranks(n, d, target)
    model = PolyJointModel(sae_cfg, PolyConfig(n_features=n, d=d, rank2=r2, rank3=r3))
    total = model.param_counts()["total"]
    return model, {"rank2": r2, "rank3": r3, "joint_nfm_total": target,
                   "relative_difference_to_joint_nfm": total / target - 1}


def optimizer_of(args) -> str:
    """The joint model's and its baseline's optimizer: Adam, or under --recipe reference the reference's Adam."""
    return "adam-reference" if args.recipe == "reference" else "adam"


def fvu_raw(norm: Normalizer, x_norm, x_hat_norm) -> float:
    acc = ReconAccumulator(x_norm.shape[1])
    acc.add(norm.decode(x_norm), norm.decode(x_hat_norm))
    return acc.result()["fvu"]


def raw_errors(norm: Normalizer, x_norm, x_hat_norm) -> torch.Tensor:
    """Squared error per row [n] in the LM's units (float64): what a bootstrap over documents resamples."""
    return row_errors(norm.decode(x_norm), norm.decode(x_hat_norm))


def relative_reduction(err: torch.Tensor, err_other: torch.Tensor, docs, n_boot: int, seed: int) -> tuple[float, list]:
    """1 - FVU(model) / FVU(other) on the same rows (the total variance cancels) = 1 - sum err / sum err_other,
    with a 95% bootstrap CI over documents (over rows when there are no document ids)."""
    ratio, lo, hi = ratio_of_sums_ci(per_document(err, docs), per_document(err_other, docs), n_boot, seed)
    return 1 - ratio, [1 - hi, 1 - lo]


def train_joint(args, out: Path, ckpt, x_train, x_sel, x_test, norm, device, steps: int) -> dict:
    """Train the joint model, report it on the held-out test half and write its weights (its config.json, which
    marks the folder complete, is written at the end of main). Returns what main reports; the model itself is
    gone when this returns, so the parameter-matched baseline trains without it in memory (2 GB at the preset)."""
    d = x_sel.shape[1]
    reference = args.recipe == "reference"
    sae_cfg = SAEConfig(d=d, n_latents=args.n_latents, k=args.k, auxk_alpha=args.auxk_alpha,
                        dead_tokens=default_dead_tokens(steps, args.batch_size), **recipe_options(args.recipe))
    # the reference: its NFM inits, and both NFM paths read the code's top TOP_N values (512 at K 1,024)
    nfm_cfg = NFMConfig(n_features=args.n_latents, d=d, dim=args.nfm_dim, hidden=args.nfm_hidden or args.nfm_dim,
                        dropout=args.dropout, init="reference" if reference else "default",
                        top_n=recipe.top_n(args.k) if reference else None)
    poly = args.decoder == "poly"
    if poly:
        model, poly_match = build_poly(sae_cfg, nfm_cfg)
        model = model.to(device)
    else:
        model = JointModel(sae_cfg, nfm_cfg).to(device)
    params = model.param_counts()
    optimizer = optimizer_of(args)
    lr = args.lr or default_lr(args.n_latents, optimizer)
    if poly:
        params = {**params, **poly_match}
        print(f"joint SAE+PolySAE d={d} n_latents={args.n_latents} k={args.k} ranks R2={poly_match['rank2']} "
              f"R3={poly_match['rank3']}: "
              f"{params['total']:,} parameters (the joint NFM model of these flags: "
              f"{poly_match['joint_nfm_total']:,}), {steps} steps of {args.batch_size} tokens, lr {lr:.2e}")
    else:
        print(f"joint SAE+NFM d={d} n_latents={args.n_latents} k={args.k} nfm_dim={args.nfm_dim}: "
              f"{params['total']:,} parameters, {steps} steps of {args.batch_size} tokens, lr {lr:.2e}, recipe "
              f"{args.recipe}" + (f" (NFM paths read the top {nfm_cfg.top_n} of the code)" if nfm_cfg.top_n else ""))
    model.sae.init_b_dec(x_train.gather(torch.arange(min(args.batch_size, x_train.n))).to(device).float())
    # squared norm of each feature's effective linear decoder W_dec[i] + W_lin[i] at init, kept for part7
    # (PolySAE: W_dec[i], its only linear decoder)
    init_sq_norm = (model.sae.W_dec if poly else model.sae.W_dec + model.nfm.W_lin).detach().pow(2).sum(1).cpu()
    paths_kept = model.PATHS

    def step_loss(idx):
        return model.loss(x_train.gather(idx).to(device, non_blocking=True).float())

    def evaluate():
        o = path_outputs(model, x_sel)
        f = fvu_raw(norm, x_sel, sum(o[p] for p in paths_kept))
        return {"val_loss": f, "val_fvu": f}

    fitres = fit(model, x_train.n, args.batch_size, steps, lr, step_loss, evaluate, cli.eval_every(args, steps),
                 args.seed, "train joint SAE+PolySAE" if poly else "train joint SAE+NFM",
                 before_step=model.sae.remove_parallel_grad,
                 after_step=model.after_step if poly else model.sae.renorm_decoder, ckpt=ckpt, tag="joint",
                 shuffle=x_train.shuffle, optimizer=optimizer, keep_latest="latest-as-best" in args.defects)
    x_train.release()

    # held-out report: every variant; a removed NFM path is mean-ablated (its training mean, saved with the
    # model), and zero-ablated as a labelled second figure
    inter = model.interaction_model                     # the NFM, or the PolySAE's interaction decoder
    inter.set_path_means(x_train.map(lambda x: batch_codes(model.sae, x)))   # at most 2^18 evenly spaced rows
    o = path_outputs(model, x_test)
    fvu, errors = {}, {}
    for name, paths in (POLY_VARIANTS if poly else VARIANTS).items():
        for how in ("mean", "zero"):
            key = name if name == "full" else f"{name}[{how}_ablation]"
            x_hat = combine_paths(o, paths, inter, how)
            fvu[key] = fvu_raw(norm, x_test, x_hat)
            if key in ("full", "sae[mean_ablation]", "sae[zero_ablation]"):
                errors[key] = raw_errors(norm, x_test, x_hat)   # [n_test]: the comparisons' bootstrap
    code_stats = recon_stats(model.sae, x_test)          # L0 / dead of the shared code (its FVU is the SAE path's)
    report = {"fvu": fvu, "l0": code_stats["l0"], "dead_fraction": code_stats["dead_fraction"],
              "n_tokens": int(x_test.shape[0])}
    train_record = {"steps": steps, "best_step": fitres.best_step, "lr": lr, "batch_size": args.batch_size,
                    "optimizer": optimizer,
                    "train_tokens": int(x_train.n), **cli.resume_record(args)}
    hparams = model.hparams()
    # the joint model's weights now, its config.json (which marks the folder complete) at the end: the
    # parameter-matched baseline below then trains without the joint model in memory (2 GB at the preset)
    digest = checkpoint.save_weights(out, {**model.state_dict(), **norm.tensors(), "init.sq_norm": init_sq_norm}) \
        if dist.is_main() else None
    return {"poly": poly, "params": params, "lr": lr, "fitres": fitres, "fvu": fvu, "errors": errors, "report": report,
            "train_record": train_record, "hparams": hparams, "digest": digest}


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="part5")
    dist.init(args)
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    ckpt = TrainCheckpoints(out, args)
    t0 = time.time()
    device = cli.env_device(args.device)

    spec = None if args.activations else DataSpec.from_args(args)
    acts = dist.main_first(lambda: get_activations(args, spec))
    d = acts.train.d
    norm = Normalizer.fit(acts.train, args.normalize)
    x_train = acts.train.map(norm.encode)               # [n_train, d], read and normalised per batch (common/rows.py)
    # the test half's document of each row: the comparisons' bootstrap units (rows under --defects token-split)
    test_docs = None if acts.val_docs is None else split_selection_test(acts.val_docs, acts.val_docs)[1][0]
    x_sel, x_test = acts.normalized_halves(norm.encode)  # held-out halves, normalised (the raw rows released)

    steps = cli.total_steps(args, x_train.n)
    j = train_joint(args, out, ckpt, x_train, x_sel, x_test, norm, device, steps)
    poly, params, fitres, fvu, report = j["poly"], j["params"], j["fitres"], j["fvu"], j["report"]

    # the standalone comparison: same parameter count (wider dictionary), same tokens and steps
    if args.baseline_sae:
        base, base_norm, base_cfg = load_sae_checkpoint(args.baseline_sae, "--baseline-sae")
        if base.cfg.d != d:
            raise cli.UserError(f"--baseline-sae {args.baseline_sae} has d={base.cfg.d}, but these activations have d={d}")
        base_path = args.baseline_sae
    else:
        n_b = math.ceil((params["total"] - d) / (2 * d + 1))
        base = TopKSAE(SAEConfig(d=d, n_latents=n_b, k=args.k, auxk_alpha=args.auxk_alpha,
                                 dead_tokens=default_dead_tokens(steps, args.batch_size),
                                 **recipe_options(args.recipe))).to(device)
        base_norm = norm
        print(f"standalone TopK SAE with the joint model's parameter budget: n_latents={n_b}")
        base_init_sq = base.W_dec.detach().pow(2).sum(1).cpu()
        # the same optimizer (Adam) and schedule as the joint model, so the comparison is about the model
        bres = train_sae(base, x_train, x_sel, steps, args.batch_size, args.lr or default_lr(n_b, optimizer_of(args)),
                         cli.eval_every(args, steps), args.seed, "train parameter-matched SAE",
                         optimizer=optimizer_of(args), ckpt=ckpt, tag="baseline_sae", keep_latest="latest-as-best" in args.defects)
        base_path = str(out / "baseline_sae")
        if dist.is_main():
            checkpoint.save(out / "baseline_sae", "sae", {**base.tensors(), **norm.tensors(), "init.sq_norm": base_init_sq}, {
                "hparams": base.hparams(), "normalize": args.normalize, "data": acts.description, "seed": args.seed,
                "parents": {}, "train": {"steps": steps, "best_step": bres.best_step, "role": "part5 parameter-matched baseline"},
                "recipe": recipe.describe(args.recipe)})
    if not dist.is_main():
        return                  # under torchrun, rank 0 evaluates and writes the results
    x_test_raw = norm.decode(x_test)
    x_base = base_norm.encode(x_test_raw)
    x_hat_base = reconstruct_all(base, x_base)
    base_fvu = fvu_raw(base_norm, x_base, x_hat_base)
    err = j["errors"]
    rel = {"standalone": relative_reduction(err["full"], raw_errors(base_norm, x_base, x_hat_base), test_docs,
                                            args.n_boot, args.seed),
           "own": relative_reduction(err["full"], err["sae[mean_ablation]"], test_docs, args.n_boot, args.seed),
           "own_zero": relative_reduction(err["full"], err["sae[zero_ablation]"], test_docs, args.n_boot, args.seed)}
    del x_base, x_hat_base
    base_params = sum(p.numel() for p in base.parameters())
    comparisons = {"standalone_sae": {"path": base_path, "params": base_params, "fvu": base_fvu,
                                      "n_latents": base.cfg.n_latents, "k": base.cfg.k},
                   "joint_vs_standalone_relative_fvu_reduction": rel["standalone"][0],
                   "joint_vs_standalone_relative_fvu_reduction_ci": rel["standalone"][1],
                   "joint_vs_own_sae_path_relative_fvu_reduction": rel["own"][0],
                   "joint_vs_own_sae_path_relative_fvu_reduction_ci": rel["own"][1],
                   "joint_vs_own_sae_path_relative_fvu_reduction[zero_ablation]": rel["own_zero"][0],
                   "joint_vs_own_sae_path_relative_fvu_reduction[zero_ablation]_ci": rel["own_zero"][1],
                   "n_bootstrap_units": int(torch.unique(test_docs).numel()) if test_docs is not None else int(x_test.shape[0])}
    if args.sae:
        s1, n1, _ = load_sae_checkpoint(args.sae)
        comparisons["part1_sae"] = {"path": args.sae, "params": sum(p.numel() for p in s1.parameters()),
                                    "fvu": fvu_raw(n1, n1.encode(x_test_raw), reconstruct_all(s1, n1.encode(x_test_raw)))}

    metrics = {"stage": "part5_joint_sae_nfm", **({"decoder": POLY_DESCRIPTION} if poly else {}),
               "held_out_test": report, "comparisons": comparisons, "params": params,
               "definitions": "FVU in the LM's units on held-out documents not used for training or model selection; "
                              "'[mean_ablation]' replaces each removed NFM path by its mean output on training tokens "
                              "(the headline: the paths carry constant offsets that cancel), '[zero_ablation]' deletes "
                              "it; relative FVU reduction = 1 - FVU(joint, all paths) / FVU(other), with a 95% "
                              "bootstrap CI over held-out documents (_ci); the 'own SAE path' comparison (the "
                              "reference's 41%) uses the mean-ablated SAE path",
               "train": {**j["train_record"], "seconds": time.time() - t0},
               "data": acts.description, "history": fitres.history, "recipe": recipe.describe(args.recipe),
               "reference_defects": recipe.defects_record(args.defects)}
    checkpoint.save_config(out, "joint", {"hparams": j["hparams"], "normalize": args.normalize, "data": acts.description,
                                          "seed": args.seed, "parents": {}, "train": j["train_record"],
                                          "recipe": recipe.describe(args.recipe)}, j["digest"])
    cli.write_json(out / "metrics.json", metrics)
    if poly:
        labels = ["PolySAE: linear dictionary\n[mean_ablation]", "PolySAE: full", "standalone SAE\n(same params)"]
        values = [fvu["sae[mean_ablation]"], fvu["full"], base_fvu]
    else:
        labels = ["joint: SAE path\n[mean_ablation]", "SAE+linear\n[mean_ablation]", "SAE+interaction\n[mean_ablation]",
                  "joint: all", "standalone SAE\n(same params)"]
        values = [fvu["sae[mean_ablation]"], fvu["sae+linear[mean_ablation]"], fvu["sae+interaction[mean_ablation]"],
                  fvu["full"], base_fvu]
    if args.sae:
        labels.append("part1 SAE")
        values.append(comparisons["part1_sae"]["fvu"])
    pngs = [plots.training_curves(fitres.history, ["fvu"], out / "training_curves.png",
                                  "joint SAE+PolySAE" if poly else "joint SAE+NFM", fitres.best_step),
            plots.bars(labels, values, out / "fvu_by_variant.png",
                       f"held-out FVU ({x_test.shape[0]} tokens; removed "
                       f"{'interaction path' if poly else 'NFM paths'} mean-ablated)", "FVU")]
    print("held-out FVU: " + "  ".join(f"{l.replace(chr(10), ' ')}: {v:.4f}" for l, v in zip(labels, values)))
    print(f"joint (all paths) vs standalone SAE of equal parameters: "
          f"{comparisons['joint_vs_standalone_relative_fvu_reduction']:+.1%}; vs its own SAE path: "
          f"{comparisons['joint_vs_own_sae_path_relative_fvu_reduction']:+.1%}")
    ckpt.finish()
    cli.report(out, out / "metrics.json", pngs)


if __name__ == "__main__":
    cli.run_main(main)
