"""Planted-ground-truth validation: where the pipeline finds feature interactions, where it misses them, and
what it reports when there are none.

Synthetic activations (common/synthetic.py): n_true feature directions in superposition plus planted pair
interactions g(a_i, a_j) u_ij, decoy pairs that co-occur as often but carry no interaction, and null data
with the same features, activations and co-occurrence but nothing planted. The sequential workflow (part1 ->
part2, each run through its own main()) is trained in two settings:
  realistic       the primary SAE is fitted to the same data it then encodes (it may absorb the interaction);
  no_absorption   the primary SAE is fitted to the null data, so it cannot have absorbed it;
and the joint workflow (part5) on the same data, its SAE path in the primary SAE's role, with the NFM
decoder (`joint`) and with PolySAE's polynomial decoder at the same parameter count (`joint_poly`, part5
--decoder poly; its polynomial terms in the NFM's place);
plus an oracle: an NFM reading the *true* feature activations, trained on x - sum_i a_i d_i. The oracle
separates failures of the NFM from failures of the SAE. Each is run on planted and on null data.

Reported on held-out rows never used for training or model selection (definitions in common/groundtruth.py):
absorbed by the SAE / left in the residual, recovered by the NFM interaction path / whole NFM / every control
of part2's ladder (common/controls.py: linear_from_x, mlp_on_code, mlp_from_x, residual_sae), residual MSE
reduction with its excess over null, decoder match, and the ranking (AUC, precision@|P|) of the planted pairs
against the decoys by the NFM's pair strength (pair_AUC; against all pairs too, in results.json, but that one
rewards co-occurrence). The absorbed-interaction detector (common/conjunctions.py) runs on each sequential
setting's SAE and data: rows `conjunction_detector`, its pair_AUC from the conjunction latents it attributes
to pairs (precision@|P|, each principle alone and the held-out replication in results.json).

    python validate_planted_interactions.py                      # about 4 minutes on 2 CPU cores
    python validate_planted_interactions.py --d 128 --n-true 512 # the harder, more superposed setting

Writes to --out: results.json, results.csv, recovered_share.png, and every trained checkpoint.
"""
from __future__ import annotations

import csv
import json
import time

import torch

import part1_train_topk_sae as part1
import part2_train_residual_nfm as part2
import part5_joint_sae_nfm as part5
from common import checkpoint, cli, conjunctions, controls, groundtruth, plots, synthetic
from common.data import load_activation_file, split_rows, split_selection_test
from common.joint import load_joint_checkpoint, path_outputs
from common.loading import load_sae_checkpoint
from common.nfm import NFM, NFMConfig, combine_paths, predict, train_nfm
from common.sae import codes_and_residuals


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--out", default="checkpoints/validation_planted", help="output folder (default: checkpoints/validation_planted)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out "
                                                              "(default: refuse)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every model (default: 0)")
    p.add_argument("--device", default="auto", help="device for training (default: auto)")
    p.add_argument("--n-samples", type=int, default=60_000, help="rows of planted and of null data; the last 10%% are "
                                                                 "held out (default: 60000)")
    synthetic.add_args(p)
    g = p.add_argument_group("pipeline sizes")
    g.add_argument("--n-latents", type=int, default=512, help="primary SAE latents (default: 512)")
    g.add_argument("--k", type=int, default=8, help="primary SAE TopK (default: 8)")
    g.add_argument("--nfm-dim", type=int, default=32, help="NFM embedding dimension, also the oracle's (default: 32)")
    g.add_argument("--epochs", type=float, default=30.0,
                   help="passes over the training rows for every model (default: 30; the pair ranking needs a "
                        "well-fitted SAE, decoder match >= 0.95)")
    return p


def run_stage(mod, argv: list[str]) -> None:
    """Run a stage in this process; its --out lies inside ours, which --overwrite (checked once, on our own
    --out) has already allowed us to replace."""
    argv = [*argv, "--overwrite"]
    print(f"\n$ python {mod.__name__}.py {' '.join(argv)}")
    mod.main(argv)


def held_out_test(path):
    """The rows every stage reports on: the test half of the held-out last 10% (as part1/part2 split them)."""
    acts, docs = load_activation_file(path, "--activations")
    _, (val, vdocs) = split_rows(acts, docs)
    rows = torch.arange(acts.shape[0])[-val.shape[0]:]
    _, (test_rows,) = split_selection_test(rows, vdocs)
    return test_rows


def evaluate_pipeline(sae_dir, nfm_dir, data_dir, reference, truth) -> dict:
    """Ground-truth scores of one SAE + NFM (+ control) on the held-out test rows of one data set."""
    sae, norm, _ = load_sae_checkpoint(sae_dir)
    tensors, nfm_cfg = checkpoint.load(nfm_dir, "nfm", "--nfm")
    nfm = NFM.from_tensors(tensors, nfm_cfg["hparams"])
    rows = held_out_test(f"{data_dir}/activations.safetensors")
    x = load_activation_file(f"{data_dir}/activations.safetensors", "--activations")[0][rows]
    p = norm.encode(reference[rows]) - norm.encode(torch.zeros_like(reference[rows]))   # planted, normalised units
    idx, val, r = codes_and_residuals(sae, norm.encode(x))
    inter, whole = predict(nfm, idx, val, ("interaction",)), predict(nfm, idx, val)
    left = groundtruth.share(r, p)
    absorbed = groundtruth.share(norm.encode(x) - r, p)          # the SAE reconstruction's projection onto p
    latent_of, cos = groundtruth.match_latents(sae.W_dec.detach() * norm.scale, truth["directions"])
    m = json.loads(open(f"{nfm_dir}/metrics.json").read())
    rr, ctl_m = m["held_out_test"]["residual_reduction"], m["held_out_test"]["controls"]
    recovered = {"nfm_interaction": groundtruth.share(inter, p), "nfm_whole": groundtruth.share(whole, p)}
    reduction = {"nfm": rr["both"], "nfm_interaction_only": rr["interaction_only[mean_ablation]"]}
    params = {"nfm": m["params"]["total"]}
    x_norm = norm.encode(x)
    for name, model in controls.load_controls(nfm_dir).items():     # the control ladder, as part2 trained it
        recovered[name] = groundtruth.share(controls.control_prediction(name, model, x_norm, idx, val, r), p)
        reduction[name], params[name] = ctl_m[name]["residual_reduction"], ctl_m[name]["params"]
    return {
        "absorbed_by_sae": absorbed, "left_in_residual": left,
        "planted_share_of_x": groundtruth.share(x_norm, p),           # = absorbed + left (about 1 on planted data)
        "recovered": recovered, "residual_reduction": reduction, "params": params,
        "decoder_match_mean_max_cosine": float(cos.mean()),
        "pair_ranking": groundtruth.pair_ranking(nfm, latent_of,
                                                 groundtruth.typical_values(idx, val, sae.cfg.n_latents),
                                                 truth["pairs"], truth["decoy_pairs"], truth["true_acts"]),
        "n_test_rows": int(rows.numel()),
    }


def evaluate_joint(joint_dir, data_dir, reference, truth) -> dict:
    """The same scores for the joint model: its SAE path plays the primary SAE, its NFM paths the NFM (for a
    part5 --decoder poly model, its polynomial terms play the NFM's interaction path; it has no linear path)."""
    model, norm, _ = load_joint_checkpoint(joint_dir, allow_poly=True)
    inter = model.interaction_model
    rows = held_out_test(f"{data_dir}/activations.safetensors")
    x = norm.encode(load_activation_file(f"{data_dir}/activations.safetensors", "--activations")[0][rows])
    p = norm.encode(reference[rows]) - norm.encode(torch.zeros_like(reference[rows]))
    o = path_outputs(model, x)
    r = x - o["sae"]
    nfm_out = sum(o[q] for q in model.PATHS if q != "sae")
    idx, val = model.sae.encode(x)
    latent_of, cos = groundtruth.match_latents(model.sae.W_dec.detach() * norm.scale, truth["directions"])
    return {
        "absorbed_by_sae": groundtruth.share(o["sae"], p), "left_in_residual": groundtruth.share(r, p),
        "planted_share_of_x": groundtruth.share(x, p),
        "recovered": {"nfm_interaction": groundtruth.share(o["interaction"], p), "nfm_whole": groundtruth.share(nfm_out, p),
                      **({"nfm_linear": groundtruth.share(o["linear"], p)} if "linear" in o else {})},
        "residual_reduction": {"nfm": 1 - float((r - nfm_out).pow(2).sum() / r.pow(2).sum()),
                               # the linear path mean-ablated (its training mean), as part2 reports the sequential NFM
                               "nfm_interaction_only": 1 - float((r - combine_paths(o, ("interaction",), inter)).pow(2).sum()
                                                                 / r.pow(2).sum())},
        "fvu_full": float((x - o["sae"] - nfm_out).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
        "decoder_match_mean_max_cosine": float(cos.mean()),
        "pair_ranking": groundtruth.pair_ranking(inter, latent_of,
                                                 groundtruth.typical_values(idx, val, model.sae.cfg.n_latents),
                                                 truth["pairs"], truth["decoy_pairs"], truth["true_acts"]),
        "n_test_rows": int(rows.numel()),
    }


def run_oracle(data_dir, reference, truth_of_data, truth_planted, args) -> dict:
    """NFM on the true activations, target x - sum_i a_i d_i; scored on the same held-out test rows, and on
    the planted data's pairs and decoys."""
    acts, docs = load_activation_file(f"{data_dir}/activations.safetensors", "--activations")
    (tr, _), (val, vdocs) = split_rows(acts, docs)
    n_tr, n = tr.shape[0], acts.shape[0]
    a, D = truth_of_data["true_acts"], truth_of_data["directions"]
    idx, val_c = groundtruth.oracle_codes(a)
    target = acts.float() - a @ D
    vrows = torch.arange(n_tr, n)
    (sel_rows,), (test_rows,) = split_selection_test(vrows, vdocs)
    torch.manual_seed(args.seed)
    nfm = NFM(NFMConfig(n_features=a.shape[1], d=acts.shape[1], dim=args.nfm_dim, hidden=args.nfm_dim))
    steps = max(1, int(args.epochs * n_tr / 1024))
    train_nfm(nfm, (idx[:n_tr], val_c[:n_tr], target[:n_tr]), (idx[sel_rows], val_c[sel_rows], target[sel_rows]),
              steps, 1024, 1e-3, max(1, steps // 20), args.seed)
    inter = predict(nfm, idx[test_rows], val_c[test_rows], ("interaction",))
    whole = predict(nfm, idx[test_rows], val_c[test_rows])
    p = reference[test_rows]
    return {"recovered": {"nfm_interaction": groundtruth.share(inter, p), "nfm_whole": groundtruth.share(whole, p)},
            "r2_of_planted": groundtruth.r2(whole, p),
            "pair_ranking": groundtruth.pair_ranking(nfm, torch.arange(a.shape[1]),
                                                     groundtruth.typical_values(idx[:n_tr], val_c[:n_tr], a.shape[1]),
                                                     truth_planted["pairs"], truth_planted["decoy_pairs"], a)}


def table(results: dict) -> list[list]:
    rows = []
    for setting in ("realistic", "no_absorption"):
        for method in ("nfm_interaction", "nfm_whole", *controls.CONTROLS):
            row = [setting, method]
            for data in ("planted", "null"):
                r = results[setting][data]
                red = r["residual_reduction"][{"nfm_interaction": "nfm_interaction_only", "nfm_whole": "nfm"}.get(method, method)]
                auc = r["pair_ranking"]["auc"] if method.startswith("nfm") else None
                row += [r["absorbed_by_sae"], r["left_in_residual"], r["recovered"][method], red, auc]
            rows.append(row)
        row = [setting, "conjunction_detector"]        # reads the SAE's own latents: nothing recovered or reduced
        for data in ("planted", "null"):
            r = results[setting][data]
            row += [r["absorbed_by_sae"], r["left_in_residual"], None, None, r["conjunction_detector"]["auc"]]
        rows.append(row)
    for setting in ("joint", "joint_poly"):                       # poly: "nfm_*" = its polynomial terms
        for method in ("nfm_interaction", "nfm_whole"):
            row = [setting, method]
            for data in ("planted", "null"):
                r = results[setting][data]
                red = r["residual_reduction"]["nfm_interaction_only" if method == "nfm_interaction" else "nfm"]
                row += [r["absorbed_by_sae"], r["left_in_residual"], r["recovered"][method], red, r["pair_ranking"]["auc"]]
            rows.append(row)
    for method in ("nfm_interaction", "nfm_whole"):
        row = ["oracle", method]
        for data in ("planted", "null"):
            r = results["oracle"][data]
            row += [None, None, r["recovered"][method], None, r["pair_ranking"]["auc"]]
        rows.append(row)
    return rows


COLS = ["absorbed", "left", "recovered", "resid_red", "pair_AUC"]


def fmt(v):
    return "   -  " if v is None else f"{v:6.3f}"


def main(argv=None):
    args = cli.parse(build_parser(), argv)
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    t0 = time.time()
    cfg = synthetic.config_from_args(args)
    planted_dir = synthetic.write(out / "data" / "planted", cfg, args.n_samples)
    null_dir = synthetic.write(out / "data" / "null", cfg, args.n_samples, null=True)
    truth_p, _ = synthetic.read_truth(planted_dir)
    truth_n, _ = synthetic.read_truth(null_dir)
    reference = truth_p["planted"]            # the planted component; on null data it is absent by construction

    common = ["--seed", str(args.seed), "--device", args.device, "--epochs", str(args.epochs)]
    for name, data in (("sae_planted", planted_dir), ("sae_null", null_dir)):
        run_stage(part1, ["--activations", f"{data}/activations.safetensors", "--n-latents", str(args.n_latents),
                          "--k", str(args.k), "--out", str(out / name), *common])
    runs = {("realistic", "planted"): ("sae_planted", planted_dir), ("realistic", "null"): ("sae_null", null_dir),
            ("no_absorption", "planted"): ("sae_null", planted_dir)}
    for data, data_dir, sae in (("planted", planted_dir, "sae_planted"), ("null", null_dir, "sae_null")):
        run_stage(part5, ["--activations", f"{data_dir}/activations.safetensors", "--n-latents", str(args.n_latents),
                          "--k", str(args.k), "--nfm-dim", str(args.nfm_dim), "--baseline-sae", str(out / sae),
                          "--out", str(out / f"joint_{data}"), *common])
        run_stage(part5, ["--activations", f"{data_dir}/activations.safetensors", "--n-latents", str(args.n_latents),
                          "--k", str(args.k), "--nfm-dim", str(args.nfm_dim), "--baseline-sae", str(out / sae),
                          "--decoder", "poly", "--out", str(out / f"poly_{data}"), *common])
    for (setting, data), (sae, data_dir) in runs.items():
        run_stage(part2, ["--sae", str(out / sae), "--activations", f"{data_dir}/activations.safetensors",
                          "--nfm-dim", str(args.nfm_dim), "--out", str(out / f"nfm_{setting}_{data}"), *common])

    results = {"realistic": {}, "no_absorption": {}, "joint": {}, "joint_poly": {}, "oracle": {}}
    for data, data_dir in (("planted", planted_dir), ("null", null_dir)):
        results["joint"][data] = evaluate_joint(out / f"joint_{data}", data_dir, reference, truth_p)
        results["joint_poly"][data] = evaluate_joint(out / f"poly_{data}", data_dir, reference, truth_p)
    for (setting, data), (sae, data_dir) in runs.items():
        results[setting][data] = evaluate_pipeline(out / sae, out / f"nfm_{setting}_{data}", data_dir, reference, truth_p)
        # the absorbed-interaction detector on the same SAE and data (null data: the same pairs and decoys)
        results[setting][data]["conjunction_detector"] = conjunctions.evaluate_against_truth(
            out / sae, data_dir, truth_p if data == "planted" else truth_n)
    # with the SAE fitted to null data, the null run of both settings is the same pipeline
    results["no_absorption"]["null"] = results["realistic"]["null"]
    for data, data_dir, truth in (("planted", planted_dir, truth_p), ("null", null_dir, truth_n)):
        results["oracle"][data] = run_oracle(data_dir, reference, truth, truth_p, args)
    for setting in ("realistic", "no_absorption", "joint", "joint_poly"):
        r = results[setting]
        r["excess_over_null"] = {k: r["planted"]["residual_reduction"][k] - r["null"]["residual_reduction"][k]
                                 for k in r["planted"]["residual_reduction"]}
        left = r["planted"]["left_in_residual"]
        r["nfm_recovered_share_of_what_was_left"] = r["planted"]["recovered"]["nfm_whole"] / left
    # pair_AUC's negatives are the decoys; their co-activation rate (true activations, the same in every run)
    # against the planted pairs' shows that they are matched, and against a random pair's why they must be
    results["pair_ranking_negatives"] = {"planted_pairs": len(truth_p["pairs"]),
                                         "decoy_pairs": len(truth_p["decoy_pairs"]),
                                         "coactive_rate": results["oracle"]["planted"]["pair_ranking"]["coactive_rate"]}

    rows = table(results)
    header = ["setting", "method"] + [f"{d}:{c}" for d in ("planted", "null") for c in COLS]
    with open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    cli.write_json(out / "results.json", {"config": {**vars(args)}, "synthetic": cfg.__dict__, "results": results,
                                          "definitions": groundtruth.__doc__, "seconds": time.time() - t0})
    labels = [f"{r[0]}\n{r[1]}" for r in rows]
    png = plots.grouped_bars(labels, {"planted": [r[4] for r in rows], "null": [r[9] for r in rows]},
                             out / "recovered_share.png",
                             "share of the planted interaction recovered (held-out rows)", "recovered share")
    print("\nheld-out test rows; absorbed/left = SAE; recovered = projection onto the planted component; "
          "resid_red = residual MSE reduction")
    print(f"{'setting':14s} {'method':21s} | " + " ".join(f"{c:>6s}" for c in COLS) + " | "
          + " ".join(f"{c:>6s}" for c in COLS))
    print(f"{'':36s} | {'planted':^34s} | {'null':^34s}")
    for r in rows:
        print(f"{r[0]:14s} {r[1]:21s} | " + " ".join(fmt(v) for v in r[2:7]) + " | " + " ".join(fmt(v) for v in r[7:12]))
    for setting in ("realistic", "no_absorption", "joint", "joint_poly"):
        ex = results[setting]["excess_over_null"]
        ctl = "".join(f", {c} {ex[c]:+.3f}" for c in controls.CONTROLS if c in ex)
        print(f"{setting}: excess residual reduction over null: NFM {ex['nfm']:+.3f}{ctl}; NFM recovered "
              f"{results[setting]['nfm_recovered_share_of_what_was_left']:.2f} of what the SAE (path) left in the residual")
    neg = results["pair_ranking_negatives"]
    co, oracle_null = neg["coactive_rate"], results["oracle"]["null"]["pair_ranking"]
    print(f"pair_AUC: {neg['planted_pairs']} planted pairs vs {neg['decoy_pairs']} decoys (chance 0.5 +- "
          f"{oracle_null['auc_chance_sd']:.2f}), co-active in {co['planted']:.2%} vs {co['decoys']:.2%} of rows (a "
          f"random pair {co['all_pairs']:.2%}); oracle on null data against all pairs instead: "
          f"{oracle_null['auc_vs_all_pairs']:.2f}")
    for setting in ("realistic", "no_absorption"):
        cd = {d: results[setting][d]["conjunction_detector"] for d in ("planted", "null")}
        print(f"{setting}: conjunction detector (absorbed interactions, common/conjunctions.py): planted pairs vs decoys "
              f"AUC {cd['planted']['auc']:.3f}, precision@P {cd['planted']['precision_at_P']:.2f} "
              f"({cd['planted']['n_detected_on_planted_pairs']} planted pairs, {cd['planted']['n_detected_on_decoys']} "
              f"decoys flagged); null data AUC {cd['null']['auc']:.3f}, precision@P {cd['null']['precision_at_P']:.2f}")
    seq, jnt = results["realistic"]["planted"]["recovered"]["nfm_whole"], results["joint"]["planted"]["recovered"]["nfm_whole"]
    results["joint_vs_sequential_total_recovered"] = {"sequential_realistic": seq, "joint": jnt}
    print(f"share of the total planted interaction recovered by the NFM paths: joint {jnt:.3f} vs sequential {seq:.3f}")
    print(f"({time.time() - t0:.0f} s)")
    cli.report(out, out / "results.json", [out / "results.csv", png])


if __name__ == "__main__":
    cli.run_main(main)
