"""part8: 2x2 stimulus-response discovery (e.g. formality x emotion): which primary SAE features respond to
each factor, which integration features (NFM embedding dimensions, secondary SAE features) respond to
their combination, and which primary-feature *pairs* drive each integration feature.

  - Per sentence, each feature's value is its mean (or max, --aggregate) over the sentence's tokens, BOS
    excluded, through the same layer hook and normalisation as training (common/data.collect_sentences).
  - Primary features: a type-II two-way ANOVA per feature (A, B, A x B; common/stats.two_way_anova_many),
    Benjamini-Hochberg FDR across features per effect; the top features per main effect and for the
    interaction, and the lowest-F active features as counter-examples.
  - NFM embedding dimensions of the bi-interaction vector p (per sentence mean), ranked three ways:
    combined weight |v_a,k v_b,k| of the top factor-A and factor-B primary features; |interaction contrast|
    of p_k; variance of p_k's four cell means.
  - Secondary SAE features (part3): the same ANOVA on their per-sentence values, ranked by interaction F
    and by overall F.
  - Pair attribution: p = sum_{i<j} f_i f_j (v_i * v_j) exactly, and the secondary SAE's pre-activation is
    affine in p (through W_1 and u's normalisation), so each pair's contribution to an integration
    feature's pre-activation is exact: f_i f_j w^T (v_i * v_j). Pairs are ranked by that contribution,
    averaged over the stimulus tokens where both are active.

Demo (after part1-part3):
    python part8_stimulus_response.py
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

from common import checkpoint, cli, plots
from common.data import DataSpec, collect_sentences, per_sentence, per_sentence_codes
from common.models import load_model
from common.nfm import load_nfm_checkpoint
from common.sae import encode_all, load_sae_checkpoint, load_secondary_checkpoint
from common.stats import benjamini_hochberg, two_way_anova_many
from common.stimuli import length_warnings, load_stimuli
from common.train import batched, module_device

ROOT = Path(__file__).resolve().parent


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/part8_stimuli")
    p.add_argument("--sae", default="checkpoints/part1_sae", help="part1 output folder (default: checkpoints/part1_sae)")
    p.add_argument("--nfm", default="checkpoints/part2_nfm", help="part2 output folder; '' to skip (default: checkpoints/part2_nfm)")
    p.add_argument("--secondary", default="checkpoints/part3_secondary_sae",
                   help="part3 output folder (trained on --nfm); '' to skip (default: checkpoints/part3_secondary_sae)")
    p.add_argument("--stimuli", default=str(ROOT / "stimuli" / "demo_formality_emotion.json"),
                   help="2x2 stimulus set (format: stimuli/README.md) (default: stimuli/demo_formality_emotion.json)")
    p.add_argument("--generate-stimuli", default=None, metavar="DESCRIPTION",
                   help="first ask Claude (ANTHROPIC_API_KEY) for a new formality x emotion style set from this short "
                        "description of the two factors, validate it and save it to --stimuli (which must not exist yet)")
    p.add_argument("--factors", default="formality:formal,casual;emotion:emotional,neutral",
                   help="factor names and levels for --generate-stimuli (default: formality:formal,casual;emotion:emotional,neutral)")
    p.add_argument("--claude-model", default=None, help="Claude model for --generate-stimuli (default: common.claude.DEFAULT_MODEL)")
    p.add_argument("--aggregate", choices=["mean", "max"], default="mean", help="per-sentence value of a feature (default: mean)")
    p.add_argument("--top", type=int, default=10, help="features / dimensions / pairs listed per ranking (default: 10)")
    p.add_argument("--lm-batch-size", type=int, default=32, help="sentences per LM forward pass (default: 32)")
    return p


def anova_table(values: np.ndarray, a, b, active: np.ndarray) -> dict:
    """Two-way ANOVA per column, with BH q-values across the active columns (constant columns are skipped)."""
    res = two_way_anova_many(values[:, active], a, b)
    full = {}
    for t in ("A", "B", "A:B", "overall"):
        F = np.full(values.shape[1], np.nan)
        p = np.full(values.shape[1], np.nan)
        eta = np.full(values.shape[1], np.nan)
        q = np.full(values.shape[1], np.nan)
        F[active], p[active], eta[active] = res[t]["F"], res[t]["p"], res[t]["partial_eta_sq"]
        q[active] = benjamini_hochberg(res[t]["p"])
        full[t] = {"F": F, "p": p, "q": q, "eta": eta}
    return full


def ranking(tab: dict, term: str, top: int, lowest: bool = False) -> list[dict]:
    F = tab[term]["F"]
    order = np.argsort(np.where(np.isnan(F), np.inf if lowest else -np.inf, F))
    order = order if lowest else order[::-1]
    idx = [i for i in order if not np.isnan(F[i])][:top]
    return [{"feature": int(i), "F": float(F[i]), "p": float(tab[term]["p"][i]), "q": float(tab[term]["q"][i]),
             "partial_eta_sq": float(tab[term]["eta"][i])} for i in idx]


@torch.no_grad()
def pair_attribution(idx, val, owner, weight_fn, top: int, min_tokens: int = 3) -> list[dict]:
    """Rank primary pairs (i<j) by mean exact contribution weight_fn(i, j) * f_i f_j over the tokens where both
    fire; pairs seen together on fewer than min_tokens tokens are left out (a mean of one token is noise)."""
    k = idx.shape[1]
    iu = torch.triu_indices(k, k, 1)
    a, b = idx[:, iu[0]], idx[:, iu[1]]                                    # [tokens, k(k-1)/2]
    fa, fb = val[:, iu[0]], val[:, iu[1]]
    both = (fa > 0) & (fb > 0)
    lo, hi = torch.minimum(a, b)[both], torch.maximum(a, b)[both]
    contrib = weight_fn(lo, hi) * (fa * fb)[both]
    key = lo * (int(idx.max()) + 1) + hi
    uniq, inv = torch.unique(key, return_inverse=True)
    total = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, contrib.double())
    count = torch.bincount(inv, minlength=len(uniq))
    mean = torch.where(count >= min_tokens, total / count, torch.zeros_like(total))
    order = mean.abs().argsort(descending=True)[:top]
    order = order[count[order] >= min_tokens]
    base = int(idx.max()) + 1
    return [{"pair": [int(uniq[o] // base), int(uniq[o] % base)], "mean_contribution": float(mean[o]),
             "tokens_both_active": int(count[o])} for o in order]


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
    rows = stim.rows()
    sentences = [r[0] for r in rows]
    a = np.array([r[1] for r in rows])
    b = np.array([r[2] for r in rows])
    sae, norm, sae_cfg = load_sae_checkpoint(args.sae)
    spec = DataSpec.from_description(sae_cfg["data"])
    if spec is None:
        raise cli.UserError(f"--sae {args.sae} was trained on an activation file; part8 needs the LM it was trained on")
    nfm = sec = unorm = None
    if args.nfm and Path(args.nfm).exists():
        nfm, nfm_cfg = load_nfm_checkpoint(args.nfm, sae_cfg)
        if args.secondary and Path(args.secondary).exists():
            sec, unorm, sec_cfg = load_secondary_checkpoint(args.secondary)
            checkpoint.check_parent(sec_cfg, "nfm", nfm_cfg, "--secondary", "--nfm")

    model, tok, _ = load_model(spec.model, args.dtype, args.device)
    warnings = length_warnings(stim, tok)            # cells of unequal length confound the factors
    for w in warnings:
        print(f"warning: {w}")
    acts, owner = collect_sentences(model, tok, sentences, spec.layer, spec.keep_bos, args.lm_batch_size)
    device = next(model.parameters()).device
    for m in (sae, nfm, sec):
        if m is not None:
            m.to(device)
    idx, val = encode_all(sae, norm.encode(acts))                              # [tokens, k]
    n_sent, n_lat = len(sentences), sae.cfg.n_latents
    F_primary = per_sentence_codes(idx, val, owner, n_sent, n_lat, args.aggregate).numpy()   # [sentences, n_latents]
    active = F_primary.std(0) > 1e-9
    tab = anova_table(F_primary, a, b, active)
    names = {"A": stim.factor_a, "B": stim.factor_b, "A:B": f"{stim.factor_a} x {stim.factor_b}"}
    result = {"stage": "part8_stimulus_response", "stimuli": args.stimuli, "n_sentences": n_sent,
              "stimulus_warnings": warnings + list(stim.warnings),
              "n_tokens": int(idx.shape[0]), "aggregate": args.aggregate, "factors": names,
              "levels": {"A": stim.levels_a, "B": stim.levels_b},
              "primary": {"n_active_features": int(active.sum()),
                          "significant_at_q05": {names[t]: int((tab[t]["q"] < 0.05).sum()) for t in ("A", "B", "A:B")},
                          "top": {names[t]: ranking(tab, t, args.top) for t in ("A", "B", "A:B")},
                          "counter_examples_lowest_overall_F": ranking(tab, "overall", args.top, lowest=True)}}
    with open(out / "primary_anova.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["feature"] + [f"{t}_{k}" for t in ("A", "B", "A:B") for k in ("F", "p", "q", "partial_eta_sq")])
        for i in np.nonzero(active)[0]:
            w.writerow([int(i)] + [float(tab[t][k][i]) for t in ("A", "B", "A:B") for k in ("F", "p", "q", "eta")])

    box = {}
    for t in ("A", "B", "A:B"):
        top_feature = result["primary"]["top"][names[t]][0]["feature"]
        box[f"primary {top_feature} (top {names[t]})"] = F_primary[:, top_feature]
    if nfm is not None:
        nfm.eval()
        p_tok = batched(nfm.bi_interaction, idx, val, device=module_device(nfm))         # [tokens, dim]
        P = per_sentence(p_tok, owner, n_sent, "mean").numpy()
        fa = result["primary"]["top"][names["A"]][0]["feature"]
        fb = result["primary"]["top"][names["B"]][0]["feature"]
        V = nfm.V.detach().cpu().numpy()
        cm = np.stack([P[(a == la) & (b == lb)].mean(0) for la in stim.levels_a for lb in stim.levels_b])  # [4, dim]
        contrast = (cm[0] - cm[1]) - (cm[2] - cm[3])
        dims = {"combined_weight": np.abs(V[fa] * V[fb]), "max_difference": np.abs(contrast),
                "max_variance_of_cell_means": cm.var(0)}
        result["nfm_dimensions"] = {m: [{"dim": int(d), "score": float(s[d])} for d in np.argsort(-s)[:args.top]]
                                    for m, s in dims.items()}
        result["nfm_dimensions"]["top_primary_features_used"] = {"A": fa, "B": fb}
        W1 = nfm.mlp1.weight.detach().cpu()
        Vt = nfm.V.detach().cpu()
        d0 = int(result["nfm_dimensions"]["max_difference"][0]["dim"])
        result["nfm_dimensions"]["pairs_driving_top_max_difference_dim"] = {
            "dim": d0, "pairs": pair_attribution(idx, val, owner, lambda i, j: Vt[i, d0] * Vt[j, d0], args.top)}
        lin = batched(lambda i, v: nfm(i, v, ("linear",)), idx, val, device=module_device(nfm)).norm(dim=1, keepdim=True)
        inter = batched(lambda i, v: nfm(i, v, ("interaction",)), idx, val, device=module_device(nfm)).norm(dim=1, keepdim=True)
        nfm_box = {"NFM linear output norm": per_sentence(lin, owner, n_sent)[:, 0].numpy(),
                   "NFM interaction output norm": per_sentence(inter, owner, n_sent)[:, 0].numpy()}
        if sec is not None:
            u = batched(nfm.hidden, idx, val, device=module_device(nfm))
            s_idx, s_val = encode_all(sec, unorm.encode(u))
            S = per_sentence_codes(s_idx, s_val, owner, n_sent, sec.cfg.n_latents, args.aggregate).numpy()
            s_active = S.std(0) > 1e-9
            stab = anova_table(S, a, b, s_active)
            top_int = ranking(stab, "A:B", args.top)
            # exact pair attribution for the top secondary feature: its pre-activation is
            # W_enc[s] . ((W_1 p + b_1 - shift) / scale - b_dec) + b_enc, affine in p
            pairs = []
            for r in top_int[:3]:
                s = r["feature"]
                w = (sec.W_enc[s].detach().cpu() / unorm.scale) @ W1                    # [dim]: d pre-act / d p
                pairs.append({"secondary_feature": s, "pairs": pair_attribution(
                    idx, val, owner, lambda i, j, w=w: (Vt[i] * Vt[j]) @ w, args.top)})
            result["secondary"] = {"n_active_features": int(s_active.sum()),
                                   "significant_at_q05": {names[t]: int((stab[t]["q"] < 0.05).sum()) for t in ("A", "B", "A:B")},
                                   "top_by_interaction_F": top_int, "top_by_overall_F": ranking(stab, "overall", args.top),
                                   "counter_examples_lowest_overall_F": ranking(stab, "overall", args.top, lowest=True),
                                   "pair_attribution": pairs}
            with open(out / "secondary_anova.csv", "w", newline="") as f:
                w_ = csv.writer(f)
                w_.writerow(["feature"] + [f"{t}_{k}" for t in ("A", "B", "A:B") for k in ("F", "p", "q", "partial_eta_sq")])
                for i in np.nonzero(s_active)[0]:
                    w_.writerow([int(i)] + [float(stab[t][k][i]) for t in ("A", "B", "A:B") for k in ("F", "p", "q", "eta")])
            if top_int:
                box[f"secondary {top_int[0]['feature']} (top interaction)"] = S[:, top_int[0]["feature"]]
    result["seconds"] = time.time() - t0
    result["definitions"] = __doc__.split("Demo")[0].strip()
    cli.write_json(out / "metrics.json", result)
    cells = [f"{la}|{lb}" for la in stim.levels_a for lb in stim.levels_b]
    labels = np.array([f"{x}|{y}" for x, y in zip(a, b)])
    pngs = [plots.cell_boxplots(box, labels, cells, a, b, out / "boxplots_features.png")]
    if nfm is not None:
        pngs.append(plots.cell_boxplots(nfm_box, labels, cells, a, b, out / "boxplots_nfm_outputs.png"))
    pr = result["primary"]
    print(f"{n_sent} sentences, {int(active.sum())} active primary features; significant at q < 0.05: "
          + ", ".join(f"{k} {v}" for k, v in pr["significant_at_q05"].items()))
    for t in ("A", "B", "A:B"):
        top = pr["top"][names[t]][:3]
        print(f"  top {names[t]}: " + ", ".join(f"{r['feature']} (F {r['F']:.1f}, q {r['q']:.2g})" for r in top))
    if "secondary" in result:
        top = result["secondary"]["top_by_interaction_F"][:3]
        print("  top secondary by interaction F: " + ", ".join(f"{r['feature']} (F {r['F']:.1f}, q {r['q']:.2g})" for r in top))
    cli.report(out, out / "metrics.json", [out / "primary_anova.csv", *pngs])


if __name__ == "__main__":
    cli.run_main(main)
