"""part8: 2x2 stimulus-response discovery (e.g. formality x emotion): which primary SAE features respond to
each factor, which integration features (NFM embedding dimensions, secondary SAE features) respond to
their combination, and which primary-feature *pairs* drive each integration feature.

  - Halves: the stimulus set is split by sentence within each cell (common/stimuli.py StimulusSet.halves,
    deterministic, recorded in metrics.json). Every feature is *selected* on the selection half; the test
    half confirms the selected features (held_out_confirmation) and is what part9 clamps on, so nothing is
    tested on the sentences that picked it (Kriegeskorte et al. 2009).
  - Per sentence, each feature's value is its mean (or max, --aggregate) over the sentence's tokens, BOS
    excluded, through the same layer hook and normalisation as training (common/data.collect_sentences).
  - Primary features: a type-II two-way ANOVA per feature (A, B, A x B, plus the stimulus set's blocking
    factor as an additive term when it declares one, e.g. the English set's matched topics), with
    permutation p-values (the 2x2 labels permuted within blocks; common/stats.permutation_anova_many, valid
    for zero-heavy per-sentence values where the F-test is not) and Benjamini-Hochberg FDR across features
    per effect, on both. The top features per main effect and for the interaction (by F), and the lowest-F
    active features as counter-examples.
  - NFM embedding dimensions of the bi-interaction vector p (per sentence mean), ranked three ways:
    combined weight |v_a,k v_b,k| of the top factor-A and factor-B primary features; |interaction contrast|
    of p_k; variance of p_k's four cell means.
  - Secondary SAE features (part3): the same tests on their per-sentence values, ranked by interaction F
    and by overall F.
  - Pair attribution: p = sum_{i<j} f_i f_j (v_i * v_j) exactly, and the secondary SAE's pre-activation is
    affine in p (through W_1 and u's normalisation), so each pair's contribution to an integration
    feature's pre-activation is exact: f_i f_j w^T (v_i * v_j). Pairs are ranked by that contribution,
    averaged over the selection-half tokens where both are active. At K 1024 (523,776 pairs per token) the
    ranking is searched through a weighted Gram of the codes, latents of largest bound first, and "exact"
    records whether the bound certified it (pair_attribution; up to 8,192 latents are searched).
  - NFM output boxplots show each path minus its mean output on training tokens (mean-ablation: the paths
    carry constant offsets that cancel), on the test half.
  - --joint: the joint model's SAE and NFM paths replace --sae/--nfm, and --secondary must be a part3 --joint
    run. A PolySAE joint model (part5 --decoder poly) stands in for the NFM through its pairwise factors u_i =
    U[i, :R2] (common/poly.py): the "NFM dimensions" are the coordinates of p = sum_{i<j} f_i f_j (u_i * u_j), and
    its quadratic representation is a^2 = 2 p + sum_i f_i^2 u_i^2, so the pair attribution of a secondary feature
    is exact for the pairwise cross terms of the quadratic block; its self terms and cubic (triple) block are not
    attributed to pairs. Only the interaction path is boxplotted (it has no linear path). metrics.json records
    the content hash of every model used ("models"), so part9 takes its default feature only from a part8 run
    on the same models.

Demo (after part1-part3):
    python part8_stimulus_response.py
Joint model (after part5 and part3 --joint):
    python part8_stimulus_response.py --joint checkpoints/part5_joint --secondary checkpoints/part3_secondary_sae_joint --out checkpoints/part8_stimuli_joint
Paper setup (the shipped English stimuli):
    python part8_stimulus_response.py --preset paper --sae checkpoints/paper/part1_sae --nfm checkpoints/paper/part2_nfm --secondary checkpoints/paper/part3_secondary_sae --out checkpoints/paper/part8_stimuli

Writes to --out: metrics.json, primary_anova.csv, secondary_anova.csv, boxplots_features.png,
boxplots_nfm_outputs.png.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch

from common import cli, plots
from common.data import collect_sentences, per_sentence, per_sentence_codes
from common.loading import load_model_path
from common.models import load_model
from common.pairs import pair_attribution, secondary_direction
from common.sae import encode_all
from common.stats import benjamini_hochberg, n_perm_for_fdr, permutation_anova_many
from common.stimuli import length_warnings, load_stimuli
from common.train import batched, module_device

ROOT = Path(__file__).resolve().parent
TERMS = ("A", "B", "A:B")


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/part8_stimuli")
    p.add_argument("--sae", default="checkpoints/part1_sae", help="part1 output folder (default: checkpoints/part1_sae)")
    p.add_argument("--nfm", default="checkpoints/part2_nfm", help="part2 output folder; '' to skip (default: checkpoints/part2_nfm)")
    p.add_argument("--joint", default=None,
                   help="part5 output folder: analyse the joint model instead (its SAE and NFM paths replace --sae/--nfm; "
                        "--secondary must then be a part3 --joint run)")
    p.add_argument("--secondary", default="checkpoints/part3_secondary_sae",
                   help="part3 output folder (trained on --nfm, or on --joint); '' to skip (default: checkpoints/part3_secondary_sae)")
    p.add_argument("--stimuli", default=str(ROOT / "stimuli" / "demo_formality_emotion.json"),
                   help="2x2 stimulus set (format: stimuli/README.md) (default: stimuli/demo_formality_emotion.json)")
    p.add_argument("--generate-stimuli", default=None, metavar="DESCRIPTION",
                   help="first ask Claude (ANTHROPIC_API_KEY) for a new formality x emotion style set from this short "
                        "description of the two factors, validate it and save it to --stimuli (which must not exist yet)")
    p.add_argument("--factors", default="formality:formal,casual;emotion:emotional,neutral",
                   help="factor names and levels for --generate-stimuli (default: formality:formal,casual;emotion:emotional,neutral)")
    p.add_argument("--claude-model", default=None, help="Claude model for --generate-stimuli (default: common.claude.DEFAULT_MODEL)")
    p.add_argument("--aggregate", choices=["mean", "max"], default="mean", help="per-sentence value of a feature (default: mean)")
    p.add_argument("--n-perm", type=int, default=None,
                   help="permutations for the permutation p-values (default: enough that the smallest attainable p "
                        "is below the first BH threshold 0.05 / features, at least 1999, at most 50000)")
    p.add_argument("--top", type=int, default=10, help="features / dimensions / pairs listed per ranking (default: 10)")
    p.add_argument("--lm-batch-size", type=int, default=32, help="sentences per LM forward pass (default: 32)")
    return p


def anova_table(values: np.ndarray, a, b, block, levels, active: np.ndarray, n_perm: int | None, seed: int) -> dict:
    """Per active column: F-test and permutation p for A, B, A:B (+ block), with BH q-values on each across the
    active columns (constant columns are skipped). Returns {term: {"F", "p", "q", "p_perm", "q_perm", "eta"}}
    of full-width arrays (NaN where inactive), plus the permutation count."""
    m = int(active.sum())
    n_perm = n_perm or n_perm_for_fdr(m)
    res = permutation_anova_many(values[:, active], a, b, *levels, block=block, n_perm=n_perm, seed=seed)
    # BH's first threshold is q / m: below the smallest attainable permutation p, the top-ranked feature could
    # never be declared significant by permutation alone (said, so a reader sees when --n-perm is too small)
    full = {"n_perm": n_perm, "balanced_within_blocks": res["balanced_within_blocks"],
            "permutation_resolution": {"min_attainable_p": 1 / (1 + n_perm), "first_bh_threshold": 0.05 / max(m, 1),
                                       "resolves_first_bh_threshold": 1 / (1 + n_perm) <= 0.05 / max(m, 1)}}
    for t in (*TERMS, "overall"):
        cols = {k: np.full(values.shape[1], np.nan) for k in ("F", "p", "q", "p_perm", "q_perm", "eta")}
        cols["F"][active], cols["p"][active] = res[t]["F"], res[t]["p_F"]
        cols["q"][active] = benjamini_hochberg(res[t]["p_F"])
        if t != "overall":
            cols["p_perm"][active] = res[t]["p_perm"]
            cols["q_perm"][active] = benjamini_hochberg(res[t]["p_perm"])
            cols["eta"][active] = res[t]["partial_eta_sq"]
        full[t] = cols
    return full


def ranking(tab: dict, term: str, top: int, lowest: bool = False) -> list[dict]:
    F = tab[term]["F"]
    order = np.argsort(np.where(np.isnan(F), np.inf if lowest else -np.inf, F), kind="stable")
    order = order if lowest else order[::-1]
    idx = [i for i in order if not np.isnan(F[i])][:top]
    cols = ("p", "q", "p_perm", "q_perm") if term != "overall" else ("p", "q")
    out = []
    for i in idx:
        r = {"feature": int(i), "F": float(F[i]), **{k: float(tab[term][k][i]) for k in cols}}
        if term != "overall":
            r["partial_eta_sq"] = float(tab[term]["eta"][i])
        out.append(r)
    return out


def significant(tab: dict, names: dict) -> dict:
    return {"F_test": {names[t]: int((tab[t]["q"] < 0.05).sum()) for t in TERMS},
            "permutation": {names[t]: int((tab[t]["q_perm"] < 0.05).sum()) for t in TERMS}}


def confirm(values: np.ndarray, a, b, block, levels, features: dict[str, list[int]], seed: int) -> dict:
    """The selected features re-tested on the test half (F and permutation p, no selection there)."""
    out = {}
    for term, feats in features.items():
        feats = [f for f in feats if values[:, f].std() > 1e-9]
        if not feats:
            out[term] = []
            continue
        r = permutation_anova_many(values[:, feats], a, b, *levels, block=block, n_perm=1999, seed=seed)
        out[term] = [{"feature": f, "F": float(r[term]["F"][j]), "p": float(r[term]["p_F"][j]),
                      "p_perm": float(r[term]["p_perm"][j])} for j, f in enumerate(feats)]
    return out


def write_anova_csv(path: Path, tab: dict, active: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        keys = ("F", "p", "q", "p_perm", "q_perm", "eta")
        w.writerow(["feature"] + [f"{t}_{k if k != 'eta' else 'partial_eta_sq'}" for t in TERMS for k in keys])
        for i in np.nonzero(active)[0]:
            w.writerow([int(i)] + [float(tab[t][k][i]) for t in TERMS for k in keys])


def generate_set(args, http_client=None) -> None:
    """--generate-stimuli: Claude writes a set, it is validated, then saved atomically to --stimuli."""
    from common.claude import DEFAULT_MODEL, ClaudeClient, require_api_key
    from common.stimuli import generate_stimuli

    require_api_key()
    target = Path(args.stimuli)
    if target.exists():
        raise cli.UserError(f"--stimuli {target} exists; --generate-stimuli writes a new file, give another path")
    try:
        (fa, la), (fb, lb) = [(x.split(":")[0], x.split(":")[1].split(",")) for x in args.factors.split(";")]
    except (ValueError, IndexError):
        raise cli.UserError(f"--factors {args.factors!r}: use 'nameA:level1,level2;nameB:level1,level2'") from None
    client = ClaudeClient(args.claude_model or DEFAULT_MODEL, Path(args.out) / "claude_cache", http_client=http_client)
    obj = generate_stimuli(client, args.generate_stimuli, fa, la, fb, lb)
    cli.write_json(target, obj)
    print(f"wrote the generated stimulus set to {target}")


def main(argv=None, http_client=None):
    args = cli.parse(build_parser(), argv, stage="part8")
    if args.generate_stimuli:
        generate_set(args, http_client)
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    t0 = time.time()
    stim = load_stimuli(args.stimuli)
    sel_set, test_set, split = stim.halves()
    mp = load_model_path("part8", sae=args.sae, joint=args.joint,
                         nfm=args.nfm if args.nfm and Path(args.nfm).exists() else None,
                         secondary=args.secondary if args.secondary and Path(args.secondary).exists() else None)
    sae, norm, nfm, sec, unorm, spec, refs = mp.sae, mp.norm, mp.nfm, mp.sec, mp.unorm, mp.spec, mp.refs

    model, tok, _ = load_model(spec.model, args.dtype, args.device)
    warnings = length_warnings(stim, tok)            # cells of unequal length confound the factors
    for w in warnings:
        print(f"warning: {w}")
    device = next(model.parameters()).device
    for m in (sae, nfm, sec):
        if m is not None:
            m.to(device).eval()
    names = {"A": stim.factor_a, "B": stim.factor_b, "A:B": f"{stim.factor_a} x {stim.factor_b}"}
    levels = (list(stim.levels_a), list(stim.levels_b))
    half = {name: Half(s, model, tok, spec, sae, norm, args) for name, s in (("selection", sel_set), ("test", test_set))}
    sel, tst = half["selection"], half["test"]

    F_sel, F_test = sel.primary(sae.cfg.n_latents), tst.primary(sae.cfg.n_latents)   # [sentences, n_latents]
    active = F_sel.std(0) > 1e-9
    tab = anova_table(F_sel, sel.a, sel.b, sel.block, levels, active, args.n_perm, args.seed)
    top = {names[t]: ranking(tab, t, args.top) for t in TERMS}
    result = {"stage": "part8_stimulus_response", "stimuli": args.stimuli, "models": refs,
              "stimulus_split": split, "n_sentences": {"selection": sel.n, "test": tst.n},
              "blocking_factor": stim.block_name, "stimulus_warnings": warnings + list(stim.warnings),
              "n_tokens": {"selection": int(sel.idx.shape[0]), "test": int(tst.idx.shape[0])},
              "aggregate": args.aggregate, "factors": names, "levels": {"A": levels[0], "B": levels[1]},
              "n_permutations": tab["n_perm"], "balanced_within_blocks": tab["balanced_within_blocks"],
              "permutation_resolution": tab["permutation_resolution"],
              "primary": {"n_active_features": int(active.sum()), "significant_at_q05": significant(tab, names),
                          "top": top, "counter_examples_lowest_overall_F": ranking(tab, "overall", args.top, lowest=True),
                          "held_out_confirmation": confirm(F_test, tst.a, tst.b, tst.block, levels,
                                                           {t: [r["feature"] for r in top[names[t]]] for t in TERMS},
                                                           args.seed)}}
    write_anova_csv(out / "primary_anova.csv", tab, active)

    box = {f"primary {top[names[t]][0]['feature']} (top {names[t]})": F_test[:, top[names[t]][0]["feature"]]
           for t in TERMS if top[names[t]]}
    nfm_box = None
    if nfm is not None:
        result["nfm_dimensions"] = nfm_dimensions(nfm, sel, levels, top[names["A"]][0]["feature"],
                                                  top[names["B"]][0]["feature"], args.top)
        nfm_box = {f"NFM {path} output - its training mean (norm)": tst.path_norms(nfm, path) for path in nfm.PATHS}
        if sec is not None:
            S_sel, S_test = sel.secondary(nfm, sec, unorm), tst.secondary(nfm, sec, unorm)
            s_active = S_sel.std(0) > 1e-9
            stab = anova_table(S_sel, sel.a, sel.b, sel.block, levels, s_active, args.n_perm, args.seed)
            top_int = ranking(stab, "A:B", args.top)
            result["secondary"] = {
                "n_active_features": int(s_active.sum()), "significant_at_q05": significant(stab, names),
                "top_by_interaction_F": top_int, "top_by_overall_F": ranking(stab, "overall", args.top),
                "counter_examples_lowest_overall_F": ranking(stab, "overall", args.top, lowest=True),
                "held_out_confirmation": confirm(S_test, tst.a, tst.b, tst.block, levels,
                                                 {"A:B": [r["feature"] for r in top_int]}, args.seed),
                "pair_attribution": secondary_pairs(nfm, sec, unorm, sel, top_int[:3], args.top)}
            if hasattr(nfm, "hidden_per_pooled"):           # a PolySAE (common/poly.py)
                result["secondary"]["pair_attribution_scope"] = (
                    "PolySAE: exact for the pairwise cross terms 2 f_i f_j (u_i * u_j) of the quadratic block of h; "
                    "its self terms f_i^2 u_i^2 and its cubic (triple) block are not attributed to pairs")
            write_anova_csv(out / "secondary_anova.csv", stab, s_active)
            if top_int:
                box[f"secondary {top_int[0]['feature']} (top interaction)"] = S_test[:, top_int[0]["feature"]]
    result["seconds"] = time.time() - t0
    result["definitions"] = __doc__.split("Demo")[0].strip()
    cli.write_json(out / "metrics.json", result)
    cells = [f"{la}|{lb}" for la in levels[0] for lb in levels[1]]
    labels = np.array([f"{x}|{y}" for x, y in zip(tst.a, tst.b)])
    pngs = [plots.cell_boxplots(box, labels, cells, tst.a, tst.b, out / "boxplots_features.png")]
    if nfm_box is not None:
        pngs.append(plots.cell_boxplots(nfm_box, labels, cells, tst.a, tst.b, out / "boxplots_nfm_outputs.png"))
    report(result, names)
    cli.report(out, out / "metrics.json", [out / "primary_anova.csv", *pngs])


class Half:
    """One half of the stimulus set: its sentences' activations and SAE codes, and per-sentence values."""

    def __init__(self, stim, model, tok, spec, sae, norm, args):
        rows = stim.rows()
        self.n, self.how = len(rows), args.aggregate
        self.a, self.b = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
        blocks = stim.row_blocks()
        self.block = np.array(blocks) if blocks is not None else None
        acts, self.owner = collect_sentences(model, tok, [r[0] for r in rows], spec.layer, spec.keep_bos,
                                             args.lm_batch_size)
        self.idx, self.val = encode_all(sae, norm.encode(acts))                    # [tokens, k]

    def primary(self, n_latents: int) -> np.ndarray:
        return per_sentence_codes(self.idx, self.val, self.owner, self.n, n_latents, self.how).numpy()

    def secondary(self, nfm, sec, unorm) -> np.ndarray:
        u = batched(nfm.hidden, self.idx, self.val, device=module_device(nfm))
        s_idx, s_val = encode_all(sec, unorm.encode(u))
        return per_sentence_codes(s_idx, s_val, self.owner, self.n, sec.cfg.n_latents, self.how).numpy()

    def path_norms(self, nfm, path: str) -> np.ndarray:
        """Per sentence: mean over tokens of ||path output - its training mean||."""
        y = batched(lambda i, v: nfm(i, v, (path,)), self.idx, self.val, device=module_device(nfm))
        return per_sentence((y - nfm.path_mean(path).cpu()).norm(dim=1, keepdim=True), self.owner, self.n)[:, 0].numpy()


def nfm_dimensions(nfm, sel: Half, levels, fa: int, fb: int, top: int) -> dict:
    """NFM embedding dimensions ranked three ways on the selection half, and the pairs behind the top one."""
    p_tok = batched(nfm.bi_interaction, sel.idx, sel.val, device=module_device(nfm))            # [tokens, dim]
    P = per_sentence(p_tok, sel.owner, sel.n, "mean").numpy()
    V = nfm.V.detach().cpu().numpy()
    cm = np.stack([P[(sel.a == la) & (sel.b == lb)].mean(0) for la in levels[0] for lb in levels[1]])  # [4, dim]
    contrast = (cm[0] - cm[1]) - (cm[2] - cm[3])
    dims = {"combined_weight": np.abs(V[fa] * V[fb]), "max_difference": np.abs(contrast),
            "max_variance_of_cell_means": cm.var(0)}
    out = {m: [{"dim": int(d), "score": float(s[d])} for d in np.argsort(-s, kind="stable")[:top]] for m, s in dims.items()}
    out["top_primary_features_used"] = {"A": fa, "B": fb}
    Vt = nfm.V.detach().cpu()
    d0 = int(out["max_difference"][0]["dim"])
    out["pairs_driving_top_max_difference_dim"] = {
        "dim": d0, **pair_attribution(sel.idx, sel.val, Vt, torch.eye(Vt.shape[1], dtype=Vt.dtype)[d0], top)}
    return out


def secondary_pairs(nfm, sec, unorm, sel: Half, features: list[dict], top: int) -> list[dict]:
    """Exact pair attribution for the top secondary features: their pre-activation is
    W_enc[s] . ((W_1 p + b_1 - shift) / scale - b_dec) + b_enc, affine in p."""
    Vt = nfm.V.detach().cpu()
    return [{"secondary_feature": r["feature"], **pair_attribution(sel.idx, sel.val, Vt,
                                                                  secondary_direction(nfm, sec, unorm, r["feature"]), top)}
            for r in features]


def report(result: dict, names: dict) -> None:
    pr = result["primary"]
    sig = pr["significant_at_q05"]
    n = result["n_sentences"]
    print(f"{n['selection']} selection-half sentences ({n['test']} held out for confirmation), "
          f"{pr['n_active_features']} active primary features; significant at q < 0.05 (F-test / permutation, "
          f"{result['n_permutations']} permutations" + (f" within {result['blocking_factor']}s" if result["blocking_factor"] else "")
          + "): " + ", ".join(f"{k} {sig['F_test'][k]} / {sig['permutation'][k]}" for k in sig["F_test"]))
    for t in TERMS:
        top = pr["top"][names[t]][:3]
        conf = {c["feature"]: c for c in pr["held_out_confirmation"][t]}
        print(f"  top {names[t]}: " + ", ".join(
            f"{r['feature']} (F {r['F']:.1f}, q_perm {r['q_perm']:.2g}; test half F {conf[r['feature']]['F']:.1f})"
            if r["feature"] in conf else f"{r['feature']} (F {r['F']:.1f})" for r in top))
    if "secondary" in result:
        top = result["secondary"]["top_by_interaction_F"][:3]
        conf = {c["feature"]: c for c in result["secondary"]["held_out_confirmation"]["A:B"]}
        print("  top secondary by interaction F: " + ", ".join(
            f"{r['feature']} (F {r['F']:.1f}, q_perm {r['q_perm']:.2g}; test half F "
            f"{conf[r['feature']]['F'] if r['feature'] in conf else float('nan'):.1f})" for r in top))


if __name__ == "__main__":
    cli.run_main(main)
