"""part9: clamp an integration (secondary SAE) feature or a primary SAE feature inside the LM and test whether
the logits of 2x2 word buckets (e.g. formal/casual x emotional/neutral) shift non-additively.

The splice is at the layer the models were trained on and is error-preserving ("delta clamp"): the clamped
feature changes the reconstruction by delta, and the LM receives h + delta, so the SAE/NFM reconstruction
error of the unclamped activation is kept and an unclamped (or multiplier-1) run reproduces the model
exactly. For a secondary feature s: delta = scale * (q(u + du) - q(u)), du = the change of the secondary
SAE's reconstruction of u when s's value is multiplied (or set, --set-value), q the NFM's interaction
output from its hidden layer u. The model path is the sequential SAE + NFM, or the joint model (--joint).
For a primary feature i: delta = scale * (change of SAE + NFM output when f_i is multiplied or set).

Design and tests. The response is the logit change (clamped - unclamped) at the last prompt position of every
bucket word. Formality and emotion are properties of the *word*, and every word is measured under every
prompt, so neither the (prompt, word) pair nor the word alone is an independent observation (Clark 1973,
"the language-as-fixed-effect fallacy"). Per multiplier and effect (A, B, A:B; contrasts in the declared
level order, common/stats.py):
  by_word      F1: the 2x2 between-word ANOVA contrast on each word's mean change over prompts, df (1, words - 4)
  by_prompt    F2: each prompt's contrast over its words, one-sample t across prompts, df (1, prompts - 1)
  min_F_prime  min F' = F1 F2 / (F1 + F2) (Clark's conservative bound on the quasi-F)
  p            the headline: the largest of the three p values; F, estimate and 95% CI come from min F'
               (se^2 = se_word^2 + se_prompt^2). tests/test_stats_design.py simulates crossed word and prompt
               random effects: this p rejects a true null at <= 7%, where the per-observation ANOVA with the
               prompt as a block (what this stage used to run) rejects at 63-77%.
Specificity: the same clamps on --null-features other features of the same space with the firing frequency on
the prompts closest to the target's; the target's interaction min F' is placed in their distribution
(empirical p = (1 + #{null >= target}) / (1 + N), percentile), plotted in null_distribution.png. A
linear-path control moves h by the same norm along the NFM linear path's output minus its training mean
(mean-ablation: the path's constant offset is no direction).
No double dipping: the prompts are the *test* half of the --prompts stimulus set (common/stimuli.py halves);
part8 picks features on the selection half. The default --feature is taken from a part8 run on the very
models given here (its recorded content hashes), and refused otherwise.
Greedy and sampled continuations (KV cache) under each target clamp are written as text.

Demo (after part8):
    python part9_clamping_intervention.py
Joint model (after part5, part3 --joint and part8 --joint):
    python part9_clamping_intervention.py --joint checkpoints/part5_joint --secondary checkpoints/part3_secondary_sae_joint --part8 checkpoints/part8_stimuli_joint --out checkpoints/part9_clamp_joint
Paper setup:
    python part9_clamping_intervention.py --preset paper --sae checkpoints/paper/part1_sae --nfm checkpoints/paper/part2_nfm --secondary checkpoints/paper/part3_secondary_sae --part8 checkpoints/paper/part8_stimuli --out checkpoints/paper/part9_clamp

Writes to --out: metrics.json, anova.csv, null_features.csv, interaction_lines.png, cell_heatmap.png,
effect_by_multiplier.png, word_scatter.png, null_distribution.png, generations.txt.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import cli, plots, recipe
from common.data import batch_sequences, collect_sentences, keep_mask
from common.hooks import splice
from common.loading import load_model_path
from common.models import load_model
from common.stats import crossed_contrasts, reference_clamping_anova
from common.stimuli import bucket_token_ids, load_stimuli, load_word_buckets

ROOT = Path(__file__).resolve().parent
EFFECTS = ("A", "B", "A:B")


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/part9_clamp")
    p.add_argument("--sae", default="checkpoints/part1_sae", help="part1 output folder (default: checkpoints/part1_sae)")
    p.add_argument("--nfm", default="checkpoints/part2_nfm", help="part2 output folder (default: checkpoints/part2_nfm)")
    p.add_argument("--joint", default=None,
                   help="part5 output folder: clamp in the joint model instead (its SAE and NFM paths replace --sae/--nfm; "
                        "--secondary must then be a part3 --joint run)")
    p.add_argument("--secondary", default="checkpoints/part3_secondary_sae",
                   help="part3 output folder, for clamping integration features (default: checkpoints/part3_secondary_sae)")
    p.add_argument("--kind", choices=["secondary", "primary"], default="secondary", help="which feature space (default: secondary)")
    p.add_argument("--feature", type=int, default=None,
                   help="the feature to clamp (default: the top interaction feature of --part8's run on these same models)")
    p.add_argument("--part8", default="checkpoints/part8_stimuli",
                   help="part8 output folder used to pick --feature; it must have been run on the same models "
                        "(default: checkpoints/part8_stimuli)")
    p.add_argument("--multipliers", type=float, nargs="+", default=[0.0, 1.0, 4.0, 8.0],
                   help="values the feature's activation is multiplied by (default: 0 1 4 8)")
    p.add_argument("--set-value", type=float, default=None,
                   help="instead of multiplying, set the feature to this value on every token (fires it where it was off)")
    p.add_argument("--null-features", type=int, default=50,
                   help="other features of the same space, with the firing frequency on the prompts closest to the "
                        "target's, clamped the same way to place the target's interaction statistic in their "
                        "distribution; 0 turns it off (default: 50)")
    p.add_argument("--buckets", default=str(ROOT / "stimuli" / "demo_word_buckets.json"),
                   help="2x2 word buckets (default: stimuli/demo_word_buckets.json)")
    p.add_argument("--multi-token", choices=["first", "exclude"], default="first",
                   help="a word of several tokens is scored by its first token, or excluded (default: first)")
    p.add_argument("--prompts", default=str(ROOT / "stimuli" / "demo_formality_emotion.json"),
                   help="a stimulus set whose test-half sentences (all cells) serve as prompts (default: the demo stimuli)")
    p.add_argument("--n-prompts", type=int, default=40,
                   help="prompts used, taken evenly from the cells' test halves (default: 40)")
    p.add_argument("--lm-batch-size", type=int, default=32, help="prompts per LM forward pass (default: 32)")
    cli.add_defect_args(p, "part9")
    p.add_argument("--generate-tokens", type=int, default=20, help="tokens per continuation; 0 skips generation (default: 20)")
    return p


class Clamp:
    """Error-preserving delta for the kept positions h [n, d] (LM units)."""

    def __init__(self, sae, norm, nfm, sec, unorm, kind, feature, mult=None, value=None, mode="feature"):
        self.sae, self.norm, self.nfm, self.sec, self.unorm = sae, norm, nfm, sec, unorm
        self.kind, self.feature, self.mult, self.value, self.mode = kind, feature, mult, value, mode

    def _change(self, idx, val):
        """New code values for the clamped feature (in the top-k slots; --set-value adds it where absent)."""
        hit = idx == self.feature
        new = val.clone()
        if self.value is not None:
            new[hit] = self.value
            missing = ~hit.any(1)
            if missing.any():                               # replace the weakest slot so the feature fires
                j = val[missing].argmin(1)
                rows = missing.nonzero().squeeze(1)
                idx = idx.clone()
                idx[rows, j] = self.feature
                new[rows, j] = self.value
        else:
            new[hit] = val[hit] * self.mult
        return idx, new

    @torch.no_grad()
    def delta(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm.encode(h)
        idx, val = self.sae.encode(x)
        if self.kind == "primary":
            i2, v2 = self._change(idx, val)
            before = self.sae.decode(idx, val) + self.nfm(idx, val)
            after = self.sae.decode(i2, v2) + self.nfm(i2, v2)
            d = after - before
        else:
            u = self.nfm.hidden(idx, val)
            si, sv = self.sec.encode(self.unorm.encode(u))
            si2, sv2 = self._change(si, sv)
            du = (self.sec.decode(si2, sv2) - self.sec.decode(si, sv)) * self.unorm.scale
            d = self.nfm.interaction_from_hidden(u + du) - self.nfm.interaction_from_hidden(u)
        if self.mode == "linear_control":
            # the same norm along what the linear path says about this token: its output minus its training
            # mean (the path's constant offset, shared by every token, is no direction of the token)
            lin = self.nfm.linear(idx, val) - self.nfm.path_mean("linear")
            d = torch.nn.functional.normalize(lin, dim=-1) * d.norm(dim=-1, keepdim=True)
        return d * self.norm.scale


def prompt_ids(tok, prompts: list[str]) -> list[list[int]]:
    return [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


@torch.no_grad()
def run_prompts(model, tok, layer, prompts, clamp: Clamp | None, keep_bos: bool, batch_size: int = 32) -> torch.Tensor:
    """Last-position logits [n_prompts, vocab], prompts right-padded in batches, the clamp spliced in at every
    kept (non-pad, non-BOS) position. Right padding leaves every real position's logits as unpadded (causal
    attention never reaches the pads after it)."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs = prompt_ids(tok, prompts)
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        ids, mask = batch_sequences(chunk, pad)
        ids, mask = ids.to(device), mask.to(device)
        keep = keep_mask(tok, mask, keep_bos).to(device)

        def fn(h, keep=keep):
            if clamp is None:
                return h
            h = h.clone()
            h[keep] = h[keep] + clamp.delta(h[keep].float()).to(h.dtype)
            return h

        with splice(model, layer, fn):
            logits = model(input_ids=ids, attention_mask=mask).logits                 # [batch, pos, vocab]
        last = torch.tensor([len(c) - 1 for c in chunk], device=device)
        out.append(logits[torch.arange(len(chunk), device=device), last].float().cpu())
    return torch.cat(out)


def generate(model, tok, layer, prompt, clamp, n_tokens, sample, seed, keep_bos):
    device = next(model.parameters()).device
    ids = torch.tensor(prompt_ids(tok, [prompt]), device=device)

    def fn(h):
        if clamp is None:
            return h
        h = h.clone()
        k = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if h.shape[1] > 1 and not keep_bos:
            k[:, 0] = False                                  # BOS (only present in the first, uncached step)
        h[k] = h[k] + clamp.delta(h[k].float()).to(h.dtype)
        return h

    torch.manual_seed(seed)
    with torch.no_grad(), splice(model, layer, fn):
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=sample,
                           top_k=50 if sample else None, temperature=1.0 if sample else None, use_cache=True,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True)


def feature_from_part8(args, refs: dict) -> tuple[int, dict]:
    """The top interaction feature of --part8, only if part8 ran on the same models (content hashes)."""
    f8 = Path(args.part8) / "metrics.json"
    if not f8.is_file():
        raise cli.UserError(f"no --feature given and no part8 results at {f8}; run part8 first or pass --feature N")
    m8 = json.loads(f8.read_text())
    used = m8.get("models", {})
    space = "secondary" if args.kind == "secondary" else ("joint" if args.joint else "sae")
    mine, theirs = refs.get(space), used.get(space)
    if used.get("path") != refs["path"] or not theirs or theirs.get("content_hash") != mine["content_hash"]:
        theirs_txt = f"the {used.get('path', 'unknown')} model path with {space} {theirs['path']} (hash {theirs['content_hash'][:12]})" \
            if theirs else f"no {space} model of the {refs['path']} path"
        raise cli.UserError(f"--part8 {args.part8} picked its features on {theirs_txt}, but here the {space} is "
                            f"{mine['path']} (hash {mine['content_hash'][:12]}); run part8 on these models"
                            f"{' (part8 --joint ' + args.joint + ')' if args.joint else ''} or pass --feature N")
    if args.kind == "secondary":
        top = m8.get("secondary", {}).get("top_by_interaction_F", [])
    else:
        top = m8["primary"]["top"][m8["factors"]["A:B"]]
    if not top:
        raise cli.UserError(f"{f8} lists no {args.kind} feature with an interaction effect; pass --feature N")
    return int(top[0]["feature"]), {"stimuli": m8.get("stimuli"), "stimulus_split": m8.get("stimulus_split")}


@torch.no_grad()
def firing_frequency(sae, norm, nfm, sec, unorm, acts: torch.Tensor, kind: str, n_feat: int) -> torch.Tensor:
    """Fraction of the prompts' kept tokens on which each feature of the clamped space is active: [n_feat]."""
    idx, val = sae.encode(norm.encode(acts))
    if kind == "secondary":
        idx, val = sec.encode(unorm.encode(nfm.hidden(idx, val)))
    return torch.zeros(n_feat).index_add_(0, idx[val > 0].cpu(), torch.ones(int((val > 0).sum()))) / idx.shape[0]


def null_features(freq: torch.Tensor, target: int, n: int) -> list[int]:
    """The n features (not the target) that fire on the prompts, with log firing frequency closest to the
    target's; ties broken by index."""
    fires = (freq > 0).nonzero().squeeze(1).tolist()
    logf = torch.log(freq.clamp_min(1e-12))
    ranked = sorted((j for j in fires if j != target), key=lambda j: (abs(float(logf[j] - logf[target])), j))
    return ranked[:n]


def word_tests(changes: np.ndarray, cell_a, cell_b, levels_a, levels_b, reference: bool = False) -> dict:
    """The crossed words x prompts tests of one clamp (changes [prompts, words]), or a note if nothing moved;
    reference (--defects pseudo-replicated-anova): also the original study's per-observation statistics."""
    res = {"max_abs_logit_change": float(np.abs(changes).max())}
    if np.allclose(changes, 0):
        res["note"] = "no logit changed (the feature is inactive on these prompts, or the multiplier is 1)"
        return res
    res.update({k: v for k, v in crossed_contrasts(changes, cell_a, cell_b, levels_a, levels_b).items()
                if k in EFFECTS})
    if reference:
        res["reference_anova"] = reference_clamping_anova(changes, cell_a, cell_b, levels_a, levels_b)
    res["word_mean_change"] = changes.mean(0).tolist()
    res["cell_means"] = {f"{la}|{lb}": float(changes[:, (cell_a == la) & (cell_b == lb)].mean())
                         for la in levels_a for lb in levels_b}
    return res


def null_summary(target: dict, nulls: dict[int, dict]) -> dict:
    """Where the target's interaction min F' falls among the null features', per setting."""
    out = {}
    for label, res in target.items():
        if "A:B" not in res:
            continue
        stats = np.array([nulls[j][label]["A:B"]["F"] if "A:B" in nulls[j][label] else 0.0 for j in nulls])
        f = res["A:B"]["F"]
        out[label] = {"target_F": f, "null_F": stats.tolist(), "n_null": len(stats),
                      "empirical_p": float((1 + (stats >= f).sum()) / (1 + len(stats))),
                      "percentile": float((stats < f).mean() * 100) if len(stats) else float("nan"),
                      "null_share_significant_at_05": {e: float(np.mean([nulls[j][label][e]["p"] < 0.05
                                                                          if e in nulls[j][label] else False
                                                                          for j in nulls])) for e in EFFECTS}}
    return out


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="part9")
    pseudo = "pseudo-replicated-anova" in args.defects
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    t0 = time.time()
    buckets = load_word_buckets(args.buckets)          # malformed JSON fails before any model loads
    stim = load_stimuli(args.prompts)
    _, test_half, split = stim.halves()
    per_cell = max(1, args.n_prompts // 4)
    short = [k for k in test_half.cell_keys() if len(test_half.cells[k]) < per_cell]
    if short:
        raise cli.UserError(f"--n-prompts {args.n_prompts} needs {per_cell} prompts per cell, but the test half of "
                            f"{args.prompts} has {len(test_half.cells[short[0]])} in {'|'.join(short[0])}; pass a "
                            f"smaller --n-prompts or a larger stimulus set")
    prompts = [s for key in test_half.cell_keys() for s in test_half.cells[key][:per_cell]]
    mp = load_model_path("part9", sae=args.sae, nfm=args.nfm, joint=args.joint,
                         secondary=args.secondary if args.kind == "secondary" else None)
    sae, norm, nfm, sec, unorm, spec, refs = mp.sae, mp.norm, mp.nfm, mp.sec, mp.unorm, mp.spec, mp.refs
    n_feat = (sec or sae).cfg.n_latents
    picked_by = None
    feature = args.feature
    if feature is None:
        feature, picked_by = feature_from_part8(args, refs)
    if not 0 <= feature < n_feat:
        raise cli.UserError(f"--feature {feature} is out of range: the {args.kind} SAE has {n_feat} latents "
                            f"(0..{n_feat - 1}); pass a feature in that range")

    model, tok, _ = load_model(spec.model, args.dtype, args.device)
    device = next(model.parameters()).device
    for m in (sae, nfm, sec):
        if m is not None:
            m.to(device).eval()
    for n_ in (norm, unorm):
        if n_ is not None:
            n_.to(device)
    ids_by_cell, token_report = bucket_token_ids(buckets, tok, args.multi_token)
    words = [(cell, tid) for cell, tids in ids_by_cell.items() for tid in tids]
    cell_a = np.array([c[0] if isinstance(c, tuple) else c.split("|")[0] for c, _ in words])
    cell_b = np.array([c[1] if isinstance(c, tuple) else c.split("|")[1] for c, _ in words])
    tids = torch.tensor([t for _, t in words])
    levels = (list(buckets.levels_a), list(buckets.levels_b))
    few = [k for k, v in ids_by_cell.items() if len(v) < 2]
    if few:
        raise cli.UserError(f"--buckets {args.buckets}: bucket {'|'.join(few[0])} has {len(ids_by_cell[few[0]])} usable "
                            f"word token(s); the by-word test needs at least 2 per bucket: add single-token words")

    acts, _ = collect_sentences(model, tok, prompts, spec.layer, spec.keep_bos)
    freq = firing_frequency(sae, norm, nfm, sec, unorm, acts.to(device), args.kind, n_feat)
    nulls = null_features(freq, feature, args.null_features)

    def clamp_changes(feat, mode, how, x) -> np.ndarray:
        c = Clamp(sae, norm, nfm, sec, unorm, args.kind, feat, mult=x if how == "mult" else None,
                  value=x if how == "set" else None, mode=mode)
        logits = run_prompts(model, tok, spec.layer, prompts, c, spec.keep_bos, args.lm_batch_size)[:, tids]
        return (logits - base).numpy()                                                   # [prompts, words]

    base = run_prompts(model, tok, spec.layer, prompts, None, spec.keep_bos, args.lm_batch_size)[:, tids]
    settings = [("set", args.set_value)] if args.set_value is not None else [("mult", m) for m in args.multipliers]
    results: dict[str, dict] = {"target": {}, "linear_path_control": {}}
    null_results: dict[int, dict] = {j: {} for j in nulls}
    gens = []
    jobs = [("target", feature, "feature"), ("linear_path_control", feature, "linear_control")] + \
           [(j, j, "feature") for j in nulls]
    bar = tqdm(total=len(jobs) * len(settings), desc="clamps", unit="clamp")
    for name, feat, mode in jobs:
        for how, x in settings:
            label = f"{how}={x:g}"
            res = word_tests(clamp_changes(feat, mode, how, x), cell_a, cell_b, *levels, reference=pseudo)
            (null_results[name] if isinstance(name, int) else results[name])[label] = res
            bar.update(1)
            if name == "target" and args.generate_tokens > 0:
                c = Clamp(sae, norm, nfm, sec, unorm, args.kind, feat, mult=x if how == "mult" else None,
                          value=x if how == "set" else None)
                for sample in (False, True):
                    text = generate(model, tok, spec.layer, prompts[0], c, args.generate_tokens, sample, args.seed, spec.keep_bos)
                    gens.append(f"[{label}, {'sampled' if sample else 'greedy'}] {prompts[0]} || {text}")
    bar.close()
    specificity = null_summary(results["target"], null_results) if nulls else {}
    metrics = {"stage": "part9_clamping_intervention", "kind": args.kind, "feature": feature,
               "feature_picked_by": "part8 (selection half of its stimuli)" if picked_by else "--feature",
               "part8": picked_by, "models": refs,
               "model_path": "joint " + args.joint if args.joint else "sequential " + args.nfm,
               "prompts": {"stimuli": args.prompts, "half": "test", "per_cell": per_cell, "stimulus_split": split},
               "n_prompts": len(prompts), "n_words": len(words), "levels": {"A": levels[0], "B": levels[1]},
               "word_tokens": token_report, "conditions": results,
               "null_features": {"features": nulls, "firing_frequency_target": float(freq[feature]),
                                 "firing_frequency_null": [float(freq[j]) for j in nulls],
                                 "specificity": specificity},
               "reference_defects": recipe.defects_record(args.defects),
               "definitions": __doc__.split("Demo")[0].strip(), "seconds": time.time() - t0}
    cli.write_json(out / "metrics.json", metrics)
    rows = write_tables(out, results, null_results)
    (out / "generations.txt").write_text("\n".join(gens) + "\n")
    pngs = plots.clamp_plots(results, *levels, out)
    if specificity:
        pngs.append(plots.null_distribution(specificity, out / "null_distribution.png",
                                            f"{args.kind} feature {feature} vs {len(nulls)} null features"))
    print(f"clamping {args.kind} feature {feature} on {len(prompts)} test-half prompts x {len(words)} bucket words; "
          f"{len(nulls)} null features of similar firing frequency")
    for r in rows:
        print(f"  {r[0]:22s} {r[1]:9s} interaction min F' {r[2]:7.2f}  p {r[3]:.3g} (by word {r[4]:.3g}, by prompt "
              f"{r[5]:.3g})  contrast {r[6]:+.5f} [{r[7]:+.5f}, {r[8]:+.5f}]")
    if pseudo:
        for name in ("target", "linear_path_control"):
            for label, r in results[name].items():
                if "reference_anova" in r:
                    ra = r["reference_anova"]["A:B"]
                    print(f"  {name:22s} {label:9s} REFERENCE (pseudo-replicated) interaction F({ra['df'][0]}, "
                          f"{ra['df'][1]}) {ra['F']:7.2f}  p {ra['p']:.3g}  effect {ra['effect']:.5f}")
    for label, s in specificity.items():
        print(f"  target {label}: interaction min F' at the {s['percentile']:.0f}th percentile of {s['n_null']} null "
              f"features (empirical p {s['empirical_p']:.3g})")
    cli.report(out, out / "metrics.json", [out / "anova.csv", out / "null_features.csv", out / "generations.txt", *pngs])


def write_tables(out: Path, results: dict, null_results: dict) -> list[list]:
    """anova.csv (target and linear-path control per setting) and null_features.csv; returns anova's rows."""
    rows = []
    for cname, per in results.items():
        for label, res in per.items():
            if "A:B" in res:
                r = res["A:B"]
                rows.append([cname, label, r["F"], r["p"], r["by_word"]["p"], r["by_prompt"]["p"], r["estimate"], *r["ci"],
                             r["partial_eta_sq"], res["A"]["p"], res["B"]["p"], res["max_abs_logit_change"]])
    with open(out / "anova.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "setting", "minF_interaction", "p_interaction", "p_by_word", "p_by_prompt",
                    "interaction_contrast", "ci_lo", "ci_hi", "partial_eta_sq_by_word", "p_A", "p_B", "max_abs_logit_change"])
        w.writerows(rows)
    with open(out / "null_features.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["feature", "setting", "minF_interaction", "p_interaction", "p_A", "p_B", "max_abs_logit_change"])
        for j, per in null_results.items():
            for label, res in per.items():
                w.writerow([j, label, res["A:B"]["F"] if "A:B" in res else "", res["A:B"]["p"] if "A:B" in res else "",
                            res["A"]["p"] if "A" in res else "", res["B"]["p"] if "B" in res else "",
                            res["max_abs_logit_change"]])
    return rows


if __name__ == "__main__":
    cli.run_main(main)
