"""part1: train a TopK sparse autoencoder on the layer-L residual stream of a causal LM.

Layer L = hidden_states[L] = the residual stream after L decoder blocks (common/hooks.py). Activations
are normalised by a map fitted on training tokens and saved in the checkpoint (common/normalize.py).
Training and validation text are split by document; every reported metric is on held-out tokens that
were used neither for training nor for choosing the best step.

Demo (the embedded tiny Llama, CPU, about a minute):
    python part1_train_topk_sae.py
Paper setup (OpenLLaMA-3B, layer 16, WikiText-103, 50k latents, K=1024; one 24 GB GPU):
    python part1_train_topk_sae.py --preset paper --out checkpoints/paper/part1_sae
Your own activations (no model at all; one [n, d] tensor 'activations' in a safetensors file):
    python part1_train_topk_sae.py --activations acts.safetensors --out checkpoints/mine/part1_sae
Several GPUs (DDP, common/dist.py; --batch-size is the global batch):
    torchrun --standalone --nproc_per_node=4 part1_train_topk_sae.py --preset paper --out checkpoints/paper/part1_sae
The original study's recipe (common/recipe.py: z-score, no b_dec, free decoder norms, Adam 1e-4, LinearLR, batch 1024):
    python part1_train_topk_sae.py --recipe reference --out checkpoints/reference/part1_sae
Resume an interrupted run (same flags plus --resume; the state is saved every --checkpoint-every steps):
    python part1_train_topk_sae.py --preset paper --out checkpoints/paper/part1_sae --resume

Writes to --out: model.safetensors + config.json (SAE weights and the normalisation), metrics.json,
training_curves.png, feature_density.png.
"""
from __future__ import annotations

import time

from common import checkpoint, cli, dist, plots, recipe
from common.data import DataSpec, get_activations, heldout_documents
from common.metrics import recon_stats
from common.normalize import MODES, Normalizer
from common.sae import (DEFAULT_OPTIMIZER, OPTIMIZERS, SAEConfig, TopKSAE, default_dead_tokens, default_lr,
                        recipe_options, train_sae)
from common.train import TrainCheckpoints


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/part1_sae")
    cli.add_data_args(p)
    g = p.add_argument_group("SAE")
    g.add_argument("--n-latents", type=int, default=2048, help="dictionary size (default: 2048 = 8x the demo width)")
    g.add_argument("--k", type=int, default=32, help="active latents per token, the TopK (default: 32)")
    g.add_argument("--normalize", choices=MODES, default="scalar",
                   help="activation normalisation fitted on training tokens and saved with the SAE "
                        "(see common/normalize.py; default: scalar)")
    g.add_argument("--auxk-alpha", type=float, default=1 / 32, help="AuxK loss coefficient (default: 1/32, OpenAI)")
    g.add_argument("--dead-tokens", type=int, default=None,
                   help="a latent that has not fired for this many training tokens counts as dead for AuxK "
                        "(default: min(10M, a tenth of all training tokens seen))")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER,
                   help="signsgd-sf: schedule-free SignSGD, sparsify's default (common/optim.py); adam: Adam with "
                        "warm-up and linear decay; adam-reference: the original study's Adam (eps 1e-5, clip 1.0, "
                        "LinearLR 1.0 -> 0.1 over 80%% of the steps; --recipe reference) (default: %(default)s)")
    cli.add_training_args(p, None, "5e-3 / sqrt(n_latents / 2^14) for signsgd-sf, 2e-4 / sqrt(n_latents / 2^14) "
                                   "for adam: the sparsify / dictionary_learning scalings")
    cli.add_recipe_args(p, parent=False)
    cli.add_defect_args(p, "part1")
    cli.add_resume_args(p)
    return p


def main(argv=None):
    args = cli.parse(build_parser(), argv)
    dist.init(args)
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    ckpt = TrainCheckpoints(out, args)
    t0 = time.time()

    spec = None if args.activations else DataSpec.from_args(args)
    acts = dist.main_first(lambda: get_activations(args, spec))
    d = acts.train.d
    norm = Normalizer.fit(acts.train, args.normalize)
    x_train = acts.train.map(norm.encode)               # [n_train, d], read and normalised per batch (common/rows.py)
    x_sel, x_test = acts.normalized_halves(norm.encode)   # held-out halves, normalised

    steps = cli.total_steps(args, x_train.n)
    dead_tokens = args.dead_tokens or default_dead_tokens(steps, args.batch_size)
    cfg = SAEConfig(d=d, n_latents=args.n_latents, k=args.k, auxk_alpha=args.auxk_alpha, dead_tokens=dead_tokens,
                    **recipe_options(args.recipe))
    sae = TopKSAE(cfg).to(cli.env_device(args.device))
    init_sq_norm = sae.W_dec.detach().pow(2).sum(1).cpu()   # kept so part7 can tell trained norms from init values
    lr = args.lr or default_lr(args.n_latents, args.optimizer)
    print(f"TopK SAE d={d} n_latents={cfg.n_latents} k={cfg.k}: {steps} steps of {args.batch_size} tokens "
          f"({x_train.n} training tokens), {args.optimizer} lr {lr:.2e}, recipe {args.recipe}")
    fitres = train_sae(sae, x_train, x_sel, steps, args.batch_size, lr,
                       cli.eval_every(args, steps), args.seed, "train SAE", optimizer=args.optimizer, ckpt=ckpt,
                       keep_latest="latest-as-best" in args.defects)
    if not dist.is_main():
        return                  # under torchrun, rank 0 evaluates and writes the results

    test = recon_stats(sae, x_test, norm=norm, with_density=True)
    firing = test.pop("firing_rate")
    sel = recon_stats(sae, x_sel)
    metrics = {
        "stage": "part1_train_topk_sae",
        "held_out_test": test,
        "held_out_selection": sel,
        "definitions": "metrics on held-out documents: 'held_out_test' was used neither for training nor for "
                       "choosing the best step; FVU = sum||x-x_hat||^2 / sum||x-mean(x)||^2 over all tokens; "
                       "mse/fvu/cosine in normalised units, *_raw in the LM's units; dead_fraction = latents that "
                       "never fire on these tokens",
        "train": {"steps": steps, "best_step": fitres.best_step, "optimizer": args.optimizer, "lr": lr, "batch_size": args.batch_size,
                  "train_tokens": x_train.n, "dead_fraction_at_end_of_training":
                      float((sae.since_fired >= dead_tokens).float().mean()), "seconds": time.time() - t0,
                  **cli.resume_record(args)},
        "data": acts.description,
        "recipe": recipe.describe(args.recipe),
        "reference_defects": recipe.defects_record(args.defects),
        "held_out_documents": heldout_documents(acts.val_docs),
        "history": fitres.history,
    }
    checkpoint.save(out, "sae", {**sae.tensors(), **norm.tensors(), "init.sq_norm": init_sq_norm}, {
        "hparams": sae.hparams(), "normalize": args.normalize, "data": acts.description,
        "train": {k: v for k, v in metrics["train"].items() if k != "seconds"}, "seed": args.seed, "parents": {},
        "recipe": recipe.describe(args.recipe),
    })
    cli.write_json(out / "metrics.json", metrics)
    pngs = [plots.training_curves(fitres.history, ["fvu"], out / "training_curves.png",
                                  f"TopK SAE n={cfg.n_latents} k={cfg.k}", fitres.best_step),
            plots.density_histogram(firing, test["n_tokens"], out / "feature_density.png", "TopK SAE feature density")]
    print(f"held-out: FVU {test['fvu']:.4f}  MSE {test['mse']:.4f}  L0 {test['l0']:.1f}  "
          f"dead {test['dead_fraction']:.1%}  cosine {test['cosine']:.3f}  ({test['n_tokens']} tokens)")
    ckpt.finish()
    cli.report(out, out / "metrics.json", pngs)


if __name__ == "__main__":
    cli.run_main(main)
