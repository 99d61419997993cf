"""part2: fit a Neural Factorization Machine to what the SAE misses.

For each held-out token x (normalised with the SAE's saved map): f = the SAE's top-k code, x_hat = the SAE's
reconstruction, r = x - x_hat. The NFM reads f and predicts r: a linear path W_lin f + b and an
interaction path (bi-interaction pooling -> dropout -> MLP), see common/nfm.py. The SAE is frozen and used
at the K it was trained with.

Reported on held-out documents, as relative reduction of residual MSE (1 - ||r - r_hat||^2 / ||r||^2):
  - the trained NFM with both paths, the linear path alone and the interaction path alone: the other path
    mean-ablated (replaced by its mean output on training tokens, which is saved with the NFM and used by
    every later stage), and, as a labelled second figure, zero-ablated;
  - the control `--baseline residual_sae`: a secondary TopK SAE trained on r (r -> r_hat) with at least
    as many parameters as the NFM.

Demo (after part1):
    python part2_train_residual_nfm.py
Paper setup (NFM dimension 300 on the 50k-latent, K=1024 SAE; 5M tokens):
    python part2_train_residual_nfm.py --preset paper --sae checkpoints/paper/part1_sae --out checkpoints/paper/part2_nfm
Your own activations (no model; must be the same layer/width the SAE was trained on):
    python part2_train_residual_nfm.py --sae checkpoints/mine/part1_sae --activations acts.safetensors --out checkpoints/mine/part2_nfm
Several GPUs (DDP; --batch-size is the global batch):
    torchrun --standalone --nproc_per_node=4 part2_train_residual_nfm.py --preset paper --sae checkpoints/paper/part1_sae --out checkpoints/paper/part2_nfm

Writes to --out: model.safetensors + config.json (NFM; records the SAE's content hash), metrics.json,
training_curves.png, residual_reduction.png, and residual_sae/ (the control's checkpoint).
"""
from __future__ import annotations

import math
import time


from common import checkpoint, cli, dist, plots
from common.data import DataSpec, get_activations, split_selection_test
from common.metrics import recon_stats, residual_reduction
from common.nfm import PATHS, NFM, NFMConfig, combine_paths, predict, train_nfm
from common.loading import load_sae_checkpoint
from common.sae import (SAEConfig, TopKSAE, codes_and_residuals, default_dead_tokens, default_lr,
                        reconstruct_all, train_sae)
from common.train import TrainCheckpoints, module_device


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/part2_nfm")
    p.add_argument("--sae", default="checkpoints/part1_sae", help="part1 output folder (default: checkpoints/part1_sae)")
    cli.add_data_args(p, with_model_source=False)
    g = p.add_argument_group("NFM")
    g.add_argument("--nfm-dim", type=int, default=64, help="embedding dimension of the factorization (default: 64)")
    g.add_argument("--nfm-hidden", type=int, default=None, help="interaction MLP hidden width (default: --nfm-dim)")
    g.add_argument("--dropout", type=float, default=0.15, help="dropout on the bi-interaction vector (default: 0.15)")
    cli.add_training_args(p, 1e-3, "1e-3 for the NFM; the residual SAE control uses part1's default recipe")
    b = p.add_argument_group("control")
    b.add_argument("--baseline", choices=["residual_sae", "none"], default="residual_sae",
                   help="also train a secondary TopK SAE on the residual with >= the NFM's parameter count "
                        "(default: residual_sae)")
    b.add_argument("--baseline-k", type=int, default=None, help="TopK of the residual SAE (default: the SAE's k)")
    cli.add_resume_args(p)
    return p


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="part2")
    dist.init(args)
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    ckpt = TrainCheckpoints(out, args)
    t0 = time.time()

    sae, norm, sae_cfg = load_sae_checkpoint(args.sae)
    d = sae.cfg.d
    acts = dist.main_first(lambda: get_activations(args, DataSpec.from_description(sae_cfg["data"]),
                                                   parent=sae_cfg["data"], width=d))
    # [n, k] codes and [n, d] residuals, everything in the SAE's normalised space
    train = codes_and_residuals(sae, norm.encode(acts.train))
    idx_v, val_v, r_v = codes_and_residuals(sae, norm.encode(acts.val))
    sel, test = split_selection_test(idx_v, acts.val_docs, val_v, r_v)   # (idx, val, r) each
    x_test = split_selection_test(norm.encode(acts.val), acts.val_docs)[1][0]

    cfg = NFMConfig(n_features=sae.cfg.n_latents, d=d, dim=args.nfm_dim, hidden=args.nfm_hidden or args.nfm_dim,
                    dropout=args.dropout)
    device = cli.env_device(args.device)
    sae.to(device)
    nfm = NFM(cfg).to(device)
    steps = cli.total_steps(args, train[0].shape[0])
    print(f"NFM on the residual of {args.sae}: dim={cfg.dim} hidden={cfg.hidden}, {nfm.param_counts()['total']:,} "
          f"parameters, {steps} steps of {args.batch_size} tokens")
    fitres = train_nfm(nfm, *train, sel, steps, args.batch_size, args.lr, cli.eval_every(args, steps), args.seed, ckpt=ckpt)

    r_test = test[2]
    nfm.set_path_means(train[0], train[1])              # saved with the NFM: every later stage mean-ablates with it
    reduction = path_ablations(nfm, test[0], test[1], r_test)
    sae_test = recon_stats(sae, x_test)
    x_hat_test = x_test - r_test
    metrics = {
        "stage": "part2_train_residual_nfm",
        "held_out_test": {
            "n_tokens": int(r_test.shape[0]),
            "residual_mse_zero_prediction": float(r_test.pow(2).mean()),
            "residual_reduction": reduction["residual_reduction"],
            "sae_fvu": sae_test["fvu"],
            "sae_plus_nfm_fvu": float((x_test - x_hat_test - reduction["prediction"]).pow(2).sum()
                                      / (x_test - x_test.mean(0)).pow(2).sum()),
            "magnitude": reduction["magnitude"],
        },
        "definitions": "residual_reduction = 1 - sum||r - r_hat||^2 / sum||r||^2 on held-out documents not used "
                       "for training or model selection. '<path>_only[mean_ablation]': the other path replaced by its "
                       "mean output on training tokens (the headline ablation: the paths carry constant offsets "
                       "that cancel); '[zero_ablation]': the other path deleted (measures the constant too). "
                       "magnitude[mean_ablation] = mean |path - its training mean|, what the path says about the "
                       "token; magnitude[zero_ablation] = mean |path| (as the original study)",
        "params": nfm.param_counts(),
        "train": {"steps": steps, "best_step": fitres.best_step, "lr": args.lr, "batch_size": args.batch_size,
                  "train_tokens": int(train[0].shape[0]), "path_mean_tokens": int(nfm.mean_tokens),
                  **cli.resume_record(args)},
        "data": acts.description,
        "history": fitres.history,
    }
    sae_ref = checkpoint.parent_ref(sae_cfg)
    if dist.is_main():
        checkpoint.save(out, "nfm", nfm.state_dict(), {
            "hparams": nfm.hparams(), "data": acts.description, "train": metrics["train"], "seed": args.seed,
            "parents": {"sae": sae_ref}})

    rr = reduction["residual_reduction"]
    labels = ["NFM both", "linear only\n[mean_ablation]", "interaction only\n[mean_ablation]"]
    values = [rr["both"], rr["linear_only[mean_ablation]"], rr["interaction_only[mean_ablation]"]]
    if args.baseline == "residual_sae":
        metrics["baseline_residual_sae"] = residual_sae_control(args, nfm, sae, train[2], sel[2], r_test, out, sae_ref,
                                                                acts.description, ckpt)
        labels.append("residual SAE")
        values.append(metrics["baseline_residual_sae"]["residual_reduction"])
    if not dist.is_main():
        return                  # under torchrun, rank 0 writes the results
    metrics["seconds"] = time.time() - t0
    cli.write_json(out / "metrics.json", metrics)
    pngs = [plots.training_curves(fitres.history, ["loss"], out / "training_curves.png",
                                  f"NFM on the SAE residual (dim {cfg.dim})", fitres.best_step),
            plots.bars(labels, values, out / "residual_reduction.png",
                       f"held-out residual reduction ({r_test.shape[0]} tokens; '[mean_ablation]': the other path "
                       f"replaced by its training mean)",
                       "1 - MSE(r - r_hat) / MSE(r)")]
    print("held-out residual reduction: " + "  ".join(f"{l.replace(chr(10), ' ')}: {v:.4f}" for l, v in zip(labels, values)))
    ckpt.finish()
    cli.report(out, out / "metrics.json", pngs)


def path_ablations(nfm, idx, val, r) -> dict:
    """Residual reduction of the whole NFM and of each path alone, the other path mean-ablated (headline) or
    zero-ablated (labelled second figure), and each path's output magnitude both ways, on held-out codes."""
    lin, inter = predict(nfm, idx, val, ("linear",)), predict(nfm, idx, val, ("interaction",))
    out = {"linear": lin, "interaction": inter}
    reduction = {"both": residual_reduction(r, lin + inter)}
    magnitude = {}
    for path in PATHS:
        for how in ("mean", "zero"):
            reduction[f"{path}_only[{how}_ablation]"] = residual_reduction(r, combine_paths(out, (path,), nfm, how))
            centre = nfm.path_mean(path) if how == "mean" else 0
            magnitude[f"{path}[{how}_ablation]"] = float((out[path] - centre).abs().mean())
    return {"residual_reduction": reduction, "magnitude": magnitude, "prediction": lin + inter}


def residual_sae_control(args, nfm, sae, r_train, r_sel, r_test, out, sae_ref, data_desc, ckpt) -> dict:
    """A TopK SAE trained on the residual itself, with at least the NFM's parameter count."""
    d, n_params = sae.cfg.d, nfm.param_counts()["total"]
    n_latents = math.ceil((n_params - d) / (2 * d + 1))   # 2*n*d weights + n + d biases >= NFM parameters
    k = min(args.baseline_k or sae.cfg.k, n_latents)
    steps = cli.total_steps(args, r_train.shape[0])
    ctl = TopKSAE(SAEConfig(d=d, n_latents=n_latents, k=k, dead_tokens=default_dead_tokens(steps, args.batch_size)))
    ctl.to(module_device(nfm))
    fitres = train_sae(ctl, r_train, r_sel, steps, args.batch_size, default_lr(n_latents),
                       cli.eval_every(args, steps), args.seed, "train residual SAE (control)", ckpt=ckpt,
                       tag="residual_sae")
    r_hat = reconstruct_all(ctl, r_test)
    n_ctl = sum(p.numel() for p in ctl.parameters())
    if dist.is_main():
        checkpoint.save(out / "residual_sae", "residual_sae", ctl.tensors(), {
            "hparams": ctl.hparams(), "data": data_desc, "seed": args.seed, "parents": {"sae": sae_ref},
            "train": {"steps": steps, "best_step": fitres.best_step}})
    return {"residual_reduction": residual_reduction(r_test, r_hat), "params": n_ctl, "nfm_params": n_params,
            "n_latents": n_latents, "k": k, "steps": steps, "best_step": fitres.best_step,
            "checkpoint": str(out / "residual_sae")}


if __name__ == "__main__":
    cli.run_main(main)
