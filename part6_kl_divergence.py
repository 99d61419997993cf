"""part6: splice each trained model into the LM at the layer it was trained on and measure, on held-out
documents, how far the next-token distribution moves (KL) and how much the loss rises (CE).

Documents: the first --docs documents of the *test half* of the held-out split (common/data.py heldout_half),
never the selection half that picked the models' best steps, never training text; their indices are
recorded in metrics.json ("evaluated_documents").

Variants (the layer-L residual at every non-BOS, non-pad position replaced; BOS is left untouched and every
statistic excludes it): identity (must give KL 0), the sequential SAE alone, SAE + full NFM, SAE + one NFM
path, the joint model with all paths and with its SAE path plus none or one NFM path (and, with --poly, the
PolySAE joint model of part5 --decoder poly: 'poly_full' and its linear dictionary alone), the part5
parameter-matched standalone SAE, zero ablation and mean ablation of the whole activation (the training-set
mean activation). The control ladder (common/controls.py), spliced the same way beside the NFM: SAE + each
control that part2 trained ('sae+linear_from_x', 'sae+mlp_on_code', 'sae+mlp_from_x', 'sae+residual_sae'),
and 'sae+kl_adapter', a KL-restoring control trained here (common/kl_adapter.py, Karvonen 2025): the SAE plus
a linear adapter on x and the code, fitted on KL to the original next-token distribution; its budget
(parameters against the NFM's, steps, tokens) is in metrics.json ("kl_adapter"). A removed NFM path is mean-ablated, replaced by its mean output on training tokens (saved
with the NFM): '...[mean_ablation]', the headline, since the two paths carry constant offsets that cancel;
'...[zero_ablation]', the path deleted, is a labelled second figure (without random baselines). Every
reconstruction is computed through the normalisation saved with its model and mapped back to the LM's units.

Baselines, per variant v (whole-activation ablations included) with per-token error e_v = ||x - x_hat_v||:
  eps_random  x + e_v * u, u uniform on the unit sphere (Gurnee 2024)
  cov_random  x + e_v * z/||z||, z ~ N(0, Sigma_v), Sigma_v the covariance of v's errors on training tokens
Per variant: KL(P_orig || P_spliced) per token, CE and delta-CE, CE-loss score against zero ablation
(CE_zero - CE_v) / (CE_zero - CE_orig), ratios of KL to both baselines. Confidence intervals by bootstrap
over documents; paired comparisons (same tokens) by bootstrap and a paired t-test over documents.

The original study's evaluation defects, as switches for its ladder (--defects, common/recipe.py; announced and
recorded in metrics.json): splice-offset (read and write the residual after L+1 blocks, the reference's hook on
model.layers[L]; 'identity' then writes layer L's own activation there, so its KL measures the offset alone),
raw-activations (models read and write un-normalised activations).

Memory: the models are spliced one family at a time (the SAE with its NFM and the KL adapter, then each control,
the joint model, its parameter-matched SAE, the PolySAE), each loaded, run over every document and freed; only
the primary SAE stays loaded. Each variant's baselines come from its own generator, seeded by --seed and the
variant's name, so every figure is the same with or without the other families beside it.

Demo (after part1, part2, part5):
    python part6_kl_divergence.py
Paper setup:
    python part6_kl_divergence.py --preset paper --sae checkpoints/paper/part1_sae --nfm checkpoints/paper/part2_nfm --joint checkpoints/paper/part5_joint --out checkpoints/paper/part6_kl

Writes to --out: metrics.json, kl.csv, kl_bars.png, kl_histograms.png.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import cli, controls, plots, recipe
from common.data import (DataSpec, batch_sequences, cached_activations, iter_test_half_sequences, keep_mask,
                         model_fingerprint)
from common.hooks import n_layers, splice
from common.controls import CONTROLS
from common.joint import load_joint_checkpoint, variants
from common.kl_adapter import train_kl_adapter
from common.models import load_model, resolve_model_path
from common.nfm import PATHS, combine_paths, load_nfm_checkpoint
from common.loading import load_sae_checkpoint
from common.normalize import Normalizer
from common.stats import paired_difference, ratio_of_sums_ci, reduction_and_share_ci

# (a, b): a vs b on the same tokens. '[mean_ablation]': the removed NFM path replaced by its mean output on
# training tokens (the headline); '[zero_ablation]': deleted (a labelled second figure).
COMPARISONS = [("sae+nfm", "sae"), ("sae+nfm_linear[mean_ablation]", "sae"), ("sae+nfm_interaction[mean_ablation]", "sae"),
               ("joint_full", "joint_sae[mean_ablation]"), ("joint_sae+linear[mean_ablation]", "joint_sae[mean_ablation]"),
               ("joint_sae+interaction[mean_ablation]", "joint_sae[mean_ablation]"),
               ("joint_full", "sae+nfm"), ("joint_full", "standalone_sae"), ("sae", "eps_random[sae]"),
               ("poly_full", "joint_full"), ("poly_full", "standalone_sae"), ("poly_full", "poly_sae[mean_ablation]")]
# the NFM beside each control, and each control against the SAE alone
COMPARISONS += [(a, b) for c in (*CONTROLS, "kl_adapter") for a, b in (("sae+nfm", f"sae+{c}"), (f"sae+{c}", "sae"))]


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/part6_kl")
    p.add_argument("--sae", default="checkpoints/part1_sae", help="part1 output folder (default: checkpoints/part1_sae)")
    p.add_argument("--nfm", default="checkpoints/part2_nfm",
                   help="part2 output folder; '' to skip the sequential NFM variants (default: checkpoints/part2_nfm)")
    p.add_argument("--joint", default="checkpoints/part5_joint",
                   help="part5 output folder; '' to skip the joint variants (default: checkpoints/part5_joint)")
    p.add_argument("--poly", default="",
                   help="a part5 --decoder poly output folder (PolySAE) to splice beside the joint NFM model as "
                        "'poly_*' variants; '' skips it (default: '')")
    p.add_argument("--docs", type=int, default=200,
                   help="held-out documents to evaluate, all from the test half (default: 200)")
    p.add_argument("--lm-batch-size", type=int, default=32, help="sequences per LM forward pass (default: 32)")
    p.add_argument("--cov-tokens", type=int, default=20_000,
                   help="training tokens used for the mean activation and the error covariances (default: 20000)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over documents (default: 1000)")
    p.add_argument("--controls", default="all",
                   help="controls of the --nfm folder to splice beside it (part2's --controls), or 'none' "
                        "(default: all that part2 trained)")
    p.add_argument("--kl-adapter-steps", type=int, default=100,
                   help="steps of the KL-restoring linear adapter (SAE + adapter trained on KL); 0 skips it "
                        "(default: 100; the paper preset 2000)")
    p.add_argument("--kl-adapter-batch", type=int, default=8, help="training sequences per adapter step (default: 8)")
    p.add_argument("--kl-adapter-lr", type=float, default=1e-4, help="Adam learning rate of the adapter (default: 1e-4)")
    cli.add_defect_args(p, "part6")
    p.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / "checkpoints" / "activation_cache"),
                   help="activation cache used for the training-set statistics (default: checkpoints/activation_cache)")
    return p


class Spliceable:
    """All replacements of kept positions h [n, d] (LM units) by each variant."""

    def __init__(self, sae, norm, nfm, joint, joint_norm, base, base_norm, ctls=None):
        self.sae, self.norm, self.nfm = sae, norm, nfm
        self.joint, self.joint_norm, self.base, self.base_norm = joint, joint_norm, base, base_norm
        self.controls = ctls or {}            # name -> model of x, of the code or of r (common/controls.py)
        self.kl_adapter = None
        self.poly = self.poly_norm = None      # a part5 --decoder poly model (PolySAE), spliced as 'poly_*'

    @torch.no_grad()
    def reconstructions(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.norm.encode(h)
        x_hat, idx, val = self.sae(x)
        out = {"sae": x_hat}
        if self.nfm is not None:
            paths = {"linear": self.nfm.linear(idx, val), "interaction": self.nfm.interaction(idx, val)}
            out["sae+nfm"] = x_hat + paths["linear"] + paths["interaction"]
            for keep in PATHS:
                for how in ("mean", "zero"):
                    out[f"sae+nfm_{keep}[{how}_ablation]"] = x_hat + combine_paths(paths, (keep,), self.nfm, how)
        for name, ctl in self.controls.items():
            pred = ctl(x - x_hat)[0] if name == "residual_sae" else ctl(*controls.inputs(ctl, x, idx, val))
            out[f"sae+{name}"] = x_hat + pred
        if self.kl_adapter is not None:
            out["sae+kl_adapter"] = x_hat + self.kl_adapter(x, idx, val)
        rec = {k: self.norm.decode(v) for k, v in out.items()}
        for prefix, model, jnorm in (("joint", self.joint, self.joint_norm), ("poly", self.poly, self.poly_norm)):
            if model is None:
                continue
            paths, _, _ = model.paths(jnorm.encode(h))
            rec[f"{prefix}_full"] = jnorm.decode(sum(paths[p] for p in model.PATHS))
            for name, keep in variants(model).items():       # nfm: sae, sae+linear, sae+interaction; poly: sae
                if name == "full":
                    continue
                for how in ("mean", "zero"):
                    rec[f"{prefix}_{name}[{how}_ablation]"] = jnorm.decode(
                        combine_paths(paths, keep, model.interaction_model, how))
        if self.base is not None:
            rec["standalone_sae"] = self.base_norm.decode(self.base(self.base_norm.encode(h))[0])
        return rec


def covariance_factors(sp: Spliceable, x_train: torch.Tensor, mean_act: torch.Tensor,
                       skip: frozenset = frozenset(), second: str = "[zero_ablation]") -> dict[str, torch.Tensor]:
    """Cholesky factors of each variant's error covariance on training tokens (ablations included; names in skip,
    done by an earlier model family, left out). The errors are never kept: per variant a float64 sum and
    cross-product [d, d] of the errors, shifted by the first chunk's mean error so the subtraction below does not
    cancel (at the paper's 20,000 tokens x d 3,200 x ~24 variants the errors themselves would be 12 GB)."""
    acc: dict[str, list] = {}                                           # name -> [shift, n, sum, cross-product]
    for s in range(0, x_train.shape[0], 4096):
        h = x_train[s:s + 4096]
        recs = {**sp.reconstructions(h), **ablations(h, mean_act)}
        for name, rec in recs.items():
            if name.endswith(second) or name in skip:                   # second figures get no baselines
                continue
            e = (h - rec).double()                                      # [chunk, d]
            a = acc.setdefault(name, [e.mean(0), 0, 0.0, 0.0])
            e -= a[0]
            a[1] += e.shape[0]
            a[2] = a[2] + e.sum(0)
            a[3] = a[3] + e.T @ e
        del recs
    out = {}
    for name, (_, n, total, cross) in acc.items():
        mu = total / n
        cov = (cross - n * torch.outer(mu, mu)) / (n - 1)               # torch.cov's unbiased estimate
        cov += torch.eye(cov.shape[0], dtype=cov.dtype) * (1e-6 * cov.diagonal().mean())
        out[name] = torch.linalg.cholesky(cov).float()
    return out


WHOLE = ("zero_ablation", "mean_ablation")          # the whole activation replaced: reference points, reported last


def ablations(h: torch.Tensor, mean_act: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"zero_ablation": torch.zeros_like(h), "mean_ablation": mean_act.expand_as(h)}


def random_error(h: torch.Tensor, rec: torch.Tensor, chol: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """h plus a random error with the same per-token norm as h - rec: isotropic, or shaped by chol."""
    z = torch.randn(h.shape, generator=gen).to(h.device)
    if chol is not None:
        z = z @ chol.T.to(h.device)
    z = torch.nn.functional.normalize(z, dim=-1)
    return h + (h - rec).norm(dim=-1, keepdim=True) * z


def baseline_generator(seed: int, name: str) -> torch.Generator:
    """The generator of variant `name`'s two random baselines: its own stream, seeded from (seed, name), so a
    variant's baselines are the same bytes whichever other models are spliced beside it and in whatever order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def replacement_stream(h_keep: torch.Tensor, recs: dict, chol: dict, gens: dict, identity: torch.Tensor | None = None,
                       second: str = "[zero_ablation]"):
    """(name, replacement of the kept positions) in report order: the original (None), identity (h_keep itself, or
    `identity`: under --defects splice-offset the training layer's activation), each variant, then each variant's
    two random baselines (eps, then cov, from gens[variant]), drawn only when their turn comes (at batch 32 and
    d 3,200 the ~50 baselines held at once were 2.6 GB)."""
    yield "original", None
    yield "identity", h_keep if identity is None else identity
    yield from recs.items()
    for name, rec in recs.items():
        if name.endswith(second):
            continue                                                            # a second figure: no baselines
        yield f"eps_random[{name}]", random_error(h_keep, rec, None, gens[name])
        yield f"cov_random[{name}]", random_error(h_keep, rec, chol[name], gens[name])


def report_order(names) -> list[str]:
    """original, identity, the variants in first-seen order with the whole-activation ablations last, then each
    variant's baselines in the same order."""
    names = list(dict.fromkeys(names))
    base = [n for n in names if not n.startswith(("eps_random[", "cov_random["))]
    base = [n for n in base if n not in WHOLE] + [n for n in WHOLE if n in base]
    return base + [f"{k}[{v}]" for v in base for k in ("eps_random", "cov_random") if f"{k}[{v}]" in names]


def second_figure(args) -> str:
    """The suffix of the variants reported as labelled second figures, without baselines: zero-ablated NFM paths,
    or under --defects zero-ablation (the reference's headline) the mean-ablated ones."""
    return "[mean_ablation]" if "zero-ablation" in args.defects else "[zero_ablation]"


def headline(sums: dict, results: dict, ablation: str, n_boot: int, seed: int) -> dict:
    """The figures reproduce_reference.py reads, per workflow (sequential: the SAE, SAE + NFM and each NFM path
    alone; joint: its SAE path, all paths, the SAE path plus each NFM path), a removed NFM path removed by
    `ablation` ("mean", or "zero" as the reference did): per-token KL with its CI; the KL reduction of all paths
    against the SAE alone (the study's ~30% sequential, 51.6% joint), each path's, and the interaction path's
    share of the full reduction (its 16.5%), with bootstrap CIs over documents; the SAE's KL over its
    eps-random baseline (its "2.99x")."""
    out = {"ablation": ablation}
    for label, names in (("sequential", {"sae": "sae", "full": "sae+nfm", "linear": f"sae+nfm_linear[{ablation}_ablation]",
                                         "interaction": f"sae+nfm_interaction[{ablation}_ablation]"}),
                         ("joint", {"sae": f"joint_sae[{ablation}_ablation]", "full": "joint_full",
                                    "linear": f"joint_sae+linear[{ablation}_ablation]",
                                    "interaction": f"joint_sae+interaction[{ablation}_ablation]"})):
        if not all(n in sums for n in names.values()):
            continue
        kl = {k: sums[n]["kl"] for k, n in names.items()}
        lin = reduction_and_share_ci(kl["sae"], kl["full"], kl["linear"], n_boot, seed)
        inter = reduction_and_share_ci(kl["sae"], kl["full"], kl["interaction"], n_boot, seed)
        sae = results[names["sae"]]
        out[label] = {"variants": names, **{f"kl_{k}": results[n]["kl"] for k, n in names.items()},
                      **{f"kl_{k}_ci": results[n]["kl_ci"] for k, n in names.items()},
                      "kl_reduction": inter["reduction_full"], "kl_reduction_ci": inter["reduction_full_ci"],
                      "linear_path_kl_reduction": lin["reduction_part"], "linear_path_kl_reduction_ci": lin["reduction_part_ci"],
                      "interaction_path_kl_reduction": inter["reduction_part"],
                      "interaction_path_kl_reduction_ci": inter["reduction_part_ci"],
                      "nonlinear_share": inter["share"], "nonlinear_share_ci": inter["share_ci"],
                      "sae_kl_over_eps_random": sae.get("kl_ratio_to_eps_random"),
                      "sae_kl_over_eps_random_ci": sae.get("kl_ratio_to_eps_random_ci")}
    return out


class Families:
    """The compared models, one family at a time (each loaded, spliced over every document, then freed): at the
    paper preset the SAE, NFM, four controls, the joint model, its 77.5k-latent baseline and a poly model held at
    once were 10 GB of weights beside the LM. The primary SAE stays loaded throughout (every sequential variant
    reads its code); every loader runs once up front as well, so a bad checkpoint fails before any LM pass."""

    def __init__(self, args, sae_cfg: dict, spec: DataSpec):
        self.args, self.sae_cfg, self.spec = args, sae_cfg, spec
        self.has_nfm = bool(args.nfm) and Path(args.nfm).exists()
        self.has_joint = bool(args.joint) and Path(args.joint).exists()
        self.control_names = ([n for n in controls.parse_controls(args.controls) if (Path(args.nfm) / (
            n if n == "residual_sae" else f"controls/{n}") / "config.json").is_file()] if self.has_nfm else [])
        # the first family carries the SAE's own variants, the whole-activation ablations and the KL adapter
        self.loaders = [("SAE and NFM", self.nfm) if self.has_nfm else ("SAE", dict)]
        self.loaders += [(f"control {n}", lambda n=n: {"ctls": controls.load_controls(args.nfm, n, sae_cfg)})
                         for n in self.control_names]
        if self.has_joint:
            self.loaders.append(("joint", self.joint))
            if (Path(args.joint) / "baseline_sae" / "config.json").exists():
                self.loaders.append(("standalone SAE", self.standalone))
        if args.poly:
            self.loaders.append(("poly", self.poly))
        self.meta = {}                                          # e.g. each control's parameter count
        for _, load in self.loaders:                            # validate every checkpoint now, then free it
            models = load()
            self.meta.update({f"params[{k}]": controls.n_params(m) for k, m in models.get("ctls", {}).items()})
            if "nfm" in models:
                self.meta["params[nfm]"] = models["nfm"].param_counts()["total"]

    def nfm(self) -> dict:
        return {"nfm": load_nfm_checkpoint(self.args.nfm, self.sae_cfg)[0]}

    def joint(self) -> dict:
        joint, joint_norm, joint_cfg = load_joint_checkpoint(self.args.joint)
        self._same_layer(joint_cfg, "--joint")
        return {"joint": joint, "joint_norm": joint_norm}

    def standalone(self) -> dict:
        base, base_norm, _ = load_sae_checkpoint(Path(self.args.joint) / "baseline_sae")
        return {"base": base, "base_norm": base_norm}

    def poly(self) -> dict:
        poly, poly_norm, poly_cfg = load_joint_checkpoint(self.args.poly, "--poly", allow_poly=True)
        if poly_cfg["hparams"].get("decoder") != "poly":
            raise cli.UserError(f"--poly {self.args.poly} holds a joint NFM model; pass a part5 --decoder poly folder "
                                f"(the NFM one goes to --joint)")
        self._same_layer(poly_cfg, "--poly")
        return {"poly": poly, "poly_norm": poly_norm}

    def _same_layer(self, cfg: dict, flag: str) -> None:
        other = DataSpec.from_description(cfg["data"])
        if other is None or (other.model, other.layer) != (self.spec.model, self.spec.layer):
            raise cli.UserError(f"{flag} {getattr(self.args, flag[2:])} was not trained on {self.spec.model} layer "
                                f"{self.spec.layer} like --sae {self.args.sae}; pass models of the same layer")


def spliceable(sae, norm, kl_adapter, models: dict, device, raw: bool = False) -> Spliceable:
    """A Spliceable of the resident SAE (and, for the first family, the KL adapter) plus one family's models,
    moved to the device. raw (--defects raw-activations): every model reads and writes un-normalised activations."""
    if raw:
        models = {k: (identity_normalizer(norm) if k.endswith("_norm") and v is not None else v) for k, v in models.items()}
        norm = identity_normalizer(norm)
    for k, m in models.items():
        if k == "ctls":
            for c in m.values():
                c.to(device).eval()
        elif m is not None:
            m.to(device)
            if isinstance(m, torch.nn.Module):
                m.eval()
    sp = Spliceable(sae, norm, models.get("nfm"), models.get("joint"), models.get("joint_norm"), models.get("base"),
                    models.get("base_norm"), models.get("ctls"))
    sp.poly, sp.poly_norm = models.get("poly"), models.get("poly_norm")
    sp.kl_adapter = kl_adapter
    return sp


def identity_normalizer(like: Normalizer) -> Normalizer:
    """A normaliser that changes nothing (the reference fed raw activations to its models, §1.4)."""
    d = like.shift.numel()
    return Normalizer(torch.zeros(d, device=like.shift.device), torch.ones(d, device=like.shift.device), "none")


class Tally:
    """Per-document sums of KL and CE per variant, token counts per document, and up to 50,000 per-token KLs per
    variant for the histograms."""

    def __init__(self, n_docs: int):
        self.sums: dict[str, dict[str, np.ndarray]] = {}
        self.n_kl, self.n_ce = np.zeros(n_docs), np.zeros(n_docs)
        self.doc_ids = np.full(n_docs, -1)
        self.kl_samples: dict[str, list] = {}


def splice_pass(model, tok, spec, sp: Spliceable, mean_act, chol: dict, gens: dict, args, tally: Tally,
                desc: str, site: int | None = None) -> None:
    """One pass over the held-out test-half documents: the original forward, then each of sp's variants not yet
    in the tally (and their baselines) spliced in; the first pass also counts the tokens. site: the layer read and
    written (spec.layer; spec.layer + 1 under --defects splice-offset, where 'identity' writes spec.layer's
    activation)."""
    site = spec.layer if site is None else site
    device = next(model.parameters()).device
    done = frozenset(tally.sums)                                    # evaluated by an earlier family
    first = not done
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs = iter_test_half_sequences(tok, spec, args.docs)           # test-half held-out documents only
    bar = tqdm(total=args.docs, desc=desc, unit="doc")
    while True:
        batch = list(itertools.islice(seqs, args.lm_batch_size))
        if not batch:
            break
        ids, mask = batch_sequences([b[0] for b in batch], pad)
        ids, mask = ids.to(device), mask.to(device)
        docs = torch.tensor([b[1] for b in batch])                             # slot 0..docs-1 of each sequence
        keep = keep_mask(tok, mask, spec.keep_bos).to(device)                   # [batch, pos]
        has_next = torch.zeros_like(keep)
        has_next[:, :-1] = mask[:, 1:].bool()
        ce_pos = keep & has_next                                                # positions that predict a real token
        box = {}

        def capture(h, key="h"):
            box[key] = h
            return h

        with torch.no_grad(), splice(model, site, capture), splice(model, spec.layer, lambda h: capture(h, "train")):
            logp_o = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        h_keep = box["h"][keep].float()                                         # [n_kept, d], at the splice site
        identity = box["train"][keep].float() if site != spec.layer else None
        recs = {k: v for k, v in {**sp.reconstructions(h_keep), **ablations(h_keep, mean_act)}.items()
                if k not in done}
        nxt = torch.zeros_like(ids)
        nxt[:, :-1] = ids[:, 1:]
        doc_of = docs[:, None].expand_as(keep.cpu())
        kept_docs, ce_docs = doc_of[keep.cpu()].numpy(), doc_of[ce_pos.cpu()].numpy()
        if first:
            tally.doc_ids[docs.numpy()] = [b[2] for b in batch]
            np.add.at(tally.n_kl, kept_docs, 1)
            np.add.at(tally.n_ce, ce_docs, 1)
        for name, new in replacement_stream(h_keep, recs, chol, gens, identity, second_figure(args)):
            if not first and name in ("original", "identity"):
                continue
            if new is None:
                logp = logp_o
            else:
                def fn(h, new=new):
                    h = h.clone()
                    h[keep] = new.to(h.dtype)
                    return h
                with torch.no_grad(), splice(model, site, fn):
                    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            kl = (logp_o.exp() * (logp_o - logp)).sum(-1)                       # [batch, pos]
            ce = -logp.gather(-1, nxt[..., None]).squeeze(-1)
            acc = tally.sums.setdefault(name, {"kl": np.zeros(args.docs), "ce": np.zeros(args.docs)})
            np.add.at(acc["kl"], kept_docs, kl[keep].double().cpu().numpy())
            np.add.at(acc["ce"], ce_docs, ce[ce_pos].double().cpu().numpy())
            if len(tally.kl_samples.setdefault(name, [])) < 50_000:
                tally.kl_samples[name].extend(kl[keep].cpu().tolist())
        bar.n = int(docs.max()) + 1
        bar.refresh()
    bar.close()


def main(argv=None):
    args = cli.parse(build_parser(), argv, stage="part6")
    raw = "raw-activations" in args.defects
    cli.seed_everything(args.seed)
    out = cli.prepare_out(args.out, args)
    t0 = time.time()
    sae, norm, sae_cfg = load_sae_checkpoint(args.sae)
    spec = DataSpec.from_description(sae_cfg["data"])
    if spec is None:
        raise cli.UserError(f"--sae {args.sae} was trained on an activation file; part6 needs an SAE trained through "
                            f"an LM (--model), to splice it back in")
    families = Families(args, sae_cfg, spec)
    if sae_cfg["data"].get("model_fingerprint") not in (None, model_fingerprint(resolve_model_path(spec.model))):
        raise cli.UserError(f"the model {spec.model} has changed on disk since --sae was trained; retrain from part1")

    model, tok, _ = load_model(spec.model, args.dtype, args.device)
    device = next(model.parameters()).device
    site = spec.layer + (1 if "splice-offset" in args.defects else 0)      # the layer read and written
    if site > n_layers(model):
        raise cli.UserError(f"--defects splice-offset splices after block {site}, but {spec.model} has "
                            f"{n_layers(model)} blocks; it needs a layer below the last")
    site_spec = dataclasses.replace(spec, layer=site)
    sae.to(device).eval()
    norm.to(device)
    kl_adapter = kl_budget = None
    if args.kl_adapter_steps > 0:
        kl_adapter, kl_budget = train_kl_adapter(model, tok, site_spec, sae, identity_normalizer(norm) if raw else norm,
                                                 args.kl_adapter_steps, args.kl_adapter_batch, args.kl_adapter_lr,
                                                 args.seed)
        kl_budget["nfm_params"] = families.meta.get("params[nfm]")
        kl_adapter.eval().requires_grad_(False)
    # the SAE's own training activations (same tokens, same stored precision) for the covariance baseline
    x_train, _ = cached_activations(spec, "train", sae_cfg["data"]["train_tokens"], args.lm_batch_size, args.cache_dir,
                                    args.dtype, args.device, {"model": model, "tokenizer": tok},
                                    cache_dtype=sae_cfg["data"].get("activation_dtype", "bfloat16"))
    x_train = x_train[:args.cov_tokens].float().to(device)
    mean_act = x_train.mean(0)

    tally = Tally(args.docs)
    for i, (family, load) in enumerate(families.loaders):
        sp = spliceable(sae, norm, kl_adapter if i == 0 else None, load(), device, raw)
        chol = covariance_factors(sp, x_train, mean_act, skip=frozenset(tally.sums), second=second_figure(args))
        gens = {name: baseline_generator(args.seed, name) for name in chol}
        splice_pass(model, tok, spec, sp, mean_act, chol, gens, args, tally,
                    f"KL/CE on held-out test-half documents ({family}, {i + 1}/{len(families.loaders)})", site)
        del sp, chol
    n_kl, n_ce, doc_ids, kl_samples = tally.n_kl, tally.n_ce, tally.doc_ids, tally.kl_samples
    sums = {name: tally.sums[name] for name in report_order(tally.sums)}
    n_docs = int((n_kl > 0).sum())
    if n_docs < 2:
        raise cli.UserError("fewer than 2 held-out documents were found; use a larger text source or --docs")
    used = n_kl > 0
    n_kl, n_ce, doc_ids = n_kl[used], n_ce[used], doc_ids[used]
    for v in sums.values():
        v["kl"], v["ce"] = v["kl"][used], v["ce"][used]

    ce_orig = sums["original"]["ce"].sum() / n_ce.sum()
    ce_zero = sums["zero_ablation"]["ce"].sum() / n_ce.sum()
    results = {}
    for name, s in sums.items():
        kl = ratio_of_sums_ci(s["kl"], n_kl, args.n_boot, args.seed)
        ce = ratio_of_sums_ci(s["ce"], n_ce, args.n_boot, args.seed)
        dce = ratio_of_sums_ci(s["ce"] - sums["original"]["ce"], n_ce, args.n_boot, args.seed)
        r = {"kl": kl[0], "kl_ci": list(kl[1:]), "ce": ce[0], "ce_ci": list(ce[1:]), "delta_ce": dce[0],
             "delta_ce_ci": list(dce[1:]), "ce_loss_score": (ce_zero - ce[0]) / (ce_zero - ce_orig)}
        for base_kind in ("eps_random", "cov_random"):
            b = f"{base_kind}[{name}]"
            if b in sums:
                ratio = ratio_of_sums_ci(s["kl"], sums[b]["kl"], args.n_boot, args.seed)
                r[f"kl_ratio_to_{base_kind}"] = ratio[0]
                r[f"kl_ratio_to_{base_kind}_ci"] = list(ratio[1:])
        results[name] = r
    abl = "zero" if "zero-ablation" in args.defects else "mean"        # how a removed NFM path is removed
    pairs = [(a.replace("[mean_ablation]", f"[{abl}_ablation]"), b.replace("[mean_ablation]", f"[{abl}_ablation]"))
             for a, b in COMPARISONS]
    comparisons = {f"{a} vs {b}": {"kl": paired_difference(sums[a]["kl"], sums[b]["kl"], n_kl, args.n_boot, args.seed),
                                   "ce": paired_difference(sums[a]["ce"], sums[b]["ce"], n_ce, args.n_boot, args.seed)}
                   for a, b in pairs if a in sums and b in sums}
    head = headline(sums, results, abl, args.n_boot, args.seed)
    metrics = {"stage": "part6_kl_divergence", "headline": head, "variants": results, "paired_comparisons": comparisons,
               "n_documents": n_docs, "n_tokens_kl": int(n_kl.sum()), "n_tokens_ce": int(n_ce.sum()),
               "layer": spec.layer, "model": spec.model, "dataset": spec.dataset,
               "split": "validation (held out by document), test half only (common/data.py heldout_half)",
               "evaluated_documents": doc_ids.tolist(),
               "controls": {name: {"params": families.meta[f"params[{name}]"], "checkpoint": str(Path(args.nfm) / (
                   name if name == "residual_sae" else f"controls/{name}"))} for name in families.control_names},
               "kl_adapter": kl_budget,
               "reference_defects": recipe.defects_record(args.defects), "splice_layer": site,
               "definitions": __doc__.split("Demo")[0].strip(), "seconds": time.time() - t0,
               "inputs": {"sae": args.sae, "nfm": args.nfm if families.has_nfm else None,
                          "joint": args.joint if families.has_joint else None, "poly": args.poly or None}}
    cli.write_json(out / "metrics.json", metrics)
    with open(out / "kl.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "kl", "kl_lo", "kl_hi", "ce", "delta_ce", "ce_loss_score", "kl_ratio_to_eps_random",
                    "kl_ratio_to_cov_random"])
        for name, r in results.items():
            w.writerow([name, r["kl"], *r["kl_ci"], r["ce"], r["delta_ce"], r["ce_loss_score"],
                        r.get("kl_ratio_to_eps_random", ""), r.get("kl_ratio_to_cov_random", "")])
    main_variants = [v for v in results if not v.startswith(("eps_random", "cov_random")) and v not in ("original",)]
    shown = [v for v in main_variants if v != "identity"]            # identity is 0: it has no place on a log axis
    pngs = [plots.bars_ci(shown, [results[v]["kl"] for v in shown],
                          [results[v]["kl_ci"] for v in shown], out / "kl_bars.png",
                          f"KL(P_orig || P_spliced) per token, {n_docs} held-out test-half documents (95% CI over documents)",
                          "mean KL (nats)", log_y=True),
            plots.histogram_grid({v: kl_samples[v] for v in main_variants if v != "identity"}, out / "kl_histograms.png",
                                 "per-token KL (log10 nats)")]
    print(f"{n_docs} documents, {int(n_kl.sum())} tokens; KL per token (95% CI) | CE-loss score | KL / eps-random")
    for v in main_variants:
        r = results[v]
        print(f"  {v:24s} {r['kl']:.4f} [{r['kl_ci'][0]:.4f}, {r['kl_ci'][1]:.4f}] | {r['ce_loss_score']:+.3f} | "
              f"{r.get('kl_ratio_to_eps_random', float('nan')):.2f}")
    for label in ("sequential", "joint"):
        if label in head:
            h = head[label]
            print(f"  {label}: KL reduction against its SAE alone {h['kl_reduction']:+.1%} [{h['kl_reduction_ci'][0]:+.1%}, "
                  f"{h['kl_reduction_ci'][1]:+.1%}]; linear path alone {h['linear_path_kl_reduction']:+.1%}, interaction "
                  f"path alone {h['interaction_path_kl_reduction']:+.1%}, its share {h['nonlinear_share']:.1%} "
                  f"({abl}-ablated paths)")
    cli.report(out, out / "metrics.json", [out / "kl.csv", *pngs])


if __name__ == "__main__":
    cli.run_main(main)
