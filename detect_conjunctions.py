"""detect_conjunctions: find the interactions the primary SAE has absorbed into latents of its own.

A TopK SAE trained on data with pair interactions learns "conjunction latents": a latent c that fires when two
features are both present, whose decoder row adds a direction of its own beyond the two features' rows, while
the two features' own latents then fire less (absorption). Such an interaction is no longer in the SAE's
residual, so the NFM of part2 cannot find it. This stage reads the SAE's code on the training rows of its own
data stream and, for every latent, attributes two parent latents and weighs three kinds of evidence
(definitions and formulas in common/conjunctions.py):
  - firing:   the parents co-fire with c above their base rate, their signal is present on c's rows, and c
              fires on the rows where both parents are present (recall, jaccard);
  - geometry: rho, the share of c's decoder row outside the span of its parents' rows (a latent for a mere
              co-occurrence only re-adds its parents: rho ~ 0);
  - data:     the 2 x 2 interaction contrast of the rows along that new direction (parents present or not),
              as a z and as a share of what c writes there.
A latent that passes every gate is a conjunction latent; score = jaccard x rho x clip(effect, 0, 1). The same
row evidence on the held-out rows is reported next to it (columns *_heldout) as a replication.

Demo (after part1):
    python detect_conjunctions.py --sae checkpoints/part1_sae --out checkpoints/conjunctions
Your own activations (the layer and width the SAE was trained on):
    python detect_conjunctions.py --sae checkpoints/mine/part1_sae --activations acts.safetensors --out checkpoints/mine/conjunctions
Paper setup:
    python detect_conjunctions.py --preset paper --sae checkpoints/paper/part1_sae --out checkpoints/paper/conjunctions

Writes to --out: conjunctions.csv (every examined latent, detected ones first), metrics.json, conjunctions.png.
"""
from __future__ import annotations

import csv
import time
from dataclasses import asdict

import torch

from common import cli, conjunctions as cj
from common.data import DataSpec, get_activations, split_selection_test
from common.loading import load_sae_checkpoint
from common.plots import plt

HELDOUT = ("jaccard", "recall", "z", "effect", "n_both")


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/conjunctions")
    p.add_argument("--sae", default="checkpoints/part1_sae", help="part1 output folder (default: checkpoints/part1_sae)")
    cli.add_data_args(p, with_model_source=False)
    d = cj.DetectConfig()
    g = p.add_argument_group("detector (common/conjunctions.py)")
    g.add_argument("--min-rows", type=int, default=d.min_rows,
                   help=f"a latent (and a parent) must fire on at least this many training rows (default: {d.min_rows})")
    g.add_argument("--n-candidates", type=int, default=d.n_candidates,
                   help=f"parent candidates per latent whose co-firing is counted (default: {d.n_candidates})")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"family-wise level of the data z gate, Bonferroni over the examined latents (default: {d.alpha})")
    g.add_argument("--min-rho", type=float, default=d.min_rho,
                   help=f"least share of a latent's decoder row outside its parents' span (default: {d.min_rho})")
    g.add_argument("--max-rows", type=int, default=50_000,
                   help="use at most this many training rows (the first ones, as --train-tokens does) and at most a "
                        "fifth as many held-out rows; 0 = all (default: 50000)")
    g.add_argument("--rows-per-batch", type=int, default=None,
                   help="rows per streaming batch (default: 4096, fewer for large dictionaries so that a "
                        "[batch, n_latents] tensor stays under 32M entries)")
    g.add_argument("--top", type=int, default=10, help="conjunction latents printed (default: 10)")
    return p


def write_csv(path, res: cj.Conjunctions, held: cj.Conjunctions) -> None:
    cols = list(cj.Conjunctions.COLUMNS) + [f"{c}_heldout" for c in HELDOUT]
    order = res.rows(only_detected=True) + [r for r in res.rows(only_detected=False) if not r["detected"]]
    pos = {int(l): i for i, l in enumerate(held.latent.tolist())}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in order:
            i = pos[r["latent"]]
            w.writerow([r[c] if not isinstance(r[c], float) else f"{r[c]:.6g}" for c in cj.Conjunctions.COLUMNS]
                       + [f"{float(getattr(held, c)[i]):.6g}" for c in HELDOUT])


def evidence_plot(res: cj.Conjunctions, path, top: int) -> object:
    """Left: every examined latent in firing x geometry, detected ones marked; middle: the data evidence;
    right: the top conjunction latents' scores."""
    det = res.detected.numpy()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (x, y, xl, yl) in zip(axes[:2], ((res.jaccard, res.rho, "firing: jaccard(c fires, parents co-present)",
                                               "geometry: rho (new-direction share)"),
                                              (res.effect.clamp(-1, 2), res.z, "data: effect (clipped to [-1, 2])",
                                               "data: z of the interaction contrast"))):
        ax.scatter(x[~det], y[~det], s=6, alpha=0.4, color="tab:blue", label="examined")
        ax.scatter(x[det], y[det], s=14, color="tab:red", label="conjunction latent")
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
        ax.legend(fontsize=7)
    axes[1].axhline(res.z_crit, color="grey", ls=":", lw=1)
    rows = res.rows()[:top]
    axes[2].barh([f"{r['latent']} = {r['parent_a']} & {r['parent_b']}" for r in rows][::-1],
                 [r["score"] for r in rows][::-1], color="tab:red")
    axes[2].set_xlabel("score = jaccard x rho x clip(effect, 0, 1)", fontsize=8)
    axes[2].set_title(f"{int(det.sum())} conjunction latents of {len(det)} examined", fontsize=9)
    axes[2].tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="detect")
    if args.max_rows < 0:
        raise cli.UserError(f"--max-rows must be >= 0 (0 = all rows), got {args.max_rows}")
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    t0 = time.time()
    sae, norm, sae_cfg = load_sae_checkpoint(args.sae)
    device = cli.env_device(args.device)
    sae.to(device).eval()
    acts = get_activations(args, DataSpec.from_description(sae_cfg["data"]), width=sae.cfg.d, parent=sae_cfg["data"])
    cfg = cj.DetectConfig(min_rows=args.min_rows, n_candidates=args.n_candidates, alpha=args.alpha,
                          min_rho=args.min_rho, batch=args.rows_per_batch or cj.default_batch(sae.cfg.n_latents))
    cfg.validate()
    n_tr = min(args.max_rows or acts.train.n, acts.train.n)
    test_half = split_selection_test(acts.val, acts.val_docs)[1][0]          # never the best-step-picking half
    x_tr, x_va = norm.encode(acts.train.read(0, n_tr)), norm.encode(test_half[:max(1, n_tr // 5)])
    with torch.no_grad():
        train_rows = cj.cached_batches(sae, x_tr, cfg.batch)
        fit = cj.fit_parents(sae.W_dec, train_rows, cfg)
        res = cj.row_evidence(fit, train_rows, cfg)
        held = cj.row_evidence(fit, cj.cached_batches(sae, x_va, cfg.batch), cfg)
    write_csv(out / "conjunctions.csv", res, held)

    passes = res.passes
    table = res.rows()
    metrics = {
        "stage": "detect_conjunctions", "sae": args.sae,
        "rows": {"fit_and_test": res.n_fit, "held_out_replication": held.n_test},
        "n_latents": sae.cfg.n_latents, "n_examined": res.info["examined"], "n_conjunction_latents": len(table),
        "n_examined_passing": {k: int(v.sum()) for k, v in passes.items()},
        "n_conjunction_latents_also_detected_on_held_out_rows": int((res.detected & held.detected).sum()),
        "z_crit": res.z_crit, "config": asdict(cfg),
        "conjunction_latents": table[:200],
        "absorption": {"median_parent_fires_given_c": float(torch.cat([res.a_fires_given_c[res.detected],
                                                                       res.b_fires_given_c[res.detected]]).median())
                       if len(table) else None},
        "data": acts.description,
        "definitions": cj.__doc__.split("Memory:")[0].strip() + " *_heldout columns of conjunctions.csv: the row "
                       "evidence (pass 2) on the held-out rows, parents and directions still from the training rows.",
        "seconds": time.time() - t0,
    }
    cli.write_json(out / "metrics.json", metrics)
    png = evidence_plot(res, out / "conjunctions.png", args.top)
    print(f"{len(table)} conjunction latents among {res.info['examined']} examined latents of {sae.cfg.n_latents} "
          f"({res.n_fit} training rows; passing firing {metrics['n_examined_passing']['firing']}, geometry "
          f"{metrics['n_examined_passing']['geometry']}, data {metrics['n_examined_passing']['data']}; "
          f"{metrics['n_conjunction_latents_also_detected_on_held_out_rows']} also on the {held.n_test} held-out rows)")
    for r in table[:args.top]:
        print(f"  latent {r['latent']:6d} = {r['parent_a']} & {r['parent_b']}: score {r['score']:.3f} (jaccard "
              f"{r['jaccard']:.2f}, rho {r['rho']:.2f}, effect {r['effect']:.2f}, z {r['z']:.1f}; parents fire on "
              f"{r['a_fires_given_c']:.0%} / {r['b_fires_given_c']:.0%} of its rows)")
    cli.report(out, out / "metrics.json", [out / "conjunctions.csv", png])


if __name__ == "__main__":
    cli.run_main(main)
