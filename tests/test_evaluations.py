"""part4-part7 and their statistics: unit tests against hand-computed values, and subprocess smoke runs."""
import json

import numpy as np
import pytest
import torch
from scipy import stats as sps

from common.featurestats import effective_rank, gini, gmm_bic, max_abs_cosine
from common.joint import VARIANTS, JointModel
from common.nfm import NFM, NFMConfig
from common.sae import SAEConfig
from common.stats import paired_difference, ratio_of_sums_ci
from conftest import run_script


def test_gini_and_effective_rank_hand_values():
    w = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                      [1.0, 2.0, 3.0, 4.0]])
    # Gini of [1,2,3,4]: 2*(1+4+9+16)/(4*10) - 5/4 = 1.5 - 1.25 = 0.25
    assert torch.allclose(gini(w), torch.tensor([0.75, 0.0, 0.5, 0.0, 0.25], dtype=torch.float64))
    p = np.array([1, 2, 3, 4]) / 10
    assert torch.allclose(effective_rank(w), torch.tensor([1.0, 4.0, 2.0, 1.0, np.exp(-(p * np.log(p)).sum())],
                                                          dtype=torch.float64))


def test_chunked_max_cosine_equals_dense():
    E = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    best, mean_abs = max_abs_cosine(E, chunk=7)
    U = torch.nn.functional.normalize(E.double(), dim=1)
    C = (U @ U.T).abs()
    C.fill_diagonal_(0)
    assert (best - C.max(1).values).abs().max() < 1e-6                 # a float32 Gram of float64-normalised rows
    assert abs(mean_abs - float(C.sum() / (50 * 49))) < 1e-7


def test_bimodality_test():
    rng = np.random.default_rng(0)
    assert gmm_bic(np.concatenate([rng.normal(0.05, 0.01, 500), rng.normal(0.4, 0.05, 500)]))["two_modes"]
    assert not gmm_bic(rng.normal(0.4, 0.05, 1000))["two_modes"]
    skewed = gmm_bic(rng.lognormal(0, 0.6, 2000))                   # one peak with a long tail
    assert skewed["delta_bic"] > 10 and not skewed["two_modes"]
    m = gmm_bic(np.concatenate([rng.normal(0.05, 0.01, 500), rng.normal(0.4, 0.05, 500)]))["means"]
    assert abs(m[0] - 0.05) < 0.01 and abs(m[1] - 0.4) < 0.02


def test_bootstrap_ci_covers_a_known_mean():
    # documents with their own offsets (correlated tokens) and varying lengths; true per-token mean 1.0
    rng = np.random.default_rng(0)
    hits, trials = 0, 200
    for t in range(trials):
        n_tok = rng.integers(5, 60, size=80)
        offs = rng.normal(0, 0.5, size=80)
        sums = np.array([(1.0 + o + rng.normal(0, 1, n)).sum() for o, n in zip(offs, n_tok)])
        _, lo, hi = ratio_of_sums_ci(sums, n_tok, n_boot=400, seed=t)
        hits += lo <= 1.0 <= hi
    assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_paired_difference_uses_documents_as_units():
    rng = np.random.default_rng(1)
    n = rng.integers(10, 30, size=40).astype(float)
    a, b = rng.normal(2, 1, 40) * n, rng.normal(1.5, 1, 40) * n
    r = paired_difference(a, b, n, n_boot=300)
    t, p = sps.ttest_rel(a / n, b / n)
    assert abs(r["t_over_documents"] - t) < 1e-9 and abs(r["p_over_documents"] - p) < 1e-12
    assert r["ci"][0] <= r["difference_per_token"] <= r["ci"][1] and r["n_documents"] == 40


def test_random_baselines_have_the_error_norm():
    import part6_kl_divergence as p6
    g = torch.Generator().manual_seed(0)
    h, rec = torch.randn(100, 16, generator=g), torch.randn(100, 16, generator=g)
    err = (h - rec).norm(dim=1)
    L = torch.zeros(16, 16)
    L[0, 0], L[1, 1] = 1.0, 2.0                                  # covariance supported on two dimensions
    for chol in (None, L):
        noisy = p6.random_error(h, rec, chol, g)
        assert torch.allclose((noisy - h).norm(dim=1), err, atol=1e-5)
    shaped = p6.random_error(h, rec, L, g) - h
    assert shaped[:, 2:].abs().max() < 1e-6                      # cov-matched noise stays in Sigma's support


def test_streamed_error_covariance_equals_torch_cov():
    """part6's covariance baseline accumulates each variant's error cross-products chunk by chunk (never the
    errors); it equals torch.cov of all errors, also when the errors sit far from zero (the shift), and a
    '[zero_ablation]' second figure gets none."""
    import part6_kl_divergence as p6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9000, 6, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.1]) + 5.0
    mix = torch.randn(6, 6, generator=g)

    class Fake:
        def reconstructions(self, h):
            return {"a": h @ mix * 0.1, "b": h - 1e3 - 0.01 * h.roll(1, 1),         # b: errors around 1e3
                    "a[zero_ablation]": h * 0}                                 # a second figure: no baseline
    mean_act = x.mean(0)
    chol = p6.covariance_factors(Fake(), x, mean_act)
    assert set(chol) == {"a", "b", "zero_ablation", "mean_ablation"}
    recs = {**Fake().reconstructions(x), **p6.ablations(x, mean_act)}
    for name, rec in ((n, r) for n, r in recs.items() if not n.endswith("[zero_ablation]")):
        cov = torch.cov((x - rec).double().T)
        cov += torch.eye(6, dtype=cov.dtype) * (1e-6 * cov.diagonal().mean())
        want = torch.linalg.cholesky(cov).float()
        assert torch.allclose(chol[name], want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), name


def test_random_baselines_are_drawn_in_report_order():
    """The lazy stream of part6 replacements gives the same names, order and draws as drawing them all first, each
    variant's two baselines from its own generator (seeded by the seed and its name, not by what else is spliced)."""
    import part6_kl_divergence as p6
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, 5, generator=g)
    recs = {"v": h * 0.5, "w[zero_ablation]": torch.zeros_like(h), "u": h + 1}
    chol = {"v": torch.eye(5), "u": 2 * torch.eye(5)}
    got = list(p6.replacement_stream(h, recs, chol, {n: p6.baseline_generator(3, n) for n in chol}))
    want = [("original", None), ("identity", h), *recs.items()]
    for name in ("v", "u"):
        g2 = p6.baseline_generator(3, name)
        want += [(f"eps_random[{name}]", p6.random_error(h, recs[name], None, g2)),
                 (f"cov_random[{name}]", p6.random_error(h, recs[name], chol[name], g2))]
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all((a is None and b is None) or torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    assert not torch.equal(got[-1][1], got[-3][1])                      # u and v draw different noise
    assert p6.report_order(["original", "identity", "a", "zero_ablation", "eps_random[a]", "cov_random[a]", "b",
                            "cov_random[b]", "eps_random[b]"]) == [
        "original", "identity", "a", "b", "zero_ablation", "eps_random[a]", "cov_random[a]", "eps_random[b]",
        "cov_random[b]"]


def test_joint_paths_sum_to_full_output():
    torch.manual_seed(0)
    m = JointModel(SAEConfig(d=12, n_latents=48, k=5), NFMConfig(n_features=48, d=12, dim=6, hidden=6, dropout=0.0)).eval()
    with torch.no_grad():
        m.nfm.W_lin.normal_(0, 0.1)
        x = torch.randn(20, 12)
        paths, _, _ = m.paths(x)
        full = m(x)
        assert torch.allclose(paths["sae"] + paths["linear"] + paths["interaction"], full, atol=1e-6)
        for name, ps in VARIANTS.items():
            assert torch.allclose(m(x, ps), sum(paths[p] for p in ps), atol=1e-6), name


def test_interaction_leave_one_out_matches_brute_force():
    torch.manual_seed(0)
    nfm = NFM(NFMConfig(n_features=30, d=8, dim=5, hidden=7, dropout=0.0)).eval()
    idx = torch.stack([torch.randperm(30)[:4] for _ in range(6)])
    val = torch.rand(6, 4) + 0.1
    loo = nfm.interaction_leave_one_out(idx, val)
    with torch.no_grad():
        full = nfm.interaction(idx, val)
        for j in range(4):
            v = val.clone()
            v[:, j] = 0
            assert torch.allclose(loo[:, j], (full - nfm.interaction(idx, v)).norm(dim=1), atol=1e-5)


@pytest.fixture(scope="module")
def evaluations(pipeline, tiny_demo):
    out = pipeline
    data = ["--train-tokens", "12000", "--val-tokens", "3000", "--cache-dir", str(out / "cache")]
    run_script("part5_joint_sae_nfm.py", "--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"),
               "--layer", "1", "--n-latents", "128", "--k", "8", "--nfm-dim", "16", "--epochs", "2",
               "--sae", str(out / "p1"), "--out", str(out / "p5"), *data)
    run_script("part3_train_secondary_sae.py", "--joint", str(out / "p5"), "--expansion", "4", "--k", "4", "--epochs", "2",
               "--out", str(out / "p3j"), *data)
    run_script("part6_kl_divergence.py", "--sae", str(out / "p1"), "--nfm", str(out / "p2"), "--joint", str(out / "p5"),
               "--docs", "40", "--n-boot", "200", "--cov-tokens", "4000", "--cache-dir", str(out / "cache"),
               "--kl-adapter-steps", "60", "--out", str(out / "p6"))
    run_script("part4_nfm_inspector.py", "--nfm", str(out / "p2"), "--feature", "3", "--out", str(out / "p4"), *data)
    run_script("part4_nfm_inspector.py", "--joint", str(out / "p5"), "--out", str(out / "p4j"), *data)
    run_script("part7_gram_analysis.py", "--sae", str(out / "p1"), "--joint", str(out / "p5"), "--out", str(out / "p7"), *data)
    return out


def _files(d, *names):
    for n in names:
        assert (d / n).is_file() and (d / n).stat().st_size > 0, d / n
    return json.loads((d / "metrics.json").read_text())


def test_part5_joint_against_equal_parameter_sae(evaluations):
    m = _files(evaluations / "p5", "model.safetensors", "metrics.json", "training_curves.png", "fvu_by_variant.png",
               "baseline_sae/model.safetensors")
    h, c, p = m["held_out_test"], m["comparisons"], m["params"]
    assert set(h["fvu"]) == {"full"} | {f"{v}[{how}_ablation]" for v in ("sae", "sae+linear", "sae+interaction")
                                        for how in ("mean", "zero")}
    assert 0 < h["fvu"]["full"] < 1
    assert p["total"] == p["sae"] + p["nfm_linear"] + p["nfm_interaction"]
    assert p["total"] <= c["standalone_sae"]["params"] < p["total"] + 2 * 16 + 1 + 64   # matched within one latent
    assert abs(c["joint_vs_standalone_relative_fvu_reduction"] - (1 - h["fvu"]["full"] / c["standalone_sae"]["fvu"])) < 1e-12
    assert abs(c["joint_vs_own_sae_path_relative_fvu_reduction"] - (1 - h["fvu"]["full"] / h["fvu"]["sae[mean_ablation]"])) < 1e-12
    assert "part1_sae" in c


def test_part3_on_the_joint_model(evaluations):
    m = _files(evaluations / "p3j", "model.safetensors", "metrics.json", "training_curves.png")
    cfg = json.loads((evaluations / "p3j" / "config.json").read_text())
    assert "joint" in cfg["parents"] and m["source"].startswith("joint")
    assert 0 < m["held_out_test"]["fvu"] < 1


def test_part6_kl_variants_baselines_and_cis(evaluations):
    m = _files(evaluations / "p6", "metrics.json", "kl.csv", "kl_bars.png", "kl_histograms.png")
    v = m["variants"]
    assert v["identity"]["kl"] < 1e-6 and abs(v["identity"]["delta_ce"]) < 1e-6     # identity splice changes nothing
    assert v["zero_ablation"]["kl"] > v["sae"]["kl"] > 0                             # SAE beats deleting the stream
    for name in ("sae", "sae+nfm_linear[mean_ablation]", "sae+nfm_interaction[mean_ablation]", "sae+nfm",
                 "joint_sae[mean_ablation]", "joint_sae+linear[mean_ablation]", "joint_sae+interaction[mean_ablation]",
                 "joint_full", "standalone_sae", "zero_ablation", "mean_ablation"):
        r = v[name]
        assert r["kl_ci"][0] <= r["kl"] <= r["kl_ci"][1] and r["ce_ci"][0] <= r["ce"] <= r["ce_ci"][1], name
        assert r["kl_ratio_to_eps_random"] > 0 and r["kl_ratio_to_cov_random"] > 0, name
        lo, hi = r["kl_ratio_to_eps_random_ci"]
        assert lo <= r["kl_ratio_to_eps_random"] <= hi, name
    assert abs(v["zero_ablation"]["ce_loss_score"]) < 1e-12 and abs(v["original"]["ce_loss_score"] - 1) < 1e-12
    assert m["n_documents"] <= 40 and "sae+nfm vs sae" in m["paired_comparisons"]
    for name in ("sae+nfm_linear[zero_ablation]", "joint_sae[zero_ablation]"):     # labelled second figures
        assert name in v and "kl_ratio_to_eps_random" not in v[name]


def test_part6_headline_reductions_and_nonlinear_share(evaluations):
    """The figures the reference ladder reads: KL reductions against the SAE alone (mean-ablated paths), each
    path's, and the interaction path's share of the full reduction, for both workflows, from the variants' KLs."""
    m = json.loads((evaluations / "p6" / "metrics.json").read_text())
    v, h = m["variants"], m["headline"]
    assert h["ablation"] == "mean"
    for label, sae, full, inter in (("sequential", "sae", "sae+nfm", "sae+nfm_interaction[mean_ablation]"),
                                    ("joint", "joint_sae[mean_ablation]", "joint_full", "joint_sae+interaction[mean_ablation]")):
        b = h[label]
        red, red_int = 1 - v[full]["kl"] / v[sae]["kl"], 1 - v[inter]["kl"] / v[sae]["kl"]
        assert b["kl_reduction"] == pytest.approx(red, rel=1e-9) and b["interaction_path_kl_reduction"] == pytest.approx(red_int, rel=1e-9)
        assert b["nonlinear_share"] == pytest.approx(red_int / red, rel=1e-9)
        assert b["kl_reduction_ci"][0] <= b["kl_reduction"] <= b["kl_reduction_ci"][1]
        assert b["sae_kl_over_eps_random"] == v[sae].get("kl_ratio_to_eps_random")


def test_reduction_and_share_ci_closed_form():
    from common.stats import reduction_and_share_ci
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 2, 50)
    full, part = base * rng.uniform(0.5, 0.7, 50), base * rng.uniform(0.85, 0.95, 50)
    r = reduction_and_share_ci(base, full, part, n_boot=500)
    assert r["reduction_full"] == pytest.approx(1 - full.sum() / base.sum())
    assert r["share"] == pytest.approx((1 - part.sum() / base.sum()) / (1 - full.sum() / base.sum()))
    for k in ("reduction_full", "reduction_part", "share"):
        assert r[f"{k}_ci"][0] <= r[k] <= r[f"{k}_ci"][1], k


def test_part6_splices_the_control_ladder_and_a_kl_adapter(evaluations):
    m = json.loads((evaluations / "p6" / "metrics.json").read_text())
    v, nfm_params = m["variants"], json.loads((evaluations / "p2" / "metrics.json").read_text())["params"]["total"]
    for c in ("linear_from_x", "mlp_on_code", "mlp_from_x", "residual_sae", "kl_adapter"):
        r = v[f"sae+{c}"]
        assert r["kl_ci"][0] <= r["kl"] <= r["kl_ci"][1] and r["kl_ratio_to_eps_random"] > 0, c
        assert f"sae+nfm vs sae+{c}" in m["paired_comparisons"], c
    assert set(m["controls"]) == {"linear_from_x", "mlp_on_code", "mlp_from_x", "residual_sae"}
    budget, d, n = m["kl_adapter"], 64, 128                           # the tiny LM's width, part1's latents
    assert budget["params"] == (n + d) * d + d and budget["nfm_params"] == nfm_params
    assert budget["steps"] == 60 and budget["tokens_seen"] > 0
    # trained on KL from the SAE alone (its zero init), it moves the held-out test documents' KL down
    assert v["sae+kl_adapter"]["kl"] < v["sae"]["kl"]


def test_part6_families_are_independent(evaluations, tmp_path):
    """part6 splices one model family at a time and draws each variant's baselines from its own generator, so
    every row is the same bytes with or without other families beside it (the NFM and one control without the
    joint model); and every LM batch counts, whatever the batch size (the SAE alone at 3 sequences a batch)."""
    out = evaluations
    common = ["--sae", str(out / "p1"), "--docs", "40", "--n-boot", "200", "--cov-tokens", "4000",
              "--cache-dir", str(out / "cache"), "--kl-adapter-steps", "0"]
    run_script("part6_kl_divergence.py", *common, "--nfm", "", "--joint", "", "--lm-batch-size", "3",
               "--out", str(tmp_path / "alone"))
    run_script("part6_kl_divergence.py", *common, "--nfm", str(out / "p2"), "--controls", "mlp_on_code",
               "--joint", "", "--out", str(tmp_path / "nfm"))
    full = json.loads((out / "p6" / "metrics.json").read_text())["variants"]
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())["variants"]
    nfm = json.loads((tmp_path / "nfm" / "metrics.json").read_text())["variants"]
    own = ("sae", "zero_ablation", "mean_ablation")
    assert set(alone) == {"original", "identity", *own} | {f"{k}[{v}]" for v in own for k in ("eps_random", "cov_random")}
    for name in ("sae", "zero_ablation", "mean_ablation"):   # every batch counts: 3 sequences a batch here, 32
        assert alone[name]["kl"] == pytest.approx(full[name]["kl"], rel=1e-3, abs=1e-7), name   # in the full run
        assert alone[name]["ce"] == pytest.approx(full[name]["ce"], rel=1e-5), name
    assert "joint_full" in full and "joint_full" not in nfm and "sae+mlp_from_x" not in nfm
    for name in ("sae", "eps_random[sae]", "cov_random[zero_ablation]", "sae+nfm", "sae+nfm_interaction[mean_ablation]",
                 "cov_random[sae+nfm]", "sae+mlp_on_code", "eps_random[sae+mlp_on_code]"):
        assert nfm[name]["kl"] == full[name]["kl"] and nfm[name]["ce"] == full[name]["ce"], name


def test_part6_evaluates_only_test_half_documents(evaluations, tiny_demo):
    """Every KL/CE token comes from held-out documents of the test half: none from the selection half that
    picked the best steps (part1 records both halves of the documents it held out), none from training text."""
    from common.data import iter_documents
    m = json.loads((evaluations / "p6" / "metrics.json").read_text())
    halves = json.loads((evaluations / "p1" / "metrics.json").read_text())["held_out_documents"]
    evaluated = m["evaluated_documents"]
    assert len(evaluated) == m["n_documents"] >= 10
    assert not set(evaluated) & set(halves["selection"])
    seen_by_part1 = [d for d in evaluated if d <= max(halves["test"] + halves["selection"])]
    assert seen_by_part1 and set(seen_by_part1) <= set(halves["test"])     # the half part1 reported on
    corpus = str(tiny_demo / "corpus.txt")
    held = list(iter_documents(corpus, "validation", 0.1))
    train = set(iter_documents(corpus, "train", 0.1))
    assert not {held[i] for i in evaluated} & train


def test_part4_inspector(evaluations):
    for d, kind in (("p4", "sequential"), ("p4j", "joint")):
        m = _files(evaluations / d, "metrics.json", "weight_stats.png", "top_features.png")
        h = m["held_out_test"]
        assert m["model"] == kind and 0 <= h["linear_share_of_output_magnitude[mean_ablation]"] <= 1
        assert 0 <= h["linear_share_of_output_magnitude[zero_ablation]"] <= 1
        assert all(0 <= r["gini"] <= 1 for r in m["weights"]["embedding_row"]["highest_gini"])
        partners = m["partners"]["ranking"]
        assert partners and all(r["feature"] != m["partners"]["feature"] for r in partners)
        assert [r["score"] for r in partners] == sorted((r["score"] for r in partners), reverse=True)
    assert json.loads((evaluations / "p4" / "metrics.json").read_text())["partners"]["feature"] == 3


def test_part7_gram(evaluations):
    m = _files(evaluations / "p7", "metrics.json", "squared_norms.png", "max_cosine.png", "shares_vs_squared_norm.png")
    models = m["models"]
    assert set(models) == {"part1 SAE", "standalone SAE (joint's parameters)", "joint (W_dec + W_lin)"}
    assert models["part1 SAE"]["note"]                              # unit-norm rows: nothing to test, and it says so
    j = models["joint (W_dec + W_lin)"]
    assert j["init_source"] == "saved at training time" and abs(j["init_squared_norm_mean"] - 1) < 1e-5
    s = j["shares"]
    assert s["n_active_features"] + s["n_never_active"] == 128
    cor = s["correlation_nfm_share_vs_squared_norm"]["spearman"]
    assert cor["ci"][0] <= cor["r"] <= cor["ci"][1]


def test_part6_and_part4_bad_input(evaluations, tmp_path):
    from test_pipeline import _one_line_error
    _one_line_error(run_script("part4_nfm_inspector.py", "--nfm", str(evaluations / "p2"), "--feature", "999",
                               "--out", str(tmp_path / "x"), check=False), "--feature 999", "out of range")
    _one_line_error(run_script("part6_kl_divergence.py", "--sae", str(evaluations / "p2"), "--out", str(tmp_path / "y"),
                               check=False), "holds a 'nfm' checkpoint")
