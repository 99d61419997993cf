"""Feature browser: a static, offline HTML site of the features of earlier stages, to judge them by eye.

    python browse_features.py                                  # after make demo's stages
    python browse_features.py --features 263 1035 --secondary-features 248 --out checkpoints/browse_some
    python browse_features.py --preset paper --sae checkpoints/paper/part1_sae --nfm checkpoints/paper/part2_nfm \\
        --secondary checkpoints/paper/part3_secondary_sae --part8 checkpoints/paper/part8_stimuli --out checkpoints/paper/browser

Feature spaces: the primary SAE (--sae), the sequential model's secondary (integration) features (--nfm and
--secondary), the joint model's (--joint and --joint-secondary), and the conjunction latents of
detect_conjunctions.py (--conjunctions, among the primary features). Each space gets a sortable, searchable table
on index.html (firing frequency, mean and max activation, part8's interaction test when --part8 is given, Claude's
explanation and detection score when --interpret folders are given) and a page per selected feature:
  - its top activating contexts and samples from --quantiles activation bins (delphi's scheme, common/contexts.py,
    the sampler interpret_features.py uses), each token shaded by the feature's value, the firing token outlined;
  - the histogram of its values and its firing frequency;
  - primary features: the tokens its decoder direction promotes and suppresses through the LM's final norm and
    unembedding (a logit lens: an approximation that skips every later block), and its top NFM interaction
    partners (pair effect x co-activation, part4's ranking);
  - secondary features: the primary pairs that drive them on the held-out tokens where they fire (part8's exact
    pair attribution, common/pairs.py), and on part8's stimulus sentences when part8 attributed that feature,
    linked to the primaries' pages; part8's ANOVA row and part9's clamping result when given.
Which features get pages: --features (and the per-space lists), else --top per space by --order (firing
frequency, part8's interaction F, or at random); a 50k-latent SAE never gets 50k pages.

Every value comes from the test half of the held-out documents, read from the activation cache (the rows the
other stages evaluate on) and coded batch by batch through the same path as part8/part9 (SAE code of the
normalised activation; for secondary features, the NFM's hidden layer and the secondary SAE).

Writes to --out: index.html, features/<space>/<id>.html, metrics.json (what was built, and from which checkpoints).
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import cli, site
from common.contexts import (FiringStats, context_window, dense_columns, heldout_row_tokens, histogram, quantile_rows,
                             top_rows)
from common.data import get_activations, heldout_half
from common.loading import load_model_path
from common.pairs import pair_attribution, secondary_direction

SPACES = {"primary": "primary SAE features", "secondary": "integration features (sequential: secondary SAE on the NFM)",
          "joint_secondary": "integration features (joint model: secondary SAE on its NFM)"}


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/feature_browser")
    p.add_argument("--sae", default="checkpoints/part1_sae", help="part1 folder (default: checkpoints/part1_sae)")
    p.add_argument("--nfm", default="checkpoints/part2_nfm", help="part2 folder; '' to skip (default: checkpoints/part2_nfm)")
    p.add_argument("--secondary", default="checkpoints/part3_secondary_sae",
                   help="part3 folder on --nfm; '' to skip (default: checkpoints/part3_secondary_sae)")
    p.add_argument("--joint", default="", help="part5 folder, for the joint model's integration features (default: none)")
    p.add_argument("--joint-secondary", default="", help="part3 --joint folder on --joint (default: none)")
    p.add_argument("--conjunctions", default="", help="detect_conjunctions.py folder: its latents get pages (default: none)")
    p.add_argument("--part8", default="", help="part8 folder: its ANOVA rows and pair attributions (default: none)")
    p.add_argument("--part9", default="", help="part9 folder: its clamping result on the clamped feature (default: none)")
    p.add_argument("--interpret", nargs="*", default=[], help="interpret_features.py folders: explanations and scores")
    p.add_argument("--features", type=int, nargs="*", default=None, help="primary features to give pages")
    p.add_argument("--secondary-features", type=int, nargs="*", default=None, help="sequential integration features")
    p.add_argument("--joint-features", type=int, nargs="*", default=None, help="joint integration features")
    p.add_argument("--top", type=int, default=100, help="pages per space when its features are not listed (default: 100)")
    p.add_argument("--order", choices=["frequency", "part8", "random"], default="frequency",
                   help="which --top features: most frequent, highest part8 interaction F, or random (default: frequency)")
    p.add_argument("--n-top", type=int, default=12, help="top activating contexts per page (default: 12)")
    p.add_argument("--quantiles", type=int, default=4, help="activation bins sampled per page (default: 4)")
    p.add_argument("--per-quantile", type=int, default=3, help="contexts drawn per bin (default: 3)")
    p.add_argument("--window", type=int, default=10, help="tokens shown each side of the firing token (default: 10)")
    p.add_argument("--partners", type=int, default=8, help="NFM interaction partners listed (default: 8)")
    p.add_argument("--logit-lens", type=int, default=10, help="promoted and suppressed tokens listed (default: 10)")
    cli.add_data_args(p, with_model_source=False)
    return p


# ----------------------------------------------------------------------------------------------- coding
class Space:
    """One feature space: how a batch of raw activations becomes its sparse code, and what its pages show."""

    def __init__(self, name: str, n_latents: int, encode, mp=None):
        self.name, self.n_latents, self.encode, self.mp = name, n_latents, encode, mp
        self.stats = FiringStats(n_latents)
        self.selected: list[int] = []
        self.values: np.ndarray | None = None      # [n_rows, n_selected] after the second pass
        self.co: torch.Tensor | None = None        # primary: [n_selected, n_latents] co-activation counts


def once_per_batch(fn):
    """fn(x), computed once for the batch x however many spaces ask for it."""
    last = [None, None]

    def call(x):
        if last[0] is not x:
            last[0], last[1] = x, fn(x)
        return last[1]
    return call


def spaces_of(args, device) -> tuple[dict, object]:
    """The spaces to build, and the data spec they share (each model path coded as the stages do)."""
    seq = load_model_path("browse_features", sae=args.sae, nfm=args.nfm or None, secondary=args.secondary or None)
    sae, norm = seq.sae.to(device), seq.norm.to(device)
    primary = once_per_batch(lambda x: sae.encode(norm.encode(x)))     # the secondary space reads it too

    out = {"primary": Space("primary", sae.cfg.n_latents, primary, seq)}
    if seq.sec is not None:
        nfm, sec, unorm = seq.nfm.to(device), seq.sec.to(device), seq.unorm.to(device)
        out["secondary"] = Space("secondary", sec.cfg.n_latents,
                                 lambda x: sec.encode(unorm.encode(nfm.hidden(*primary(x)))), seq)
    if args.joint:
        jp = load_model_path("browse_features", joint=args.joint, secondary=args.joint_secondary or None)
        if jp.sec is None:
            raise cli.UserError("--joint needs --joint-secondary (the part3 --joint folder): the joint model's "
                                "integration features are its secondary SAE's latents")
        if jp.spec != seq.spec:
            raise cli.UserError(f"--joint {args.joint} was trained on other activations than --sae {args.sae}; pass "
                                f"models of the same LM, layer and data")
        js, jn, jnfm, jsec, ju = (m.to(device) for m in (jp.sae, jp.norm, jp.nfm, jp.sec, jp.unorm))
        out["joint_secondary"] = Space("joint_secondary", jsec.cfg.n_latents,
                                       lambda x: jsec.encode(ju.encode(jnfm.hidden(*js.encode(jn.encode(x))))), jp)
    return out, seq.spec


def batches(x: torch.Tensor, device, size: int = 4096):
    for s in range(0, x.shape[0], size):
        yield s, x[s:s + size].to(device).float()


@torch.no_grad()
def first_pass(spaces: dict, x: torch.Tensor, device) -> None:
    for _, xb in batches(x, device):
        for sp in spaces.values():
            sp.stats.add(*sp.encode(xb))


@torch.no_grad()
def second_pass(spaces: dict, x: torch.Tensor, device) -> None:
    """Each selected feature's value on every row; for primary features also their co-activation counts."""
    for sp in spaces.values():
        sp.values = np.zeros((x.shape[0], len(sp.selected)), dtype=np.float32)
        if sp.name == "primary":
            sp.co = torch.zeros(len(sp.selected), sp.n_latents, dtype=torch.float64)
    for s, xb in batches(x, device):
        for sp in spaces.values():
            if not sp.selected:
                continue
            idx, val = (t.cpu() for t in sp.encode(xb))
            cols = dense_columns(idx, val, torch.tensor(sp.selected))          # [b, m]
            sp.values[s:s + xb.shape[0]] = cols.numpy()
            if sp.co is not None:
                for j in torch.nonzero((cols > 0).any(0)).flatten().tolist():
                    rows = cols[:, j] > 0
                    i, v = idx[rows], val[rows]
                    sp.co[j] += torch.bincount(i[v > 0].long(), minlength=sp.n_latents).double()


# ----------------------------------------------------------------------------------------------- selection
def part8_rows(folder: str) -> tuple[str | None, dict]:
    """part8's ANOVA rows by space: ({'primary': {feature: row}, 'secondary' or 'joint_secondary': {...}}), and
    which model path it ran on."""
    if not folder:
        return None, {}
    m = json.loads((Path(folder) / "metrics.json").read_text())
    path = (m.get("models") or {}).get("path", "sequential")
    rows = {}
    for kind in ("primary", "secondary"):
        f = Path(folder) / f"{kind}_anova.csv"
        if f.is_file():
            with open(f) as fh:
                space = kind if kind == "primary" or path == "sequential" else "joint_secondary"
                rows[space] = {int(r["feature"]): {k: float(v) for k, v in r.items() if k != "feature"}
                               for r in csv.DictReader(fh)}
    return path, {"metrics": m, "rows": rows}


def check_same_models(m: dict, flag: str, folder: str, spaces: dict) -> None:
    """Refuse a part8 / part9 folder that ran on other checkpoints than these (content hashes differ)."""
    models = m.get("models") or {}
    space = spaces["primary"] if models.get("path", "sequential") == "sequential" else spaces.get("joint_secondary")
    refs = space.mp.refs if space is not None else {}
    for k, ref in models.items():
        if isinstance(ref, dict) and k in refs and ref.get("content_hash") != refs[k].get("content_hash"):
            raise cli.UserError(f"{flag} {folder} ran on another {k} ({ref.get('path')}) than this browser's "
                                f"({refs[k].get('path')}); pass the {flag.lstrip('-')} folder made from these models")


def always_shown(p8path, p8: dict, part9: str, conj: list[dict]) -> dict:
    """Features that get pages whatever --order picks: the conjunction latents, part8's top features (each factor's
    primary, the integration features it attributed to pairs and their top pairs' primaries) and part9's clamped
    feature."""
    sec = "secondary" if p8path in (None, "sequential") else "joint_secondary"
    out = {"primary": [c["latent"] for c in conj], sec: []}
    if p8:
        m = p8["metrics"]
        out["primary"] += [r["feature"] for rows in m.get("primary", {}).get("top", {}).values() for r in rows[:3]]
        blocks = m.get("secondary", {}).get("pair_attribution", [])
        out[sec] += [b["secondary_feature"] for b in blocks]
        out["primary"] += [f for b in blocks for p in b["pairs"][:5] for f in p["pair"]]      # linked from their pages
    if part9:
        m9 = json.loads((Path(part9) / "metrics.json").read_text())
        path9 = (m9.get("models") or {}).get("path", "sequential")
        space = "primary" if m9.get("kind") == "primary" else ("secondary" if path9 == "sequential" else "joint_secondary")
        out.setdefault(space, []).insert(0, int(m9["feature"]))
    return out


def select(sp: Space, listed, args, p8: dict, extra: list[int]) -> None:
    if listed:
        bad = [f for f in listed if not 0 <= f < sp.n_latents]
        if bad:
            raise cli.UserError(f"features {bad} are out of range for the {sp.name} space ({sp.n_latents} latents, "
                                f"0..{sp.n_latents - 1}); pass features in that range")
        sp.selected = list(dict.fromkeys(listed))
        return
    fired = torch.nonzero(sp.stats.count > 0).flatten()
    if args.order == "part8" and p8.get("rows", {}).get(sp.name):
        rows = p8["rows"][sp.name]
        order = sorted((f for f in rows if f < sp.n_latents), key=lambda f: -rows[f].get("A:B_F", 0.0))
    elif args.order == "random":
        g = torch.Generator().manual_seed(args.seed)
        order = fired[torch.randperm(len(fired), generator=g)].tolist()
    else:
        order = fired[torch.argsort(-sp.stats.count[fired], stable=True)].tolist()
    sp.selected = list(dict.fromkeys([f for f in extra if 0 <= f < sp.n_latents] + order[:args.top]))


# ----------------------------------------------------------------------------------------------- page parts
def logit_lens(model, tok, direction: torch.Tensor, n: int) -> dict | None:
    """Tokens a residual-stream direction promotes and suppresses through the LM's final norm and unembedding."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        return None
    with torch.no_grad():
        p = next(head.parameters())
        logits = head(norm(direction.to(p.device, p.dtype)[None, None]))[0, 0].float().cpu()
    up, down = logits.topk(n), (-logits).topk(n)
    return {"promoted": [(tok.decode([int(i)]), float(v)) for v, i in zip(up.values, up.indices)],
            "suppressed": [(tok.decode([int(i)]), float(-v)) for v, i in zip(down.values, down.indices)]}


def partners(sp: Space, j: int, n: int) -> list[dict]:
    """part4's ranking for selected feature j: pair effect at typical values x co-activation frequency."""
    nfm = sp.mp.nfm
    if nfm is None or sp.co is None:
        return []
    f = sp.selected[j]
    c = sp.stats.count.clamp(min=1)
    typical = (sp.stats.total / c).float()
    dev = next(nfm.parameters()).device
    others = torch.arange(sp.n_latents)
    effect = nfm.pair_effect(torch.full((sp.n_latents,), f, device=dev), others.to(dev),
                             typical[f].expand(sp.n_latents).to(dev), typical.to(dev)).cpu().double()
    co = sp.co[j] / max(sp.stats.n_rows, 1)
    co[f] = 0
    score = effect * co
    top = score.topk(min(n, sp.n_latents)).indices.tolist()
    return [{"feature": int(i), "score": float(score[i]), "pair_effect": float(effect[i]),
             "coactivation_frequency": float(co[i])} for i in top if score[i] > 0]


@torch.no_grad()
def held_out_pairs(sp: Space, j: int, x: torch.Tensor, device, top: int) -> dict:
    """The primary pairs that drive integration feature j's pre-activation on the held-out test tokens where it
    fires: part8's exact pair attribution (common/pairs.py), over this text instead of the stimulus set."""
    mp = sp.mp
    rows = torch.from_numpy(np.flatnonzero(sp.values[:, j] > 0))
    idx, val = (t.cpu() for t in mp.sae.encode(mp.norm.encode(x[rows].to(device).float())))
    w = secondary_direction(mp.nfm, mp.sec, mp.unorm, sp.selected[j])
    return {"n_tokens": int(len(rows)), **pair_attribution(idx, val, mp.nfm.V.detach().cpu(), w, top)}


def pairs_table(pairs: list[dict], pages: set) -> str:
    return site.simple_table(
        ["pair", "mean contribution", "tokens with both active"],
        [[link("primary", a, pages) + " &amp; " + link("primary", b, pages), f"{p['mean_contribution']:+.3g}",
          str(p["tokens_both_active"])] for p in pairs for a, b in [p["pair"]]])


def contexts_block(title: str, rows, rt, acts: np.ndarray, tok, window: int, vmax: float) -> str:
    parts = [f"<h2>{site.esc(title)}</h2>"]
    for r in rows:
        toks = [(tok.decode([t]), v, is_row) for t, v, is_row in context_window(rt, int(r), acts, window)]
        parts.append(f'<p class="note">value {acts[r]:.3g} · held-out document {int(rt.docs[r])}</p>'
                     + site.context_html(toks, vmax))
    return "\n".join(parts)


def feature_page(sp: Space, f: int, acts: np.ndarray, args, rt, tok, extras: dict) -> str:
    """Feature f's page; acts [held-out rows] its value on every held-out row (contexts index those rows)."""
    s = sp.stats.summary(f)
    vmax = float(acts.max()) if acts.size else 0.0
    body = [f'<p><a href="../../index.html">index</a></p><h1>{site.esc(SPACES[sp.name])}: feature {f}</h1>',
            f"<p>fires on {s['n_firing']:,} of {sp.stats.n_rows:,} held-out test tokens (frequency "
            f"{s['frequency']:.3g}); mean value when firing {s['mean_activation']:.3g}, max {s['max_activation']:.3g}</p>"]
    if extras.get("explanation"):
        e = extras["explanation"]
        body.append(f"<p><b>Claude's explanation:</b> {site.esc(e['text'])}"
                    + (f" <span class=note>(detection accuracy {e['accuracy']:.2f}, F1 {e['f1']:.2f})</span>"
                       if e.get("accuracy") is not None else "") + "</p>")
        if e.get("examples"):
            body.append("<h2>The examples Claude saw (interpret_features.py)</h2>" + site.simple_table(
                ["bin (1 = strongest)", "value", "context (firing token in &lt;&lt; &gt;&gt;)"],
                [[str(x["bin"]), f"{x['activation']:.3g}", f'<span class="ctx">{site.esc(x["context"])}</span>']
                 for x in e["examples"]]))
    hist = histogram(acts)
    body.append("<h2>Activation histogram (firing tokens)</h2>" + site.histogram_svg(hist["edges"], hist["counts"]))
    cols = ['<div class="cols">']
    if extras.get("lens"):
        lens = extras["lens"]
        for label, key in (("promotes", "promoted"), ("suppresses", "suppressed")):
            cols.append("<div><h2>Logit lens: " + label + "</h2>" + site.simple_table(
                ["token", "logit"], [[site.esc(repr(t)), f"{v:+.3g}"] for t, v in lens[key]]) + "</div>")
    if extras.get("partners"):
        cols.append("<div><h2>Top NFM interaction partners</h2>" + site.simple_table(
            ["feature", "pair effect", "co-activation", "score"],
            [[link("primary", p["feature"], extras["pages"]), f"{p['pair_effect']:.3g}", f"{p['coactivation_frequency']:.3g}",
              f"{p['score']:.3g}"] for p in extras["partners"]]) + "</div>")
    cols.append("</div>")
    if len(cols) > 2:
        body.append("".join(cols))
        if extras.get("lens"):
            body.append('<p class="note">Logit lens: the decoder direction (in the LM\'s units) through the final '
                        "norm and the unembedding alone, skipping every later block: an approximation.</p>")
    if extras.get("held_out_pairs"):
        hp = extras["held_out_pairs"]
        body.append(f"<h2>Primary pairs that drive it on these {hp['n_tokens']:,} firing tokens</h2>"
                    + (pairs_table(hp["pairs"], extras["pages"]) if hp["pairs"] else "<p class=note>no pair is active "
                       "together on 3 or more of them</p>")
                    + '<p class="note">Exact pair attribution (common/pairs.py, as part8): each pair\'s mean exact '
                    "contribution f_i f_j &Sigma;<sub>d</sub> V[i,d] V[j,d] w[d] to the feature's pre-activation, w its "
                    "direction in the NFM's pooled space" + ("" if hp["exact"] else "; the search stopped before its "
                                                             "certificate: the ranking may miss a pair") + ".</p>")
    if extras.get("pairs"):
        body.append("<h2>Primary pairs that drive it on part8's stimulus sentences</h2>"
                    + pairs_table(extras["pairs"], extras["pages"]))
    if extras.get("anova"):
        row = extras["anova"]
        body.append("<h2>part8: two-way ANOVA of the stimulus set (selection half)</h2>" + site.simple_table(
            ["effect", "F", "p", "q (BH)", "permutation p", "permutation q", "partial η²"],
            [[site.esc(extras["factors"].get(e, e)), *(f"{row.get(f'{e}_{k}', float('nan')):.3g}" for k in (
                "F", "p", "q", "p_perm", "q_perm", "partial_eta_sq"))] for e in ("A", "B", "A:B")]))
    if extras.get("clamp"):
        body.append("<h2>part9: clamping this feature (test half of the prompts)</h2>" + clamp_table(extras["clamp"]))
    body.append(contexts_block(f"Top {len(extras['top'])} activating contexts", extras["top"], rt, acts, tok,
                               args.window, vmax))
    for b, rows in extras["quantiles"]:
        body.append(contexts_block(f"Quantile bin {b} of {args.quantiles} (1 = strongest)", rows, rt, acts, tok,
                                   args.window, vmax))
    return site.page(f"{sp.name} feature {f}", "\n".join(body))


def clamp_table(m: dict) -> str:
    """part9's interaction test per condition and multiplier, with the null features' percentile."""
    spec = (m.get("null_features") or {}).get("specificity", {})
    rows = []
    for cond, by_mult in m.get("conditions", {}).items():
        for mult, r in by_mult.items():
            ab = r.get("A:B")
            if ab is None:
                continue
            sp = spec.get(mult, {}) if cond == "target" else {}
            rows.append([site.esc(cond), site.esc(mult), f"{ab['F']:.3g}", f"{ab['p']:.3g}",
                         f"{r.get('max_abs_logit_change', float('nan')):.3g}",
                         f"{sp['percentile']:.0f}" if "percentile" in sp else "–",
                         f"{sp['empirical_p']:.3g}" if "empirical_p" in sp else "–"])
    return site.simple_table(["condition", "clamp", "interaction F (min F')", "p", "max |logit change|",
                              "null-feature percentile", "empirical p vs null features"], rows)


def link(space: str, f: int, pages: set) -> str:
    return (f'<a href="../{space}/{f}.html">{f}</a>' if (space, f) in pages else str(f))


# ----------------------------------------------------------------------------------------------- main
def explanations(folders: list[str]) -> dict:
    """{(space, feature): {'text', 'accuracy', 'f1'}} from interpret_features.py folders."""
    out = {}
    for d in folders:
        m = json.loads((Path(d) / "metrics.json").read_text())
        space = "primary" if m["kind"] == "primary" else ("joint_secondary" if m.get("model_path") == "joint" else "secondary")
        ex = json.loads((Path(d) / "explanations.json").read_text())
        for f, e in ex.items():
            sc = m.get("scores", {}).get(f, {})
            out[(space, int(f))] = {"text": e["explanation"], "accuracy": sc.get("accuracy"), "f1": sc.get("f1"),
                                    "examples": e.get("examples", [])}
    return out


def index_html(spaces: dict, expl: dict, p8: dict, conj: list[dict], tops: dict) -> str:
    body = ["<h1>Feature browser</h1>",
            '<p class="note">All values on the test half of the held-out documents. Click a column to sort; type to '
            "filter by feature id or word (a feature's most frequent firing tokens and its explanation).</p>"]
    for name, sp in spaces.items():
        rows8 = p8.get("rows", {}).get(name, {})
        headers = [("feature", True), ("frequency", True), ("mean value", True), ("max value", True),
                   ("top tokens", False)]
        if rows8:
            headers += [("part8 interaction F", True), ("part8 interaction q (perm.)", True)]
        if any(k[0] == name for k in expl):
            headers += [("Claude's explanation", False), ("detection accuracy", True)]
        rows = []
        for f in sp.selected:
            s = sp.stats.summary(f)
            cells = [site.cell(f, num=True, link=f"features/{name}/{f}.html"), site.cell(s["frequency"], num=True),
                     site.cell(s["mean_activation"], num=True), site.cell(s["max_activation"], num=True),
                     site.cell(tops[(name, f)])]
            if rows8:
                r = rows8.get(f, {})
                cells += [site.cell(r.get("A:B_F"), num=True), site.cell(r.get("A:B_q_perm"), num=True)]
            e = expl.get((name, f))
            if any(k[0] == name for k in expl):
                cells += [site.cell(e["text"] if e else None), site.cell(e.get("accuracy") if e else None, num=True)]
            rows.append((cells, f"{f} {tops[(name, f)]} {e['text'] if e else ''}"))
        body.append(f"<h2>{site.esc(SPACES[name])} ({len(sp.selected)} of {sp.n_latents:,} latents)</h2>"
                    + site.sortable_table(f"table-{name}", headers, rows))
    if conj:
        body.append("<h2>Conjunction latents (detect_conjunctions.py)</h2>" + site.sortable_table(
            "table-conjunctions", [("latent", True), ("parent a", True), ("parent b", True), ("score", True)],
            [([site.cell(c["latent"], num=True, link=f"features/primary/{c['latent']}.html"),
               site.cell(c["parent_a"], num=True, link=f"features/primary/{c['parent_a']}.html"
                         if c["parent_a"] in spaces["primary"].selected else None),
               site.cell(c["parent_b"], num=True, link=f"features/primary/{c['parent_b']}.html"
                         if c["parent_b"] in spaces["primary"].selected else None),
               site.cell(c.get("score"), num=True)], f"{c['latent']} {c['parent_a']} {c['parent_b']}") for c in conj]))
    return site.page("Feature browser", "\n".join(body), script=True)


def top_tokens(acts: np.ndarray, rt, tok, n: int = 3) -> str:
    on = np.flatnonzero(acts > 0)
    if not len(on):
        return ""
    ids, counts = np.unique(rt.tokens[on], return_counts=True)
    order = np.lexsort((ids, -counts))[:n]
    return " ".join(repr(tok.decode([int(ids[i])])) for i in order)


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="browse")
    t0 = time.time()
    out = cli.prepare_out(args.out, args)
    device = cli.env_device(args.device)
    spaces, spec = spaces_of(args, device)
    from common.models import load_model
    model, tok, _ = load_model(spec.model, args.dtype, args.device)

    # the held-out rows (the stages' evaluation rows) and their tokens; the test half only
    acts = get_activations(args, spec, width=spaces["primary"].mp.sae.cfg.d, need_train=False)
    rt = heldout_row_tokens(tok, spec, acts.val.shape[0])
    if acts.val_docs is None or not np.array_equal(rt.docs, acts.val_docs.numpy()):
        raise cli.UserError(f"the activation cache's held-out rows do not follow the text of {spec.dataset} "
                            f"(the tokenizer or text changed since they were collected); delete {args.cache_dir} "
                            f"and rerun")
    test = np.array([heldout_half(int(d)) == "test" for d in rt.docs])
    x = acts.val[torch.from_numpy(test)]
    rows_of_test = np.flatnonzero(test)                  # test row i -> held-out row rows_of_test[i]
    acts.val = None
    print(f"feature browser: {x.shape[0]:,} held-out test tokens, spaces {', '.join(spaces)}")

    first_pass(spaces, x, device)
    p8path, p8 = part8_rows(args.part8)
    if p8:
        check_same_models(p8["metrics"], "--part8", args.part8, spaces)
    if args.part9:
        check_same_models(json.loads((Path(args.part9) / "metrics.json").read_text()), "--part9", args.part9, spaces)
    conj = json.loads((Path(args.conjunctions) / "metrics.json").read_text())["conjunction_latents"] \
        if args.conjunctions else []
    extra = always_shown(p8path, p8, args.part9, conj)
    listed = {"primary": args.features, "secondary": args.secondary_features, "joint_secondary": args.joint_features}
    for name, sp in spaces.items():
        select(sp, listed[name], args, p8, extra.get(name, []))
    second_pass(spaces, x, device)

    # test-row values -> held-out-row values (contexts index held-out rows), per page
    expl = explanations(args.interpret)
    clamp = json.loads((Path(args.part9) / "metrics.json").read_text()) if args.part9 else None
    pairs = {}
    if p8:
        for block in p8["metrics"].get("secondary", {}).get("pair_attribution", []):
            pairs[("secondary" if p8path == "sequential" else "joint_secondary", block["secondary_feature"])] = block["pairs"]
    pages = {(name, f) for name, sp in spaces.items() for f in sp.selected}
    tops, n_pages = {}, 0
    from tqdm import tqdm
    for name, sp in spaces.items():
        (out / "features" / name).mkdir(parents=True, exist_ok=True)
        for j, f in enumerate(tqdm(sp.selected, desc=f"pages {name}", leave=False)):
            full = np.zeros(len(rt.seq), dtype=np.float32)
            full[rows_of_test] = sp.values[:, j]
            tops[(name, f)] = top_tokens(full, rt, tok)
            extras = {"pages": pages, "explanation": expl.get((name, f)), "anova": p8.get("rows", {}).get(name, {}).get(f),
                      "factors": p8.get("metrics", {}).get("factors", {}),
                      "top": top_rows(full, args.n_top),
                      "quantiles": quantile_rows(full, args.quantiles, args.per_quantile, args.seed + f),
                      "pairs": pairs.get((name, f))}
            if clamp and clamp.get("feature") == f and (clamp.get("kind") == "primary") == (name == "primary"):
                extras["clamp"] = clamp
            if name != "primary":
                extras["held_out_pairs"] = held_out_pairs(sp, j, x, device, args.partners)
            if name == "primary":
                sae, norm = sp.mp.sae, sp.mp.norm
                direction = sae.W_dec[f].detach().float().cpu() * norm.scale.float().cpu()    # in the LM's units
                extras["lens"] = logit_lens(model, tok, direction, args.logit_lens)
                extras["partners"] = partners(sp, j, args.partners)
            html_text = feature_page(sp, f, full, args, rt, tok, extras)
            (out / "features" / name / f"{f}.html").write_text(html_text, encoding="utf-8")
            n_pages += 1
    index = out / "index.html"
    index.write_text(index_html(spaces, expl, p8, conj, tops), encoding="utf-8")
    cli.write_json(out / "metrics.json", {
        "stage": "browse_features", "pages": {name: sp.selected for name, sp in spaces.items()},
        "n_test_tokens": int(x.shape[0]), "order": args.order, "index": str(index.resolve()),
        "sources": {k: getattr(args, k) for k in ("sae", "nfm", "secondary", "joint", "joint_secondary",
                                                   "conjunctions", "part8", "part9", "interpret")},
        "seconds": time.time() - t0})
    print(f"{n_pages} feature pages in {time.time() - t0:.0f} s")
    print(f"\nfeature browser: {index.resolve()}")



if __name__ == "__main__":
    cli.run_main(main)
