"""reproduce_reference.py: the rung-by-rung ladder on the tiny demo (rungs 0 and 4: one training, every evaluation
switch on, then off), its reuse of shared runs, that every figure is the stage's own number, and the plan of
all eight rungs (the retraining rungs' commands)."""
import csv
import json
import subprocess
import sys

import pytest

from conftest import ROOT, script_env

RUNGS = ["0", "4"]


def ladder_cmd(tiny_demo, out, *more):
    cache = str(out / "cache")
    data = ["--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"), "--layer", "1"]
    held = ["--val-tokens", "2000", "--cache-dir", cache]
    stage = {"part1": [*data, "--n-latents", "64", "--k", "8", "--train-tokens", "8000", *held, "--epochs", "1"],
             "part2": ["--nfm-dim", "8", "--train-tokens", "8000", *held, "--epochs", "1", "--n-boot", "50"],
             "part5": [*data, "--n-latents", "64", "--k", "8", "--nfm-dim", "8", "--train-tokens", "8000", *held,
                       "--steps", "30", "--n-boot", "50"],
             "part3": ["--expansion", "2", "--k", "2", "--steps", "20", "--train-tokens", "8000", *held],
             "part7": held, "part8": [],
             "part6": ["--docs", "16", "--n-boot", "50", "--cov-tokens", "2000", "--cache-dir", cache],
             "part9": ["--n-prompts", "12", "--null-features", "3"]}
    args = [a for s, flags in stage.items() for a in ("--stage-args", f"{s}={subprocess.list2cmdline(flags)}")]
    return [sys.executable, str(ROOT / "reproduce_reference.py"), "--rungs", *RUNGS, "--out", str(out), *args, *more]


@pytest.fixture(scope="module")
def ladder(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("ladder")
    res = subprocess.run(ladder_cmd(tiny_demo, out), cwd=ROOT, env=script_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + (out / "ladder.log").read_text()[-3000:]
    return out, res


def rows(out):
    with open(out / "ladder.csv") as f:
        return list(csv.DictReader(f))


def test_ladder_files_and_shared_runs(ladder):
    out, res = ladder
    import reproduce_reference as rr
    table = rows(out)
    assert list(table[0])[0] == "rung" and list(table[0])[1:] == [c for c, *_ in rr.FIGURES]
    assert [r["rung"] for r in table] == RUNGS
    for f in ("ladder.json", "ladder.md", "ladder.png"):
        assert (out / f).stat().st_size > 0
    meta = json.loads((out / "ladder.json").read_text())
    # one training (6 runs) shared by both rungs; part6 and part9 once each per rung
    assert len(meta["runs"]) == 6 + 2 + 2 and set(meta["runs"].values()) == {"ran"}
    by = {r["rung"]: r["figures"] for r in meta["rungs"]}
    # rungs 0-4 share their training: the training-only figures are the same numbers
    for col in ("sequential_residual_reduction", "joint_vs_equal_params_sae", "high_norm_nfm_share",
                "nfm_share_vs_sq_norm_rho"):
        assert by[0][col]["value"] == by[4][col]["value"] is not None, col
    # the splice fixes change the KL figures
    assert by[0]["sae_kl_over_eps_random"]["value"] != by[4]["sae_kl_over_eps_random"]["value"]


def test_ladder_figures_are_the_stages_numbers(ladder):
    out, _ = ladder
    meta = json.loads((out / "ladder.json").read_text())
    by = {r["rung"]: r["figures"] for r in meta["rungs"]}
    ref = out / "train" / "reference_token-split_latest"
    m5 = json.loads((ref / "part5_joint" / "metrics.json").read_text())
    c, fvu = m5["comparisons"], m5["held_out_test"]["fvu"]
    # zero-ablation on (rung 0): the study's "own SAE path" deletes the NFM paths; rung 4 mean-ablates them
    assert by[0]["joint_vs_own_sae_path"]["value"] == c["joint_vs_own_sae_path_relative_fvu_reduction[zero_ablation]"]
    assert by[4]["joint_vs_own_sae_path"]["value"] == c["joint_vs_own_sae_path_relative_fvu_reduction"]
    # part5's bootstrap point is the FVU ratio (the total variance cancels), and its CI brackets it
    assert by[4]["joint_vs_own_sae_path"]["value"] == pytest.approx(1 - fvu["full"] / fvu["sae[mean_ablation]"], rel=1e-6)
    lo, hi = by[4]["joint_vs_own_sae_path"]["ci"]
    assert lo <= by[4]["joint_vs_own_sae_path"]["value"] <= hi
    # the token split: bootstrap units are rows of the training documents' held-out tenth
    assert c["n_bootstrap_units"] == m5["held_out_test"]["n_tokens"]
    # KL figures: part6's headline of the matching evaluation folder
    m6 = json.loads((out / "eval" / "reference_token-split_latest" / "part6_kl__none" / "metrics.json").read_text())
    h = m6["headline"]["joint"]
    assert by[4]["joint_kl_reduction"]["value"] == h["kl_reduction"] and by[4]["joint_kl_reduction"]["ci"] == h["kl_reduction_ci"]
    m6z = json.loads((out / "eval" / "reference_token-split_latest" / "part6_kl__splice-offset+raw-activations+"
                      "zero-ablation" / "metrics.json").read_text())
    assert m6z["headline"]["ablation"] == "zero" and m6["headline"]["ablation"] == "mean"
    assert by[0]["joint_nonlinear_share"]["value"] == m6z["headline"]["joint"]["nonlinear_share"]
    # clamping: the reference's per-observation ANOVA at rung 0, the words x prompts min F' from rung 4
    m9p = json.loads((out / "eval" / "reference_token-split_latest" / "part9_clamp__pseudo-replicated-anova"
                      / "metrics.json").read_text())
    m9 = json.loads((out / "eval" / "reference_token-split_latest" / "part9_clamp__none" / "metrics.json").read_text())
    t = m9p["conditions"]["target"]["mult=4"]
    if "reference_anova" in t:
        assert by[0]["clamping_interaction_F"]["value"] == t["reference_anova"]["A:B"]["F"]
    t4 = m9["conditions"]["target"]["mult=4"]
    if "A:B" in t4:
        assert by[4]["clamping_interaction_p"]["value"] == t4["A:B"]["p"]
    # the recipe and the training defects reached every trained stage; free decoder norms can be judged for modes
    for stage in ("part1_sae", "part2_nfm", "part5_joint", "part3_secondary_sae"):
        assert json.loads((ref / stage / "config.json").read_text())["recipe"]["name"] == "reference"
    assert [d["name"] for d in json.loads((ref / "part1_sae" / "metrics.json").read_text())["reference_defects"]] \
        == ["token-split", "latest-as-best"]
    assert by[0]["joint_sq_norm_two_modes"]["value"] in (0.0, 1.0)


def test_ladder_rerun_reuses_every_run(ladder, tiny_demo):
    """A second run with the same flags runs no stage and writes the same table; a changed flag reruns only the
    stages it reaches."""
    out, _ = ladder
    before = (out / "ladder.csv").read_bytes()
    res = subprocess.run(ladder_cmd(tiny_demo, out), cwd=ROOT, env=script_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "0 runs, 10 reused" in res.stdout and (out / "ladder.csv").read_bytes() == before
    dry = subprocess.run(ladder_cmd(tiny_demo, out, "--stage-args", "part9=--null-features 4", "--dry-run"), cwd=ROOT,
                         env=script_env(), capture_output=True, text=True)
    lines = [ln for ln in dry.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 10 and sum(" run " in ln for ln in lines) == 2
    assert all("part9_clamping" in ln for ln in lines if " run " in ln)


def test_gpu_hour_estimate_and_bad_rung():
    import reproduce_reference as rr
    est = rr.estimate_gpu_hours(rr.RUNGS, 10.0, 0.004)
    t = est["training"]
    # the reference's small batches (64 / 130 tokens) cost more steps than this tool's 4,096 / 1,024
    assert t["reference"]["hours"] > t["default"]["hours"] > 0
    assert est["total_hours"] > sum(v["hours"] for v in t.values())
    bad = subprocess.run([sys.executable, str(ROOT / "reproduce_reference.py"), "--rungs", "9", "--dry-run"], cwd=ROOT,
                         env=script_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "no rung 9" in bad.stderr and "Traceback" not in bad.stderr


def test_plan_of_all_rungs(tmp_path):
    """All eight rungs: 4 trainings x 6 stages, 7 distinct part6 and 5 part9 evaluations; each training gets its
    recipe and only the training defects of its stage; this tool's recipe (rung 7) gets none."""
    import reproduce_reference as rr
    runs = rr.plan(rr.RUNGS, tmp_path, rr.stage_extra(rr.build_parser().parse_args([])))
    assert len(runs) == 24 + 7 + 5 and len({r.out for r in runs}) == len(runs)
    assert sorted(r.stage for r in runs[24:]) == ["part6"] * 7 + ["part9"] * 5
    argv = {(r.out.parent.name, r.stage): r.argv for r in runs if r.stage in ("part1", "part3", "part5")}
    assert argv[("reference_token-split_latest", "part1")][:4] == ["--recipe", "reference", "--defects",
                                                                  "token-split,latest-as-best"]
    assert argv[("reference_token-split_latest", "part3")][:4] == ["--nfm", str(tmp_path / "train" /
                                                                  "reference_token-split_latest" / "part2_nfm"),
                                                                  "--recipe", "reference"]
    p3 = argv[("reference_token-split_latest", "part3")]
    assert p3[p3.index("--defects") + 1] == "latest-as-best"            # part3 has no token split to switch on
    assert argv[("reference_latest", "part5")][2:6] == ["--recipe", "reference", "--defects", "latest-as-best"]
    assert "--defects" not in argv[("reference", "part1")] and "--defects" not in argv[("default", "part5")]
    assert argv[("default", "part1")][:2] == ["--recipe", "default"]
    # training runs come before every evaluation that reads them
    first_eval = min(i for i, r in enumerate(runs) if r.stage in ("part6", "part9"))
    assert all(r.stage not in ("part6", "part9") for r in runs[:first_eval]) and first_eval == 24


def test_unit_norm_decoders_give_no_seed_figures():
    """With this tool's unit-norm decoders every squared norm is 1: the study's split, ranking and modes are not
    figures (None), while the SAE's geometry says one mode."""
    import reproduce_reference as rr
    unit = {"part7": {"models": {"part1 SAE": {"bimodality": {"two_modes": False}}, "joint (W_dec + W_lin)": {
        "seed_bimodality": {"all_unit_norm": True, "n_low": 0, "n_features": 8, "modes": None,
                            "ratios": {"nfm_total": {"mean_high": 0.4}}}}}}}
    fig = {c: get(unit, rr.RUNGS[7]) for c, _, _, get in rr.FIGURES if c in (
        "sae_sq_norm_two_modes", "joint_sq_norm_two_modes", "joint_low_norm_fraction", "high_norm_nfm_share")}
    assert fig["sae_sq_norm_two_modes"]["value"] == 0.0
    assert all(fig[c]["value"] is None for c in ("joint_sq_norm_two_modes", "joint_low_norm_fraction",
                                                  "high_norm_nfm_share"))
