"""part3: a secondary TopK SAE on the NFM's interaction hidden layer ("integration features").

Exactly which tensor: u = W_1 p + b_1, the interaction MLP's hidden layer *before* its ReLU ("post-MLP1"),
where p is the bi-interaction pooling of the primary SAE's top-k code of the normalised layer-L activation,
computed in eval mode (no dropout) by the same `NFM.hidden` the NFM was trained with. u is normalised by
its own map (fitted on training tokens, saved with this SAE). The SAE code is part1's (common/sae.py).

Reported on held-out documents: FVU, L0 and dead fraction of the secondary SAE, and the NFM's residual
reduction when u is replaced by its secondary-SAE reconstruction (against the intact NFM).

With --joint, the same tensor of the joint model (part5): its shared code, its NFM interaction path (the
reference never did this; it was the study's stated next step); the residual is then x minus the joint
model's SAE path, which is what its NFM paths add to. A PolySAE joint model (part5 --decoder poly) has no NFM:
there the tensor is its interaction representation h = [a[:, :R2]^2, a[:, :R3]^3] (a = f U, the projection shared
by its pairwise and triple terms; common/poly.py), which its interaction path maps linearly to the output.

Demo (after part2; after part5 for --joint):
    python part3_train_secondary_sae.py
    python part3_train_secondary_sae.py --joint checkpoints/part5_joint --out checkpoints/part3_secondary_sae_joint
Paper setup (25x expansion of the 300-dim hidden layer = 7,500 latents, K = 2% = 150):
    python part3_train_secondary_sae.py --preset paper --nfm checkpoints/paper/part2_nfm --out checkpoints/paper/part3_secondary_sae

Writes to --out: model.safetensors + config.json (records the NFM's and SAE's content hashes),
metrics.json, training_curves.png, feature_density.png.
"""
from __future__ import annotations

import time

import torch

from common import checkpoint, cli, plots, recipe
from common.data import DataSpec, get_activations, split_selection_test
from common.metrics import recon_stats, residual_reduction
from common.joint import load_joint_checkpoint
from common.nfm import NFM, hidden_all
from common.normalize import MODES, Normalizer
from common.loading import load_sae_checkpoint
from common.sae import (DEFAULT_OPTIMIZER, OPTIMIZERS, SAEConfig, TopKSAE, batch_codes, codes_and_residuals,
                        default_dead_tokens, default_lr, recipe_options, reconstruct_all, train_sae)
from common.train import TrainCheckpoints, batched, module_device


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/part3_secondary_sae")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--nfm", default=None, help="part2 output folder (default: checkpoints/part2_nfm unless --joint)")
    src.add_argument("--joint", default=None,
                     help="part5 output folder: train on the joint model's interaction hidden layer instead")
    p.add_argument("--sae", default=None, help="with --nfm: the part1 folder the NFM was trained on (default: the path "
                                               "recorded in the NFM's config; any other SAE is refused)")
    cli.add_data_args(p, with_model_source=False)
    g = p.add_argument_group("secondary SAE")
    g.add_argument("--expansion", type=int, default=16, help="latents per hidden unit (default: 16)")
    g.add_argument("--n-latents", type=int, default=None, help="dictionary size (default: expansion x NFM hidden width)")
    g.add_argument("--k", type=int, default=16, help="active latents per token (default: 16)")
    g.add_argument("--normalize", choices=MODES, default="scalar", help="normalisation of u (default: scalar)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER,
                   help="the SAE optimizer, as in part1 (default: %(default)s)")
    cli.add_training_args(p, None, "5e-3 / sqrt(n_latents / 2^14) for signsgd-sf, 2e-4 / sqrt(n_latents / 2^14) for adam")
    cli.add_precompute_arg(p)
    cli.add_recipe_args(p)
    cli.add_defect_args(p, "part3")
    cli.add_resume_args(p)
    return p


def load_nfm_and_sae(nfm_dir, sae_dir=None):
    """The NFM and exactly the SAE it was trained on (refuses any other)."""
    tensors, nfm_cfg = checkpoint.load(nfm_dir, "nfm", "--nfm")
    nfm = NFM.from_tensors(tensors, nfm_cfg["hparams"])
    sae, norm, sae_cfg = load_sae_checkpoint(sae_dir or nfm_cfg["parents"]["sae"]["path"])
    checkpoint.check_parent(nfm_cfg, "sae", sae_cfg, "--nfm", "--sae")
    return nfm, nfm_cfg, sae, norm, sae_cfg


@torch.no_grad()
def nfm_with_hidden(nfm: NFM, idx, val, u) -> torch.Tensor:
    """NFM output with its hidden layer u given (e.g. the secondary SAE's reconstruction). A PolySAE's decoder
    (no linear path) gives its interaction path from its representation h."""
    if "linear" not in nfm.PATHS:
        return nfm.interaction_from_hidden(u)
    return nfm.linear(idx, val) + nfm.interaction_from_hidden(u)


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="part3")
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    ckpt = TrainCheckpoints(out, args)
    t0 = time.time()

    if args.joint:
        joint, norm, joint_cfg = load_joint_checkpoint(args.joint, allow_poly=True)
        nfm, sae, data_desc = joint.interaction_model, joint.sae, joint_cfg["data"]
        parents = {"joint": checkpoint.parent_ref(joint_cfg)}
    else:
        nfm, nfm_cfg, sae, norm, sae_cfg = load_nfm_and_sae(args.nfm or "checkpoints/part2_nfm", args.sae)
        data_desc = sae_cfg["data"]
        parents = {"nfm": checkpoint.parent_ref(nfm_cfg), "sae": checkpoint.parent_ref(sae_cfg)}
    recipe.check_parent(args.recipe, joint_cfg if args.joint else nfm_cfg, "--joint" if args.joint else "--nfm",
                        args.allow_recipe_mix)
    device = cli.env_device(args.device)
    nfm.to(device)
    sae.to(device)
    acts = get_activations(args, DataSpec.from_description(data_desc), parent=data_desc, width=sae.cfg.d)
    # u [n_train, hidden] is computed per batch from the training rows (common/rows.py), never held whole
    u_train = acts.train.map(lambda raw: _hidden(nfm, sae, norm.encode(raw.to(device, non_blocking=True))))
    u_train = u_train.materialized(args.precompute_mb)  # small sets: computed once (--precompute-mb)
    idx_v, val_v, r_v = codes_and_residuals(sae, norm.encode(acts.val))
    u_val = hidden_all(nfm, idx_v, val_v)                                     # [n_val, hidden]
    unorm = Normalizer.fit(u_train, args.normalize)
    sel, (u_test, idx_test, val_test, r_test) = split_selection_test(
        unorm.encode(u_val), acts.val_docs, idx_v, val_v, r_v)
    u_sel = sel[0]

    hidden = nfm.cfg.hidden
    poly = "linear" not in nfm.PATHS
    what = ("PolySAE interaction representation h = [a[:, :R2]^2, a[:, :R3]^3], a = f U (width "
            f"{hidden})" if poly else f"NFM hidden layer (post-MLP1, pre-ReLU, width {hidden})")
    steps = cli.total_steps(args, u_train.n)
    cfg = SAEConfig(d=hidden, n_latents=args.n_latents or args.expansion * hidden, k=args.k,
                    dead_tokens=default_dead_tokens(steps, args.batch_size), **recipe_options(args.recipe),
                    **({"auxk_alpha": 0.0} if args.recipe == "reference" else {}))    # the reference: no AuxK
    sec = TopKSAE(cfg).to(device)
    lr = args.lr or default_lr(cfg.n_latents, args.optimizer)
    print(f"secondary TopK SAE on the {what}: n_latents={cfg.n_latents} k={cfg.k}, {steps} steps, recipe {args.recipe}")
    fitres = train_sae(sec, u_train.map(unorm.encode), u_sel, steps, args.batch_size, lr,
                       cli.eval_every(args, steps), args.seed, "train secondary SAE", optimizer=args.optimizer,
                       ckpt=ckpt, keep_latest="latest-as-best" in args.defects)

    test = recon_stats(sec, u_test, norm=unorm, with_density=True)
    firing = test.pop("firing_rate")
    u_hat = unorm.decode(reconstruct_all(sec, u_test))
    with_hidden = lambda i, v, u: nfm_with_hidden(nfm, i, v, u)  # noqa: E731
    intact = batched(with_hidden, idx_test, val_test, unorm.decode(u_test), device=module_device(nfm))
    replaced = batched(with_hidden, idx_test, val_test, u_hat, device=module_device(nfm))
    metrics = {
        "stage": "part3_train_secondary_sae",
        "input_tensor": ("PolySAE interaction representation h = [a[:, :R2]^2, a[:, :R3]^3], a = f U (the projection "
                         "shared by its pairwise and triple terms; its interaction path is lambda2 h2 C2^T + lambda3 h3 "
                         "C3^T), from the joint code of the normalised layer activation" if poly else
                         "NFM interaction MLP hidden layer u = W_1 p + b_1 before ReLU (post-MLP1), eval mode, from "
                         "the primary SAE's top-k code of the normalised layer activation"),
        "source": "joint model " + args.joint if args.joint else "sequential NFM " + (args.nfm or "checkpoints/part2_nfm"),
        "held_out_test": {
            **test,
            "nfm_residual_reduction_intact": residual_reduction(r_test, intact),
            "nfm_residual_reduction_with_secondary_reconstruction": residual_reduction(r_test, replaced),
        },
        "definitions": "held-out documents not used for training or model selection; FVU/L0/dead of the secondary "
                       "SAE on u (normalised units; *_raw in u's own units); NFM residual reduction = "
                       "1 - sum||r - r_hat||^2 / sum||r||^2 with u intact vs replaced by the secondary SAE's reconstruction",
        "train": {"steps": steps, "best_step": fitres.best_step, "optimizer": args.optimizer, "lr": lr, "batch_size": args.batch_size,
                  "train_tokens": int(u_train.n), "seconds": time.time() - t0, **cli.resume_record(args)},
        "history": fitres.history,
        "recipe": recipe.describe(args.recipe),
        "reference_defects": recipe.defects_record(args.defects),
    }
    checkpoint.save(out, "secondary_sae", {**sec.tensors(), **unorm.tensors()}, {
        "hparams": sec.hparams(), "normalize": args.normalize,
        "input": "poly.hidden ([a^2, a^3])" if poly else "nfm.hidden (post-MLP1, pre-ReLU)",
        "data": acts.description, "seed": args.seed, "train": {k: v for k, v in metrics["train"].items() if k != "seconds"},
        "parents": parents, "recipe": recipe.describe(args.recipe)})
    cli.write_json(out / "metrics.json", metrics)
    pngs = [plots.training_curves(fitres.history, ["fvu"], out / "training_curves.png",
                                  f"secondary SAE n={cfg.n_latents} k={cfg.k}", fitres.best_step),
            plots.density_histogram(firing, test["n_tokens"], out / "feature_density.png", "secondary SAE feature density")]
    h = metrics["held_out_test"]
    print(f"held-out: FVU {h['fvu']:.4f}  L0 {h['l0']:.1f}  dead {h['dead_fraction']:.1%}  NFM residual reduction "
          f"{h['nfm_residual_reduction_intact']:.4f} intact -> {h['nfm_residual_reduction_with_secondary_reconstruction']:.4f} "
          f"with the secondary reconstruction")
    ckpt.finish()
    cli.report(out, out / "metrics.json", pngs)


@torch.no_grad()
def _hidden(nfm, sae, x: torch.Tensor) -> torch.Tensor:
    """The hidden layer u of one batch of normalised rows (eval mode), on the NFM's device."""
    idx, val, _ = batch_codes(sae, x)
    nfm.eval()
    return nfm.hidden(idx.to(module_device(nfm)), val.to(module_device(nfm)))


if __name__ == "__main__":
    cli.run_main(main)
