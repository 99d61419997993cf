"""part9: clamp an integration (secondary SAE) feature or a primary SAE feature inside the LM and test, with a
real two-way ANOVA, whether the logits of 2x2 word buckets (e.g. formal/casual x emotional/neutral) shift
non-additively.

The splice is at the layer the models were trained on and is error-preserving ("delta clamp"): the clamped
feature changes the reconstruction by delta, and the LM receives h + delta, so the SAE/NFM reconstruction
error of the unclamped activation is kept and an unclamped (or multiplier-1) run reproduces the model
exactly. For a secondary feature s: delta = scale * (q(u + du) - q(u)), du = the change of the secondary
SAE's reconstruction of u when s's value is multiplied (or set, --set-value), q the NFM's interaction
output from its hidden layer u. The model path is the sequential SAE + NFM, or the joint model (--joint). For a primary feature i: delta = scale * (change of SAE + NFM output when
f_i is multiplied or set).

Per multiplier, on logit changes (clamped - unclamped) at the last prompt position for every bucket word:
a type-II two-way ANOVA (factor A x factor B, prompt as a blocking factor; common/stats.two_way_anova),
F, p, partial eta^2 and the interaction contrast with its 95% CI; dose-response across multipliers.
Controls: the same clamp on a random feature of similar mean activation, and a linear-path control that
moves h by the same norm along the NFM linear path's output. Greedy and sampled continuations (KV cache)
under each clamp are written as text.

Demo (after part8):
    python part9_clamping_intervention.py
Paper setup:
    python part9_clamping_intervention.py --preset paper --sae checkpoints/paper/part1_sae --nfm checkpoints/paper/part2_nfm --secondary checkpoints/paper/part3_secondary_sae --part8 checkpoints/paper/part8_stimuli --out checkpoints/paper/part9_clamp

Writes to --out: metrics.json, anova.csv, interaction_lines.png, cell_heatmap.png, effect_by_multiplier.png,
word_scatter.png, generations.txt.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import checkpoint, cli, plots
from common.data import DataSpec, keep_mask
from common.hooks import splice
from common.joint import load_joint_checkpoint
from common.models import load_model
from common.nfm import load_nfm_checkpoint
from common.sae import load_sae_checkpoint, load_secondary_checkpoint
from common.stats import two_way_anova
from common.stimuli import bucket_token_ids, load_stimuli, load_word_buckets

ROOT = Path(__file__).resolve().parent


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
                   help="the feature to clamp (default: the top interaction feature of --part8's results)")
    p.add_argument("--part8", default="checkpoints/part8_stimuli", help="part8 output folder used to pick --feature (default: checkpoints/part8_stimuli)")
    p.add_argument("--multipliers", type=float, nargs="+", default=[0.0, 1.0, 4.0, 8.0],
                   help="values the feature's activation is multiplied by (default: 0 1 4 8)")
    p.add_argument("--set-value", type=float, default=None,
                   help="instead of multiplying, set the feature to this value on every token (fires it where it was off)")
    p.add_argument("--buckets", default=str(ROOT / "stimuli" / "demo_word_buckets.json"),
                   help="2x2 word buckets (default: stimuli/demo_word_buckets.json)")
    p.add_argument("--multi-token", choices=["first", "exclude"], default="first",
                   help="a word of several tokens is scored by its first token, or excluded (default: first)")
    p.add_argument("--prompts", default=str(ROOT / "stimuli" / "demo_formality_emotion.json"),
                   help="a stimulus set whose sentences (all cells) serve as prompts (default: the demo stimuli)")
    p.add_argument("--n-prompts", type=int, default=40, help="prompts used, taken evenly from the cells (default: 40)")
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
        if self.mode == "linear_control":                   # same norm, along the NFM linear output instead
            lin = self.nfm.linear(idx, val)
            d = torch.nn.functional.normalize(lin, dim=-1) * d.norm(dim=-1, keepdim=True)
        return d * self.norm.scale


def run_prompts(model, tok, layer, prompts, clamp: Clamp | None, keep_bos: bool):
    """Last-position logits [n_prompts, vocab] with the clamp spliced in at every kept position."""
    device = next(model.parameters()).device
    out = []
    for p in prompts:
        ids = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]], device=device)
        mask = torch.ones_like(ids)
        keep = keep_mask(tok, mask, keep_bos).to(device)

        def fn(h, keep=keep):
            if clamp is None:
                return h
            h = h.clone()
            h[keep] = h[keep] + clamp.delta(h[keep].float()).to(h.dtype)
            return h

        with torch.no_grad(), splice(model, layer, fn):
            out.append(model(input_ids=ids, attention_mask=mask).logits[0, -1].float().cpu())
    return torch.stack(out)


def generate(model, tok, layer, prompt, clamp, n_tokens, sample, seed, keep_bos):
    device = next(model.parameters()).device
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]], device=device)

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


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="part9")
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    t0 = time.time()
    buckets = load_word_buckets(args.buckets)          # malformed JSON fails before any model loads
    stim = load_stimuli(args.prompts)
    if args.joint:
        joint, norm, parent_cfg = load_joint_checkpoint(args.joint)
        sae, nfm, parent_role, parent_flag = joint.sae, joint.nfm, "joint", "--joint"
        spec = DataSpec.from_description(parent_cfg["data"])
    else:
        sae, norm, sae_cfg = load_sae_checkpoint(args.sae)
        spec = DataSpec.from_description(sae_cfg["data"])
        nfm, parent_cfg = load_nfm_checkpoint(args.nfm, sae_cfg)
        parent_role, parent_flag = "nfm", "--nfm"
    if spec is None:
        raise cli.UserError("the models were trained on an activation file; part9 needs the LM they were trained on")
    sec = unorm = None
    if args.kind == "secondary":
        sec, unorm, sec_cfg = load_secondary_checkpoint(args.secondary)
        if parent_role not in sec_cfg["parents"]:
            raise cli.UserError(f"--secondary {args.secondary} was not trained on a {parent_role} model; pass the part3 run "
                                f"made {'with --joint' if args.joint else 'on --nfm'}")
        checkpoint.check_parent(sec_cfg, parent_role, parent_cfg, "--secondary", parent_flag)
    n_feat = (sec or sae).cfg.n_latents
    feature = args.feature
    if feature is None:
        f8 = Path(args.part8) / "metrics.json"
        if not f8.is_file():
            raise cli.UserError(f"no --feature given and no part8 results at {f8}; run part8 first or pass --feature N")
        m8 = json.loads(f8.read_text())
        key = "secondary" if args.kind == "secondary" else "primary"
        if key not in m8:
            raise cli.UserError(f"{f8} has no {key} results; pass --feature N")
        feature = (m8["secondary"]["top_by_interaction_F"][0]["feature"] if key == "secondary"
                   else m8["primary"]["top"][m8["factors"]["A:B"]][0]["feature"])
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
    per_cell = max(1, args.n_prompts // 4)
    prompts = [s for key in stim.cell_keys() for s in stim.cells[key][:per_cell]]
    words = [(cell, tid) for cell, tids in ids_by_cell.items() for tid in tids]
    cell_a = np.array([c[0] if isinstance(c, tuple) else c.split("|")[0] for c, _ in words])
    cell_b = np.array([c[1] if isinstance(c, tuple) else c.split("|")[1] for c, _ in words])
    tids = torch.tensor([t for _, t in words])

    # a random control feature with similar mean activation on the prompts
    with torch.no_grad():
        from common.data import collect_sentences
        acts, _ = collect_sentences(model, tok, prompts, spec.layer, spec.keep_bos)
        idx, val = sae.encode(norm.encode(acts.to(device)))
        if args.kind == "secondary":
            idx, val = sec.encode(unorm.encode(nfm.hidden(idx, val)))
        mean_act = torch.zeros(n_feat, device=device).index_add_(0, idx.reshape(-1), val.reshape(-1)) / idx.shape[0]
    gen_ = np.random.default_rng(args.seed)
    order = (mean_act - mean_act[feature]).abs().argsort().cpu().numpy()
    candidates = [int(j) for j in order[1:21] if j != feature]
    control_feature = int(gen_.choice(candidates))

    base = run_prompts(model, tok, spec.layer, prompts, None, spec.keep_bos)[:, tids]        # [prompts, words]
    results, rows, gens = {}, [], []
    conditions = [("target", feature, "feature"), ("random_feature_control", control_feature, "feature"),
                  ("linear_path_control", feature, "linear_control")]
    settings = [("set", args.set_value)] if args.set_value is not None else [("mult", m) for m in args.multipliers]
    cell_means = {}
    for cname, feat, mode in conditions:
        for how, x in settings:
            c = Clamp(sae, norm, nfm, sec, unorm, args.kind, feat, mult=x if how == "mult" else None,
                      value=x if how == "set" else None, mode=mode)
            logits = run_prompts(model, tok, spec.layer, prompts, c, spec.keep_bos)[:, tids]
            change = (logits - base).numpy()                                              # [prompts, words]
            y = change.reshape(-1)
            A = np.tile(cell_a, len(prompts))
            B = np.tile(cell_b, len(prompts))
            blk = np.repeat(np.arange(len(prompts)), len(words))
            label = f"{how}={x:g}"
            if np.allclose(y, 0):
                res = {"note": "no logit changed (the feature is inactive on these prompts, or the multiplier is 1)",
                       "max_abs_logit_change": float(np.abs(y).max())}
            else:
                res = two_way_anova(y, A, B, blk)
                res["max_abs_logit_change"] = float(np.abs(y).max())
            res["word_mean_change"] = change.mean(0).tolist()
            res["cell_means"] = {f"{la}|{lb}": float(y[(A == la) & (B == lb)].mean()) for la in buckets.levels_a for lb in buckets.levels_b}
            results.setdefault(cname, {})[label] = res
            cell_means[(cname, label)] = res["cell_means"]
            if "A:B" in res:
                rows.append([cname, label, res["A:B"]["F"], res["A:B"]["p"], res["A:B"]["partial_eta_sq"],
                             res["interaction_contrast"]["estimate"], *res["interaction_contrast"]["ci"],
                             res["A"]["F"], res["B"]["F"], res["max_abs_logit_change"]])
            if cname == "target" and args.generate_tokens > 0:
                for sample in (False, True):
                    text = generate(model, tok, spec.layer, prompts[0], c, args.generate_tokens, sample, args.seed, spec.keep_bos)
                    gens.append(f"[{label}, {'sampled' if sample else 'greedy'}] {prompts[0]} || {text}")
    metrics = {"stage": "part9_clamping_intervention", "kind": args.kind, "feature": feature,
               "model_path": "joint " + args.joint if args.joint else "sequential " + args.nfm,
               "control_feature": control_feature, "n_prompts": len(prompts), "n_words": len(words),
               "word_tokens": token_report, "conditions": results, "seconds": time.time() - t0,
               "definitions": __doc__.split("Demo")[0].strip()}
    cli.write_json(out / "metrics.json", metrics)
    with open(out / "anova.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "setting", "F_interaction", "p_interaction", "partial_eta_sq_interaction",
                    "interaction_contrast", "contrast_ci_lo", "contrast_ci_hi", "F_A", "F_B", "max_abs_logit_change"])
        w.writerows(rows)
    (out / "generations.txt").write_text("\n".join(gens) + "\n")
    pngs = plots.clamp_plots(results, buckets.levels_a, buckets.levels_b, out)
    print(f"clamping {args.kind} feature {feature} (control: feature {control_feature}) on {len(prompts)} prompts x "
          f"{len(words)} bucket words")
    for r in rows:
        print(f"  {r[0]:24s} {r[1]:9s} interaction F {r[2]:8.2f}  p {r[3]:.3g}  partial eta^2 {r[4]:.3f}  "
              f"contrast {r[5]:+.4f} [{r[6]:+.4f}, {r[7]:+.4f}]")
    cli.report(out, out / "metrics.json", [out / "anova.csv", out / "generations.txt", *pngs])


if __name__ == "__main__":
    cli.run_main(main)
