"""part2: fit a Neural Factorization Machine to what the SAE misses.

For each held-out token x (normalised with the SAE's saved map): f = the SAE's top-k code, x_hat = the SAE's
reconstruction, r = x - x_hat. The NFM reads f and predicts r: a linear path W_lin f + b and an
interaction path (bi-interaction pooling -> dropout -> MLP), see common/nfm.py. The SAE is frozen and used
at the K it was trained with.

Reported on held-out test documents (never used for training or model selection), as relative reduction of
residual MSE (1 - ||r - r_hat||^2 / ||r||^2), each with a 95% bootstrap CI over documents:
  - the trained NFM with both paths, the linear path alone and the interaction path alone: the other path
    mean-ablated (replaced by its mean output on training tokens, which is saved with the NFM and used by
    every later stage), and, as a labelled second figure, zero-ablated;
  - the control ladder (`--controls`, common/controls.py), each trained on the same tokens for the same steps:
      linear_from_x  ridge from x to r (closed form)            mlp_on_code  a generic MLP on the code, the NFM's size
      mlp_from_x     an MLP on x, the NFM's size                 residual_sae a TopK SAE on r, >= the NFM's size
  - integration evidence: the NFM's reduction minus the best control that reads the same input (the code),
    with a paired bootstrap CI; the claim that the NFM finds pairwise structure rests on it.

Demo (after part1):
    python part2_train_residual_nfm.py
Paper setup (NFM dimension 300 on the 50k-latent, K=1024 SAE; 5M tokens):
    python part2_train_residual_nfm.py --preset paper --sae checkpoints/paper/part1_sae --out checkpoints/paper/part2_nfm
The original study's recipe (common/recipe.py: its NFM inits, Adam 1e-4 eps 1e-5, clip 1.0, LinearLR, batch 130),
on a part1 --recipe reference SAE:
    python part2_train_residual_nfm.py --recipe reference --sae checkpoints/reference/part1_sae --out checkpoints/reference/part2_nfm
Your own activations (no model; must be the same layer/width the SAE was trained on):
    python part2_train_residual_nfm.py --sae checkpoints/mine/part1_sae --activations acts.safetensors --out checkpoints/mine/part2_nfm
Several GPUs (DDP; --batch-size is the global batch):
    torchrun --standalone --nproc_per_node=4 part2_train_residual_nfm.py --preset paper --sae checkpoints/paper/part1_sae --out checkpoints/paper/part2_nfm

Writes to --out: model.safetensors + config.json (NFM; records the SAE's content hash), metrics.json,
training_curves.png, residual_reduction.png, controls/<name>/ (each trained control) and residual_sae/.
"""
from __future__ import annotations

import math
import time

import torch

from common import checkpoint, cli, controls, dist, plots, recipe
from common.data import DataSpec, get_activations, split_selection_test
from common.metrics import recon_stats, residual_reduction
from common.nfm import PATHS, NFM, NFMConfig, combine_paths, predict, train_nfm
from common.loading import load_sae_checkpoint
from common.sae import (SAEConfig, TopKSAE, batch_codes, codes_and_residuals, default_dead_tokens, default_lr,
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
    cli.add_precompute_arg(p)
    b = p.add_argument_group("controls")
    b.add_argument("--controls", default="all",
                   help="comma-separated controls to train beside the NFM, or 'all' / 'none': linear_from_x, "
                        "mlp_on_code, mlp_from_x, residual_sae (default: all; see common/controls.py)")
    b.add_argument("--baseline-k", type=int, default=None, help="TopK of the residual SAE (default: the SAE's k)")
    b.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over documents (default: 1000)")
    cli.add_recipe_args(p)
    cli.add_defect_args(p, "part2")
    cli.add_resume_args(p)
    return p


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="part2")
    control_names = controls.parse_controls(args.controls)
    dist.init(args)
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    ckpt = TrainCheckpoints(out, args)
    t0 = time.time()
    timing = {}

    sae, norm, sae_cfg = load_sae_checkpoint(args.sae)
    recipe.check_parent(args.recipe, sae_cfg, "--sae", args.allow_recipe_mix)
    optimizer = "adam-reference" if args.recipe == "reference" else "adam"     # the NFM's and its controls'
    d = sae.cfg.d
    acts = dist.main_first(lambda: get_activations(args, DataSpec.from_description(sae_cfg["data"]),
                                                   parent=sae_cfg["data"], width=d))
    # everything in the SAE's normalised space: x [n, d], codes (idx, val) [n, k], residuals r [n, d]. Training
    # rows are read and coded per batch on the device (common/rows.py): nothing of size [train tokens, ...] is held
    device = cli.env_device(args.device)
    sae.to(device)
    train = acts.train.map(lambda raw: _coded(sae, norm.encode(raw.to(device, non_blocking=True))))    # gather -> (idx, val, r, x)
    train = train.materialized(args.precompute_mb)      # small sets: coded once (--precompute-mb)
    # held-out: halved first, then coded half by half, the whole set dropped (at the preset's 100k tokens every
    # [n_val, d] copy is 1.3 GB)
    (raw_sel, _), (raw_test, test_docs) = split_selection_test(acts.val, acts.val_docs,
                                                             acts.val_docs if acts.val_docs is not None else
                                                             torch.arange(acts.val.shape[0]))
    test_docs = test_docs if acts.val_docs is not None else None        # bootstrap units: documents (else rows)
    acts.val = None
    x_sel, x_test = norm.encode(raw_sel), norm.encode(raw_test)
    del raw_sel, raw_test
    sel, test = codes_and_residuals(sae, x_sel), codes_and_residuals(sae, x_test)   # (idx, val, r) the NFM reads

    cfg = NFMConfig(n_features=sae.cfg.n_latents, d=d, dim=args.nfm_dim, hidden=args.nfm_hidden or args.nfm_dim,
                    dropout=args.dropout, init="reference" if args.recipe == "reference" else "default")
    nfm = NFM(cfg).to(device)
    steps = cli.total_steps(args, train.n)
    print(f"NFM on the residual of {args.sae}: dim={cfg.dim} hidden={cfg.hidden}, {nfm.param_counts()['total']:,} "
          f"parameters, {steps} steps of {args.batch_size} tokens, recipe {args.recipe}")
    t_nfm = time.time()
    fitres = train_nfm(nfm, train, sel, steps, args.batch_size, args.lr, cli.eval_every(args, steps), args.seed, ckpt=ckpt,
                       optimizer=optimizer, keep_latest="latest-as-best" in args.defects)
    timing["nfm_train_seconds"] = time.time() - t_nfm

    r_test = test[2]
    nfm.set_path_means(train)                           # saved with the NFM: every later stage mean-ablates with it
    reduction = path_ablations(nfm, test[0], test[1], r_test)
    sae_test = recon_stats(sae, x_test)
    x_hat_test = x_test - r_test
    metrics = {
        "stage": "part2_train_residual_nfm",
        "held_out_test": {
            "n_tokens": int(r_test.shape[0]),
            "n_documents": int(torch.unique(test_docs).numel()) if test_docs is not None else None,
            "residual_mse_zero_prediction": float(r_test.pow(2).mean()),
            "residual_reduction": reduction["residual_reduction"],
            "residual_reduction_ci": {k: controls.reduction_ci(r_test, p, test_docs, args.n_boot, args.seed)["ci"]
                                      for k, p in reduction["headline_predictions"].items()},
            "sae_fvu": sae_test["fvu"],
            "sae_plus_nfm_fvu": float((x_test - x_hat_test - reduction["prediction"]).pow(2).sum()
                                      / (x_test - x_test.mean(0)).pow(2).sum()),
            "magnitude": reduction["magnitude"],
        },
        "definitions": "residual_reduction = 1 - sum||r - r_hat||^2 / sum||r||^2 on held-out test documents not used "
                       "for training or model selection; CIs: 95% percentile bootstrap over documents (over rows when "
                       "the activations carry no document ids). '<path>_only[mean_ablation]': the other path replaced "
                       "by its mean output on training tokens (the headline ablation: the paths carry constant offsets "
                       "that cancel); '[zero_ablation]': the other path deleted (measures the constant too). "
                       "magnitude[mean_ablation] = mean |path - its training mean|, what the path says about the "
                       "token; magnitude[zero_ablation] = mean |path| (as the original study). controls: "
                       + controls.__doc__.split("Why these")[0].split("\n\n", 1)[1].strip()
                       + " integration_evidence: reduction(NFM, both paths) - max over controls that read the code "
                         "(mlp_on_code) of reduction(control), same tokens, paired bootstrap CI over documents; "
                         "interaction_path_gain: reduction(both) - reduction(linear_only[mean_ablation]).",
        "params": nfm.param_counts(),
        "train": {"steps": steps, "best_step": fitres.best_step, "lr": args.lr, "batch_size": args.batch_size,
                  "optimizer": optimizer, "train_tokens": int(train.n), "path_mean_tokens": int(nfm.mean_tokens),
                  **cli.resume_record(args)},
        "data": acts.description,
        "recipe": recipe.describe(args.recipe),
        "reference_defects": recipe.defects_record(args.defects),
        "history": fitres.history,
    }
    sae_ref = checkpoint.parent_ref(sae_cfg)
    if dist.is_main():
        checkpoint.save(out, "nfm", nfm.state_dict(), {
            "hparams": nfm.hparams(), "data": acts.description, "train": metrics["train"], "seed": args.seed,
            "parents": {"sae": sae_ref}, "recipe": recipe.describe(args.recipe)})

    # each model's test-half prediction [n, d] is kept only as its per-row squared error [n] (all the CIs need)
    preds = {k: controls.row_errors(r_test, p) for k, p in reduction.pop("headline_predictions").items()}
    del reduction["prediction"]
    data = {"train": train, "x": (x_sel, x_test), "idx": (sel[0], test[0]), "val": (sel[1], test[1]),
            "r": (sel[2], r_test)}
    ctl = {}
    for name in control_names:
        t_ctl = time.time()
        ctl[name], pred = train_control(name, args, nfm, sae, data, out, sae_ref, acts.description, ckpt)
        preds[name] = controls.row_errors(r_test, pred)
        timing[f"{name}_seconds"] = time.time() - t_ctl       # kept out of held_out_test: results only there
        ctl[name].update(controls.reduction_ci(r_test, preds[name], test_docs, args.n_boot, args.seed))
    metrics["held_out_test"]["controls"] = ctl
    metrics["control_checkpoints"] = {c: str(out / (c if c == "residual_sae" else f"controls/{c}")) for c in ctl}
    metrics["held_out_test"]["interaction_path_gain"] = controls.gain_ci(
        r_test, preds["both"], preds["linear_only[mean_ablation]"], test_docs, args.n_boot, args.seed)
    code_ctl = [c for c in ctl if controls.READS[c] == "code"]
    if code_ctl:
        best = max(code_ctl, key=lambda c: ctl[c]["residual_reduction"])
        metrics["held_out_test"]["integration_evidence"] = {
            "best_code_control": best,
            **controls.gain_ci(r_test, preds["both"], preds[best], test_docs, args.n_boot, args.seed)}
    if not dist.is_main():
        return                  # under torchrun, rank 0 writes the results
    metrics["seconds"] = time.time() - t0
    metrics["train"].update(timing)
    cli.write_json(out / "metrics.json", metrics)
    labels = {"both": "NFM both", "linear_only[mean_ablation]": "linear only\n[mean_ablation]",
              "interaction_only[mean_ablation]": "interaction only\n[mean_ablation]", **{c: c for c in ctl}}
    cis = {**metrics["held_out_test"]["residual_reduction_ci"], **{c: ctl[c]["ci"] for c in ctl}}
    rr = {**reduction["residual_reduction"], **{c: ctl[c]["residual_reduction"] for c in ctl}}
    shown = list(labels)
    pngs = [plots.training_curves(fitres.history, ["loss"], out / "training_curves.png",
                                  f"NFM on the SAE residual (dim {cfg.dim})", fitres.best_step),
            plots.bars_ci([labels[k] for k in shown], [rr[k] for k in shown], [cis[k] for k in shown],
                          out / "residual_reduction.png",
                          f"held-out residual reduction ({r_test.shape[0]} tokens, 95% CI over documents); NFM "
                          f"{nfm.param_counts()['total']:,} parameters", "1 - MSE(r - r_hat) / MSE(r)")]
    print_ladder(metrics["held_out_test"], labels, rr, cis, nfm.param_counts()["total"])
    ckpt.finish()
    cli.report(out, out / "metrics.json", pngs)


def print_ladder(report: dict, labels: dict, rr: dict, cis: dict, nfm_params: int) -> None:
    print(f"held-out residual reduction (95% CI over documents); NFM {nfm_params:,} parameters")
    for k, label in labels.items():
        n = report["controls"].get(k, {}).get("params")
        size = f"  ({n:,} parameters)" if n else ""
        print(f"  {label.replace(chr(10), ' '):34s} {rr[k]:+.4f} [{cis[k][0]:+.4f}, {cis[k][1]:+.4f}]{size}")
    g = report["interaction_path_gain"]
    print(f"  interaction path's gain over the linear path alone: {g['gain']:+.4f} [{g['ci'][0]:+.4f}, {g['ci'][1]:+.4f}]")
    ev = report.get("integration_evidence")
    if ev:
        print(f"  integration evidence (NFM - best control on the code, {ev['best_code_control']}): "
              f"{ev['gain']:+.4f} [{ev['ci'][0]:+.4f}, {ev['ci'][1]:+.4f}]")


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
    headline = {"both": lin + inter, **{f"{p}_only[mean_ablation]": combine_paths(out, (p,), nfm, "mean") for p in PATHS}}
    return {"residual_reduction": reduction, "magnitude": magnitude, "prediction": lin + inter,
            "headline_predictions": headline}


def _coded(sae, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One training batch as every part2 model reads it: (idx, val, r, x), on the SAE's device."""
    idx, val, r = batch_codes(sae, x)
    return idx, val, r, x.to(r.device)


def train_control(name, args, nfm, sae, data, out, sae_ref, data_desc, ckpt) -> tuple[dict, torch.Tensor]:
    """Train one control of the ladder on the NFM's training tokens; (its record, its test-half prediction)."""
    train = data["train"]                               # gather -> (idx, val, r, x), per batch
    if name == "residual_sae":
        return residual_sae_control(args, nfm, sae, train.map(lambda t: t[2]), data["r"], out, sae_ref, data_desc, ckpt)
    d, n_nfm = sae.cfg.d, nfm.param_counts()["total"]
    x_sel, x_te = data["x"]
    r_sel, _ = data["r"]
    steps = cli.total_steps(args, train.n)
    record = {"reads": controls.READS[name], "nfm_params": n_nfm}
    if name == "linear_from_x":
        model, info = controls.fit_ridge(train.map(lambda t: (t[3], t[2])), None, x_sel, r_sel)
        record.update(info, fitted="closed form on the training tokens; lambda picked on the selection half")
    else:
        hidden = controls.matched_hidden(name, n_nfm, d, sae.cfg.n_latents)
        model = (controls.CodeMLP(sae.cfg.n_latents, d, hidden) if name == "mlp_on_code"
                 else controls.XMLP(d, hidden)).to(module_device(nfm))
        ins = train.map(lambda t: (*controls.inputs(model, t[3], t[0], t[1]), t[2]))     # (*inputs, r)
        sel_ins = controls.inputs(model, x_sel, data["idx"][0], data["val"][0])
        res = controls.train_regressor(model, ins, None, sel_ins, r_sel, steps, args.batch_size, args.lr,
                                       cli.eval_every(args, steps), args.seed, f"train {name} (control)", ckpt=ckpt,
                                       tag=name, optimizer="adam-reference" if args.recipe == "reference" else "adam",
                                       keep_latest="latest-as-best" in args.defects)
        record.update(hidden=hidden, steps=steps, best_step=res.best_step, lr=args.lr)
    pred = controls.predict(model, controls.inputs(model, x_te, data["idx"][1], data["val"][1]))
    record["params"] = controls.n_params(model)
    if dist.is_main():
        checkpoint.save(out / "controls" / name, "control", {k: v.contiguous() for k, v in model.state_dict().items()}, {
            "hparams": model.hparams(), "data": data_desc, "seed": args.seed, "parents": {"sae": sae_ref},
            "train": {k: v for k, v in record.items() if k in ("steps", "best_step", "lr", "lambda")}})
    return record, pred


def residual_sae_control(args, nfm, sae, r_train, r_held, out, sae_ref, data_desc, ckpt) -> tuple[dict, torch.Tensor]:
    """A TopK SAE trained on the residual itself (r_train: Rows of r, read per batch), with at least the NFM's
    parameter count; r_held = (selection-half r, test-half r)."""
    r_sel, r_test = r_held
    d, n_params = sae.cfg.d, nfm.param_counts()["total"]
    n_latents = math.ceil((n_params - d) / (2 * d + 1))   # 2*n*d weights + n + d biases >= NFM parameters
    k = min(args.baseline_k or sae.cfg.k, n_latents)
    steps = cli.total_steps(args, r_train.n)
    ctl = TopKSAE(SAEConfig(d=d, n_latents=n_latents, k=k, dead_tokens=default_dead_tokens(steps, args.batch_size)))
    ctl.to(module_device(nfm))
    fitres = train_sae(ctl, r_train, r_sel, steps, args.batch_size, default_lr(n_latents),
                       cli.eval_every(args, steps), args.seed, "train residual SAE (control)", ckpt=ckpt,
                       tag="residual_sae", keep_latest="latest-as-best" in args.defects)
    r_hat = reconstruct_all(ctl, r_test)
    n_ctl = sum(p.numel() for p in ctl.parameters())
    if dist.is_main():
        checkpoint.save(out / "residual_sae", "residual_sae", ctl.tensors(), {
            "hparams": ctl.hparams(), "data": data_desc, "seed": args.seed, "parents": {"sae": sae_ref},
            "train": {"steps": steps, "best_step": fitres.best_step}})
    return ({"reads": "r", "params": n_ctl, "nfm_params": n_params, "n_latents": n_latents, "k": k, "steps": steps,
             "best_step": fitres.best_step}, r_hat)


if __name__ == "__main__":
    cli.run_main(main)
