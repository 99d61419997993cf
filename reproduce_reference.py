"""Reproduce the original study (Claflin 2025, arXiv 2507.00269) rung by rung: its recipe with its defects, then
one fix at a time, each fix kept, up to this tool's own recipe, with the study's headline figures at every rung.

    python reproduce_reference.py                                   # the demo ladder (about 20 min on 2 CPU cores)
    python reproduce_reference.py --rungs 0 4 7 --dry-run           # the commands three rungs would run
    python reproduce_reference.py --preset paper --out checkpoints/paper/ladder     # OpenLLaMA-3B, on a GPU
    python reproduce_reference.py --preset paper --estimate         # the GPU-hour arithmetic of that run

Rungs (cumulative; `RUNGS` below). The evaluation fixes come first, on rung 0's checkpoints, so each one's effect
is measured with the models held fixed; then the training fixes, each retraining:
  0  reference  the reference recipe (common/recipe.py) with all six defects: token-level split and latest step
                as "best" (training); raw activations, splice one block downstream, zero-ablation (part6);
                the per-observation clamping ANOVA (part9)
  1  normalisation       part6 feeds the models normalised activations and decodes their output
  2  splice layer        part6 reads and writes at the training layer
  3  mean-ablation       part6 removes an NFM path by its training mean
  4  words x prompts     part9 tests the interaction with words and prompts as the units (min F')
  5  document split      retrained, whole held-out documents (the latest step still kept)
  6  best checkpoint     retrained, the best step on the selection half kept
  7  this tool's recipe  --recipe default (unit-norm decoder with b_dec, AuxK, its optimizers and batches)

Per training key (recipe + training defects) it runs part1, part2 (--controls none), part5 (joint model and its
parameter-matched SAE), part3 (sequential secondary SAE), part8 and part7; per rung part6 (--controls none, no KL
adapter or PolySAE) and part9 (--generate-tokens 0). A run whose folder holds the metrics of the same command is
reused, so rungs share checkpoints where they do not change them and an interrupted ladder resumes stage by
stage. The figures (FIGURES below) are read from the stages' metrics.json into --out: ladder.csv (one row per
rung, first column `rung`, one column per figure), ladder.json (with CIs, sources and the paper's values),
ladder.md (the table) and ladder.png (each figure across the rungs with its 95% CI).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from common import cli, recipe  # noqa: E402
from common.errors import UserError  # noqa: E402

# ----------------------------------------------------------------------------------------------- the ladder
TRAINING = {                      # key -> (recipe, training defects)
    "reference_token-split_latest": ("reference", ("token-split", "latest-as-best")),
    "reference_latest": ("reference", ("latest-as-best",)),
    "reference": ("reference", ()),
    "default": ("default", ()),
}


@dataclass(frozen=True)
class Rung:
    number: int
    name: str
    training: str                 # a TRAINING key
    part6: tuple[str, ...]        # part6's defects
    part9: tuple[str, ...]        # part9's defects
    fix: str                      # what this rung changes (README "Reproducing the original study")


_P6 = ("splice-offset", "raw-activations", "zero-ablation")
_P9 = ("pseudo-replicated-anova",)
RUNGS = [
    Rung(0, "reference", "reference_token-split_latest", _P6, _P9,
         "the reference recipe with all six defects (§1-§10, §14)"),
    Rung(1, "normalisation", "reference_token-split_latest", ("splice-offset", "zero-ablation"), _P9,
         "part6 feeds the models normalised activations and writes their output back in the LM's units (§14.1)"),
    Rung(2, "splice layer", "reference_token-split_latest", ("zero-ablation",), _P9,
         "part6 reads and writes the residual at the training layer, not one block downstream (§14.2)"),
    Rung(3, "mean-ablation", "reference_token-split_latest", (), _P9,
         "a removed NFM path is replaced by its training mean, not deleted (§7.1)"),
    Rung(4, "words x prompts tests", "reference_token-split_latest", (), (),
         "part9 tests the clamping interaction with words and prompts as units (min F'), not per observation (§14.10)"),
    Rung(5, "document split", "reference_latest", (), (),
         "retrained on whole training documents and measured on held-out documents, not a random tenth of tokens (§14.8)"),
    Rung(6, "best checkpoint", "reference", (), (),
         "retrained keeping the best step on the selection half, not the latest (§14.13)"),
    Rung(7, "this tool's recipe", "default", (), (),
         "this tool's recipe: unit-norm decoder with b_dec, AuxK, scalar normalisation, its optimizers and batches"),
]

# the demo's step budget (no --preset): part5's reference batch of 64 tokens would take 8,437 steps at 6 epochs
DEMO_ARGS = {"part5": ["--epochs", "2"], "part6": ["--docs", "60"], "part9": ["--null-features", "10"]}
# what every rung's evaluation leaves out: controls, the KL adapter and the PolySAE are not the study's
EVAL_ARGS = {"part2": ["--controls", "none"], "part6": ["--controls", "none", "--kl-adapter-steps", "0", "--poly", ""],
             "part9": ["--generate-tokens", "0"]}
SCRIPTS = {"part1": "part1_train_topk_sae.py", "part2": "part2_train_residual_nfm.py",
           "part5": "part5_joint_sae_nfm.py", "part3": "part3_train_secondary_sae.py",
           "part8": "part8_stimulus_response.py", "part7": "part7_gram_analysis.py",
           "part6": "part6_kl_divergence.py", "part9": "part9_clamping_intervention.py"}
FOLDERS = {"part1": "part1_sae", "part2": "part2_nfm", "part5": "part5_joint", "part3": "part3_secondary_sae",
           "part8": "part8_stimuli", "part7": "part7_gram", "part6": "part6_kl", "part9": "part9_clamp"}
CLAMP = "mult=4"                  # the reference clamped at x4 (its F = 5.06, p = 0.027: §10.3)


@dataclass
class Run:
    stage: str
    out: Path
    argv: list[str]

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / SCRIPTS[self.stage]), *self.argv, "--out", str(self.out)]


def _defects(names, stage: str) -> list[str]:
    on = [n for n in names if stage in recipe.DEFECTS[n][1]]
    return ["--defects", ",".join(on)] if on else []


def training_runs(key: str, root: Path, extra: dict) -> list[Run]:
    """part1 -> part2, part5 -> part3 -> part8, part7 of one training key, in root/train/<key>/."""
    rec, defects = TRAINING[key]
    t = root / "train" / key
    f = {s: str(t / FOLDERS[s]) for s in FOLDERS}
    trained = lambda s: ["--recipe", rec, *_defects(defects, s)]                       # noqa: E731
    return [Run("part1", t / FOLDERS["part1"], [*trained("part1"), *extra["part1"]]),
            Run("part2", t / FOLDERS["part2"], ["--sae", f["part1"], *trained("part2"), *extra["part2"]]),
            Run("part5", t / FOLDERS["part5"], ["--sae", f["part1"], *trained("part5"), *extra["part5"]]),
            Run("part3", t / FOLDERS["part3"], ["--nfm", f["part2"], *trained("part3"), *extra["part3"]]),
            Run("part8", t / FOLDERS["part8"], ["--sae", f["part1"], "--nfm", f["part2"], "--secondary", f["part3"],
                                                *extra["part8"]]),
            Run("part7", t / FOLDERS["part7"], ["--sae", f["part1"], "--joint", f["part5"], *extra["part7"]])]


def eval_folder(root: Path, rung: Rung, stage: str) -> Path:
    """One folder per (training key, the stage's defects): rungs that differ in neither share it."""
    defects = rung.part6 if stage == "part6" else rung.part9
    tag = "+".join(defects) or "none"
    return root / "eval" / rung.training / f"{FOLDERS[stage]}__{tag}"


def eval_runs(rung: Rung, root: Path, extra: dict) -> list[Run]:
    t = root / "train" / rung.training
    f = {s: str(t / FOLDERS[s]) for s in FOLDERS}
    return [Run("part6", eval_folder(root, rung, "part6"), ["--sae", f["part1"], "--nfm", f["part2"], "--joint", f["part5"],
                                                             *_defects(rung.part6, "part6"), *extra["part6"]]),
            Run("part9", eval_folder(root, rung, "part9"), ["--sae", f["part1"], "--nfm", f["part2"],
                                                             "--secondary", f["part3"], "--part8", f["part8"],
                                                             *_defects(rung.part9, "part9"), *extra["part9"]])]


def plan(rungs: list[Rung], root: Path, extra: dict) -> list[Run]:
    """Every run the rungs need, each once, in dependency order (training before evaluation)."""
    runs, seen = [], set()
    for r in rungs:
        for run in training_runs(r.training, root, extra) + eval_runs(r, root, extra):
            if run.out not in seen:
                seen.add(run.out)
                runs.append(run)
    return sorted(runs, key=lambda run: run.stage in ("part6", "part9"))


STAMP = "ladder_command.json"


def is_done(run: Run) -> bool:
    """The folder holds this exact command's finished results (its metrics.json and the stamp written after)."""
    stamp = run.out / STAMP
    try:
        return (run.out / "metrics.json").is_file() and json.loads(stamp.read_text())["argv"] == run.argv
    except (OSError, ValueError, KeyError):
        return False


def execute(runs: list[Run], log: Path, dry_run: bool) -> dict:
    """Run what is not done (stdout and stderr to log); returns {out folder: 'ran' | 'reused'}."""
    status = {}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for i, run in enumerate(runs, 1):
        done = is_done(run)
        status[str(run.out)] = "reused" if done else "ran"
        shown = shlex.join([Path(run.command[0]).name, *run.command[1:]])
        print(f"[{i}/{len(runs)}] {'reuse' if done else 'run  '} {shown}", flush=True)
        if done or dry_run:
            continue
        t0 = time.time()
        with open(log, "a") as fh:
            fh.write(f"\n$ {shown}\n")
            fh.flush()
            res = subprocess.run([*run.command, "--overwrite"], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if res.returncode != 0:
            raise UserError(f"{SCRIPTS[run.stage]} failed (exit {res.returncode}); its output is in {log}. Fix it "
                            f"and rerun: finished stages are reused")
        cli.write_json(run.out / STAMP, {"argv": run.argv, "seconds": time.time() - t0})
        print(f"      done in {time.time() - t0:.0f} s", flush=True)
    return status


# ----------------------------------------------------------------------------------------------- figures
def _dig(obj, *path):
    for k in path:
        if obj is None:
            return None
        obj = obj.get(k) if isinstance(obj, dict) else None
    return obj


def _fig(value, ci=None) -> dict:
    ok = lambda v: v is not None and isinstance(v, (int, float)) and math.isfinite(v)   # noqa: E731
    return {"value": float(value) if ok(value) else None,
            "ci": [float(c) for c in ci] if ci and all(ok(c) for c in ci) else None}


def _part5(m, r: Rung, key: str) -> dict:
    c = m["part5"]["comparisons"]
    if key == "joint_vs_own_sae_path":
        k = "joint_vs_own_sae_path_relative_fvu_reduction" + ("[zero_ablation]" if "zero-ablation" in r.part6 else "")
    else:
        k = "joint_vs_standalone_relative_fvu_reduction"
    return _fig(c.get(k), c.get(k + "_ci"))


def _part6(m, r: Rung, workflow: str, key: str) -> dict:
    h = _dig(m["part6"], "headline", workflow) or {}
    return _fig(h.get(key), h.get(key + "_ci"))


def _seed(m) -> dict:
    return _dig(m["part7"], "models", "joint (W_dec + W_lin)", "seed_bimodality") or {}


def _seed_ratio(m, key: str) -> dict:
    """The study's part17 figures; none for unit-norm decoders (every squared norm 1: no split, no ranking)."""
    if _seed(m).get("all_unit_norm", True):
        return _fig(None)
    row = _dig(_seed(m), "ratios", "nfm_total") or {}
    return _fig(row.get(key), row.get(key + "_ci"))


def _modes(m, model: str) -> dict:
    """1 if the squared decoder norms have two modes (BIC and two density peaks), else 0: the SAE's from part7's
    geometry (its e_i is W_dec[i]), the joint model's from the seed's analysis of its SAE decoder alone."""
    b = _dig(m["part7"], "models", "part1 SAE", "bimodality") if model == "sae" else _seed(m).get("modes")
    if b is None and model == "sae":
        return _fig(0.0)                        # unit-norm rows: one value, one mode
    return _fig(None if b is None else float(b["two_modes"]))


def _low_fraction(m) -> dict:
    s = _seed(m)
    n = s.get("n_features") or 0
    return _fig(s["n_low"] / n if n and not s.get("all_unit_norm", True) else None)


def _part9(m, r: Rung, key: str) -> dict:
    t = _dig(m["part9"], "conditions", "target", CLAMP) or {}
    src = t.get("reference_anova") if "pseudo-replicated-anova" in r.part9 else t
    return _fig(_dig(src, "A:B", key))


# (column, what it is, the paper's figure or None, getter(metrics by stage, rung))
FIGURES = [
    ("joint_vs_own_sae_path", "joint model vs its own SAE path: relative FVU reduction", 0.413,
     lambda m, r: _part5(m, r, "joint_vs_own_sae_path")),
    ("joint_vs_equal_params_sae", "joint model vs an SAE of equal parameters: relative FVU reduction", None,
     lambda m, r: _part5(m, r, "standalone")),
    ("sequential_residual_reduction", "sequential NFM: residual reduction", 0.234,
     lambda m, r: _fig(_dig(m["part2"], "held_out_test", "residual_reduction", "both"),
                       _dig(m["part2"], "held_out_test", "residual_reduction_ci", "both"))),
    ("sequential_kl_reduction", "KL reduction, sequential (SAE + NFM vs SAE)", 0.298,
     lambda m, r: _part6(m, r, "sequential", "kl_reduction")),
    ("joint_kl_reduction", "KL reduction, joint (all paths vs its SAE path)", 0.516,
     lambda m, r: _part6(m, r, "joint", "kl_reduction")),
    ("sae_kl_over_eps_random", "SAE KL / eps-random KL", 2.99,
     lambda m, r: _part6(m, r, "sequential", "sae_kl_over_eps_random")),
    ("joint_nonlinear_share", "joint: interaction path's share of the KL reduction", 0.165,
     lambda m, r: _part6(m, r, "joint", "nonlinear_share")),
    ("sae_sq_norm_two_modes", "SAE: squared decoder norms have two modes (1/0)", 0.0, lambda m, r: _modes(m, "sae")),
    ("joint_sq_norm_two_modes", "joint: squared SAE-decoder norms have two modes (1/0)", 1.0,
     lambda m, r: _modes(m, "joint")),
    ("joint_low_norm_fraction", "joint: share of features with squared norm < 0.2", None,
     lambda m, r: _low_fraction(m)),
    ("low_norm_nfm_share", "joint: NFM weight share, squared norm < 0.2", 0.828,
     lambda m, r: _seed_ratio(m, "mean_low")),
    ("high_norm_nfm_share", "joint: NFM weight share, squared norm > 0.2", 0.713,
     lambda m, r: _seed_ratio(m, "mean_high")),
    ("nfm_share_vs_sq_norm_rho", "joint: Spearman rho of NFM weight share with squared norm", -0.987,
     lambda m, r: _seed_ratio(m, "spearman_rho")),
    ("clamping_interaction_F", f"clamping the top integration feature ({CLAMP[5:]}x): interaction F", 5.06,
     lambda m, r: _part9(m, r, "F")),
    ("clamping_interaction_p", f"clamping ({CLAMP[5:]}x): interaction p", 0.027, lambda m, r: _part9(m, r, "p")),
]


def rung_metrics(rung: Rung, root: Path) -> dict:
    t = root / "train" / rung.training
    paths = {s: t / FOLDERS[s] for s in ("part1", "part2", "part5", "part3", "part8", "part7")}
    paths.update(part6=eval_folder(root, rung, "part6"), part9=eval_folder(root, rung, "part9"))
    return {s: json.loads((p / "metrics.json").read_text()) for s, p in paths.items()}


def collect(rungs: list[Rung], root: Path) -> list[dict]:
    rows = []
    for r in rungs:
        m = rung_metrics(r, root)
        rows.append({"rung": r.number, "name": r.name, "fix": r.fix, "training": TRAINING[r.training][0],
                     "training_defects": list(TRAINING[r.training][1]), "part6_defects": list(r.part6),
                     "part9_defects": list(r.part9), "clamped_feature": m["part9"].get("feature"),
                     "figures": {col: get(m, r) for col, _, _, get in FIGURES}})
    return rows


def fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def write_outputs(rows: list[dict], out: Path, meta: dict) -> list[Path]:
    """ladder.csv, ladder.json, ladder.md and ladder.png."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rung", *[c for c, *_ in FIGURES]])
    for row in rows:
        w.writerow([row["rung"], *["" if row["figures"][c]["value"] is None else repr(row["figures"][c]["value"])
                                   for c, *_ in FIGURES]])
    from common.checkpoint import atomic_write_bytes
    atomic_write_bytes(out / "ladder.csv", buf.getvalue().encode())
    cli.write_json(out / "ladder.json", {**meta, "figures": [{"column": c, "what": what, "paper": paper}
                                                             for c, what, paper, _ in FIGURES], "rungs": rows})
    lines = ["| figure | paper | " + " | ".join(f"{r['rung']} {r['name']}" for r in rows) + " |",
             "|---|---|" + "---|" * len(rows)]
    for c, what, paper, _ in FIGURES:
        cells = []
        for r in rows:
            f = r["figures"][c]
            cells.append(fmt(f["value"]) + (f" [{fmt(f['ci'][0])}, {fmt(f['ci'][1])}]" if f["ci"] else ""))
        lines.append(f"| {what} | {fmt(paper)} | " + " | ".join(cells) + " |")
    atomic_write_bytes(out / "ladder.md", ("\n".join(lines) + "\n").encode())
    ladder_png(rows, out / "ladder.png")
    return [out / "ladder.csv", out / "ladder.json", out / "ladder.md", out / "ladder.png"]


def ladder_png(rows: list[dict], path: Path) -> None:
    """One panel per figure: its value at each rung with the 95% CI, the paper's value dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(FIGURES)
    cols = 3
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5 * cols, 2.6 * math.ceil(n / cols)), squeeze=False)
    xs = [r["rung"] for r in rows]
    for ax, (c, what, paper, _) in zip(axes.flat, FIGURES):
        for x, r in zip(xs, rows):
            f = r["figures"][c]
            if f["value"] is None:
                continue
            err = [[f["value"] - f["ci"][0]], [f["ci"][1] - f["value"]]] if f["ci"] else None
            ax.errorbar([x], [f["value"]], yerr=err, fmt="o", color="C0", capsize=3)
        ax.plot([x for x, r in zip(xs, rows) if r["figures"][c]["value"] is not None],
                [r["figures"][c]["value"] for r in rows if r["figures"][c]["value"] is not None], color="C0", alpha=0.4)
        if paper is not None:
            ax.axhline(paper, color="C3", ls="--", lw=1, label="paper")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(what, fontsize=8)
        ax.set_xticks(xs)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("rung (cumulative fixes: " + "; ".join(f"{r['rung']} {r['name']}" for r in rows) + ")", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- GPU estimate
def estimate_gpu_hours(rungs: list[Rung], tflops: float, step_overhead_s: float) -> dict:
    """Arithmetic, not a measurement (no GPU run exists yet): per training stage at the paper preset, steps x
    (tokens x the dense products' FLOPs / tflops + step_overhead_s), and the LM forwards of part6; the reference's
    batches (64 tokens in part5, 130 in part2) make its runs step-bound, not FLOP-bound."""
    d, n, k, dim = 3200, 50_000, 1024, 300
    lm_flops_per_token = 2 * 3.4e9
    out = {}
    for key in dict.fromkeys(r.training for r in rungs):
        rec, _ = TRAINING[key]
        fl = recipe.FLAG_DEFAULTS
        batch = {s: (fl[s]["batch_size"] if rec == "reference" else cli.PRESETS["paper"][s]["batch_size"])
                 for s in ("part1", "part2", "part3", "part5")}
        tokens = {s: cli.PRESETS["paper"][s]["train_tokens"] * 6 for s in batch}    # 6 epochs each
        per_token = {"part1": 6 * d * n, "part2": 6 * k * (dim + d) + 6 * dim * dim,
                     "part3": 6 * dim * 25 * dim, "part5": 6 * d * n + 6 * d * int(n * 1.55)}   # + its baseline SAE
        stages = {s: tokens[s] / batch[s] * (step_overhead_s * (2 if s == "part5" else 1))
                  + tokens[s] * per_token[s] / (tflops * 1e12) for s in batch}
        out[key] = {"hours_by_stage": {s: v / 3600 for s, v in stages.items()}, "hours": sum(stages.values()) / 3600}
    # the LM: activations collected once into the shared cache (5M + 0.1M tokens), then part6's splices (four
    # LM forwards a batch: the original and one per model family) per distinct evaluation; fp16 at ~4x fp32
    collect = 5.1e6 * lm_flops_per_token / (tflops * 1e12 * 4) / 3600
    evals = {(r.training, r.part6) for r in rungs}
    part6 = len(evals) * 2000 * 128 * lm_flops_per_token * 4 / (tflops * 1e12 * 4) / 3600
    total = sum(v["hours"] for v in out.values()) + collect + part6
    return {"assumptions": {"effective_fp32_tflops": tflops, "seconds_per_step_overhead": step_overhead_s,
                            "epochs": 6, "note": "arithmetic from the preset's token counts and batches, not measured"},
            "training": out, "activation_collection_hours": collect, "part6_hours": part6, "total_hours": total}


# ----------------------------------------------------------------------------------------------- main
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "checkpoints" / "reference_ladder"),
                   help="folder of every stage's run and the ladder's files (default: checkpoints/reference_ladder)")
    p.add_argument("--rungs", type=int, nargs="+", default=[r.number for r in RUNGS],
                   help="rungs to run (default: all, 0-7); the stages they share run once")
    p.add_argument("--seed", type=int, default=0, help="seed passed to every stage (default: 0)")
    p.add_argument("--preset", choices=sorted(cli.PRESETS), default=None,
                   help="pass --preset to every stage (the paper setup: OpenLLaMA-3B, on a GPU) instead of the "
                        "demo's step budget")
    p.add_argument("--stage-args", action="append", default=[], metavar="STAGE=FLAGS",
                   help="extra flags for one stage, e.g. 'part1=--n-latents 512 --k 16' (repeatable; after the "
                        "ladder's own, so they win)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and which would be reused, run nothing")
    p.add_argument("--estimate", action="store_true",
                   help="print the GPU-hour arithmetic of these rungs at the paper preset, run nothing")
    p.add_argument("--tflops", type=float, default=10.0,
                   help="--estimate: effective fp32 TFLOP/s of the GPU (default: 10, a 24 GB RTX 3090's third)")
    p.add_argument("--step-overhead", type=float, default=0.004,
                   help="--estimate: seconds of fixed cost per optimizer step (default: 0.004)")
    return p


def stage_extra(args) -> dict:
    extra = {s: list(EVAL_ARGS.get(s, [])) + (list(DEMO_ARGS.get(s, [])) if args.preset is None else [])
             for s in SCRIPTS}
    for s in extra:
        extra[s] += ["--seed", str(args.seed)] + (["--preset", args.preset] if args.preset else [])
    for spec in args.stage_args:
        stage, _, flags = spec.partition("=")
        if stage not in SCRIPTS or not _:
            raise UserError(f"--stage-args {spec!r}: write STAGE=FLAGS with STAGE one of {', '.join(SCRIPTS)}")
        extra[stage] += shlex.split(flags)
    return extra


def main(argv=None):
    args = build_parser().parse_args(argv)
    bad = [n for n in args.rungs if n not in {r.number for r in RUNGS}]
    if bad:
        raise UserError(f"--rungs: no rung {', '.join(map(str, bad))}; the rungs are 0-{len(RUNGS) - 1}")
    rungs = [r for r in RUNGS if r.number in sorted(set(args.rungs))]
    if args.estimate:
        est = estimate_gpu_hours(rungs, args.tflops, args.step_overhead)
        print(json.dumps(est, indent=2))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(rungs, out, stage_extra(args))
    print(f"reference ladder: rungs {', '.join(str(r.number) for r in rungs)}; {len(runs)} stage runs "
          f"(training keys: {', '.join(dict.fromkeys(r.training for r in rungs))}); stage output in {out / 'ladder.log'}")
    t0 = time.time()
    status = execute(runs, out / "ladder.log", args.dry_run)
    if args.dry_run:
        return
    rows = collect(rungs, out)
    meta = {"source": "reproduce_reference.py; the original study: Claflin 2025 (arXiv 2507.00269), "
                      "../shared/reference/original_study.md", "seed": args.seed, "preset": args.preset,
            "runs": status, "seconds": time.time() - t0,
            "definitions": "figures on held-out test documents (rungs 0-4: held-out tokens of the training documents, "
                           "the reference's token split), 95% CIs by bootstrap over documents (tokens under the token "
                           "split; Fisher z for rho); the clamping F and p are the reference's per-observation ANOVA "
                           "at rungs 0-3 and the words x prompts min F' from rung 4; two-modes: 1- vs 2-component "
                           "mixture BIC > 10 and two density peaks; NFM weight share: (||W_lin[i]|| + ||V[i]||) / "
                           "(that + ||W_dec[i]||), the reference's part17"}
    files = write_outputs(rows, out, meta)
    print((out / "ladder.md").read_text())
    print(f"ladder in {out}/ ({time.time() - t0:.0f} s; {sum(v == 'ran' for v in status.values())} runs, "
          f"{sum(v == 'reused' for v in status.values())} reused)")
    for f in files:
        print(f"  {f}")


if __name__ == "__main__":
    cli.run_main(main)
