"""--recipe reference (common/recipe.py): each option does what the original study's code did
(../shared/reference/original_study.md §2-§6), checked against torch's own pieces or a closed form."""
import json

import pytest
import torch

from common import recipe
from common.sae import SAEConfig, TopKSAE, recipe_options, train_sae
from common.train import fit
from conftest import run_script


def test_lr_schedule_is_torch_linearlr():
    """The reference's LinearLR(start 1.0, end 0.1, total_iters = 80% of the steps), step by step."""
    for total in (1, 7, 50, 101):
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1,
                                                  total_iters=max(1, int(0.8 * total)))
        for step in range(total):
            assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * recipe.lr_factor(step, total), rel=1e-9), (total, step)
            opt.step()
            sched.step()
    assert recipe.lr_factor(99, 100) == pytest.approx(0.1)


def test_top_n_and_recipe_defaults():
    assert recipe.top_n(1024) == 512 and recipe.top_n(32) == 16 and recipe.top_n(1) == 1
    assert recipe.FLAG_DEFAULTS["part1"]["batch_size"] == 1024 and recipe.FLAG_DEFAULTS["part1"]["auxk_alpha"] == 0
    assert recipe.describe("default") == {"name": "default"} and "lr_schedule" in recipe.describe("reference")["ambiguities"]
    with pytest.raises(Exception, match="--allow-recipe-mix"):
        recipe.check_parent("default", {"recipe": {"name": "reference"}, "path": "x"}, "--sae", False)
    recipe.check_parent("default", {"recipe": {"name": "reference"}}, "--sae", True)        # allowed mix
    recipe.check_parent("default", {}, "--sae", False)                         # an older checkpoint: the default


def test_reference_sae_init_and_no_decoder_bias():
    """§2.2: decoder = PyTorch's default Linear(n, d) init (uniform +-1/sqrt(n): squared row norm d/(3n) on
    average), encoder weight = decoder weight^T, encoder bias 0, no b_dec."""
    torch.manual_seed(0)
    d, n = 64, 2000
    sae = TopKSAE(SAEConfig(d=d, n_latents=n, k=8, **recipe_options("reference")))
    assert torch.equal(sae.W_enc, sae.W_dec) and sae.W_dec.abs().max() <= n ** -0.5
    assert sae.W_dec.pow(2).sum(1).mean().item() == pytest.approx(d / (3 * n), rel=0.03)
    assert not sae.b_dec.requires_grad and not sae.b_enc.any()
    sae.init_b_dec(torch.randn(10, d) + 5)
    assert not sae.b_dec.any()                                         # no data-mean initialisation either
    default = TopKSAE(SAEConfig(d=d, n_latents=n, k=8))
    assert torch.allclose(default.W_dec.norm(dim=1), torch.ones(n)) and default.b_dec.requires_grad


def test_reference_sae_loss_is_mse():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d=16, n_latents=64, k=4, auxk_alpha=0.0, **recipe_options("reference")))
    x = torch.randn(50, 16)
    loss, logs = sae.loss(x)
    x_hat = sae(x)[0]
    assert loss.item() == pytest.approx((x - x_hat).pow(2).mean().item(), rel=1e-6)
    assert logs["fvu"].item() == pytest.approx(((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-6)


def test_reference_training_changes_decoder_norms(monkeypatch):
    """With the reference SAE the decoder rows leave their init norms (no projection, no renormalisation) and
    b_dec stays zero; the default recipe keeps every row at norm 1. The reference Adam has eps 1e-5 and the
    gradient reaches the step clipped to norm 1.0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 24, generator=g) @ torch.randn(24, 24, generator=g) + 2.0
    seen = {}
    import common.train as tr
    real_adam, real_clip = tr.make_adam, torch.nn.utils.clip_grad_norm_

    def adam(params, lr, **kw):
        seen["adam"] = kw
        return real_adam(params, lr, **kw)
    monkeypatch.setattr(tr, "make_adam", adam)

    def clip(params, max_norm, *a, **kw):
        params = list(params)
        total = real_clip(params, max_norm, *a, **kw)
        seen.setdefault("norms", []).append((float(total), float(torch.cat([p.grad.flatten() for p in params]).norm())))
        return total
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    torch.manual_seed(1)
    ref = TopKSAE(SAEConfig(d=24, n_latents=96, k=6, auxk_alpha=0.0, **recipe_options("reference")))
    init = ref.W_dec.detach().norm(dim=1).clone()
    train_sae(ref, x[:2500], x[2500:2800], 60, 128, recipe.LR * 30, 20, 0, "ref", optimizer="adam-reference")
    norms = ref.W_dec.detach().norm(dim=1)
    assert (norms - init).abs().max() > 0.05 and norms.std() > 0.01 and not ref.b_dec.any()
    assert seen["adam"] == {"betas": recipe.ADAM_BETAS, "eps": recipe.ADAM_EPS}
    assert len(seen["norms"]) == 60 and max(after for _, after in seen["norms"]) <= 1.0 + 1e-5
    assert max(before for before, _ in seen["norms"]) > 1.0               # the clip acted
    torch.manual_seed(1)
    ours = TopKSAE(SAEConfig(d=24, n_latents=96, k=6))
    train_sae(ours, x[:2500], x[2500:2800], 60, 128, 1e-3, 20, 0, "ours")
    assert torch.allclose(ours.W_dec.norm(dim=1), torch.ones(96), atol=1e-5) and ours.b_dec.abs().max() > 0.5


def test_fit_lr_follows_the_reference_schedule():
    """fit's logged learning rate under adam-reference is lr x LinearLR's factor at every evaluation."""
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    res = fit(model, 40, 8, 20, 0.01, lambda i: (((model(x[i]) - y[i]) ** 2).mean(), {}),
              lambda: {"val_loss": 0.0}, 1, 0, "t", optimizer="adam-reference")
    for row in res.history:
        assert row["lr"] == pytest.approx(0.01 * recipe.lr_factor(row["step"] - 1, 20))


def test_part1_reference_recipe_end_to_end(tiny_demo, tmp_path):
    """part1 --recipe reference: z-score normalisation, batch 1024, adam-reference, no AuxK, the reference SAE;
    the recipe is saved in config.json and metrics.json, and explicit flags still win over it."""
    out = tmp_path / "p1ref"
    run_script("part1_train_topk_sae.py", "--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"),
               "--layer", "1", "--n-latents", "128", "--k", "8", "--train-tokens", "12000", "--val-tokens", "3000",
               "--epochs", "3", "--cache-dir", str(tmp_path / "cache"), "--recipe", "reference", "--out", str(out))
    cfg = json.loads((out / "config.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    assert cfg["recipe"]["name"] == "reference" and m["recipe"]["name"] == "reference"
    assert cfg["normalize"] == "zscore" and cfg["hparams"]["auxk_alpha"] == 0
    assert cfg["hparams"]["b_dec"] is False and cfg["hparams"]["unit_norm"] is False
    assert m["train"]["batch_size"] == 1024 and m["train"]["optimizer"] == "adam-reference"
    assert m["train"]["lr"] == recipe.LR and 0 < m["held_out_test"]["fvu"] < 1
    from common.loading import load_sae_checkpoint
    sae, _, _ = load_sae_checkpoint(out)
    assert not sae.b_dec.any() and sae.W_dec.norm(dim=1).std() > 1e-3
    out2 = tmp_path / "p1ref_b"
    run_script("part1_train_topk_sae.py", "--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"),
               "--layer", "1", "--n-latents", "128", "--k", "8", "--train-tokens", "12000", "--val-tokens", "3000",
               "--steps", "6", "--eval-every", "2", "--cache-dir", str(tmp_path / "cache"), "--recipe", "reference",
               "--batch-size", "256", "--defects", "latest-as-best", "--out", str(out2))
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["train"]["batch_size"] == 256 and m2["train"]["best_step"] == 6
    assert [d["name"] for d in m2["reference_defects"]] == ["latest-as-best"] and m["reference_defects"] == []


def test_reference_nfm_init():
    """§3.2: V ~ N(0, 0.05^2), W_lin ~ N(0, 0.01^2), b_lin 0, both MLP weights ~ N(0, 0.01^2), biases 0."""
    from common.nfm import NFM, NFMConfig
    torch.manual_seed(0)
    nfm = NFM(NFMConfig(n_features=3000, d=64, dim=40, hidden=40, init="reference"))
    assert nfm.V.std().item() == pytest.approx(0.05, rel=0.02) and nfm.W_lin.std().item() == pytest.approx(0.01, rel=0.02)
    for lin in (nfm.mlp1, nfm.mlp2):
        assert lin.weight.std().item() == pytest.approx(0.01, rel=0.1) and not lin.bias.any()
    assert not nfm.b_lin.any() and not NFM(NFMConfig(n_features=30, d=8)).W_lin.any()     # ours: W_lin at zero


def test_top_n_truncation_matches_the_dense_formula():
    """§6.1: with TOP_N both NFM paths read only the code's top_n largest values: the sparse paths equal the
    textbook formula on the dense code with every other entry zeroed; a truncated code passes through unchanged;
    leave-one-out gives 0 outside the top_n and, inside, the leave-one-out of the truncated code."""
    from common.nfm import NFM, NFMConfig
    torch.manual_seed(0)
    n, k, top = 40, 8, 4
    cfg = dict(n_features=n, d=6, dim=5, hidden=7, dropout=0.0, init="reference")
    nfm = NFM(NFMConfig(**cfg, top_n=top)).eval()
    plain = NFM(NFMConfig(**cfg)).eval()
    plain.load_state_dict(nfm.state_dict())
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(10)])
    val = torch.rand(10, k) + 0.1
    f = torch.zeros(10, n).scatter(1, idx, val)
    tv, tj = val.topk(top, dim=1)
    ti = idx.gather(1, tj)
    with torch.no_grad():
        assert torch.allclose(nfm(idx, val), plain.forward_dense(torch.zeros(10, n).scatter(1, ti, tv)), atol=1e-5)
        assert torch.allclose(nfm(idx, val), nfm.forward_dense(f), atol=1e-5)
        assert torch.allclose(nfm.linear(idx, val), plain.linear(ti, tv), atol=1e-6)
        assert torch.allclose(nfm.hidden(idx, val), plain.hidden(ti, tv), atol=1e-6)
        assert torch.allclose(nfm(ti, tv), plain(ti, tv), atol=1e-6)                 # already truncated
        loo = nfm.interaction_leave_one_out(idx, val)                               # [10, k]
        inside = torch.zeros_like(val, dtype=torch.bool).scatter(1, tj, True)
        assert not loo[~inside].any()
        want = plain.interaction_leave_one_out(ti, tv)                              # [10, top]
        assert torch.allclose(loo.gather(1, tj), want, atol=1e-5)


def test_joint_model_with_top_n_reads_the_truncated_code():
    from common.joint import JointModel
    from common.nfm import NFMConfig
    torch.manual_seed(0)
    j = JointModel(SAEConfig(d=12, n_latents=48, k=8, **recipe_options("reference")),
                   NFMConfig(n_features=48, d=12, dim=6, hidden=6, dropout=0.0, init="reference", top_n=4))
    x = torch.randn(20, 12)
    out, idx, val = j.paths(x)
    tv, tj = val.topk(4, dim=1)
    assert torch.allclose(out["linear"], j.nfm.linear(idx.gather(1, tj), tv), atol=1e-6)
    assert torch.allclose(out["sae"], j.sae.decode(idx, val))                       # the SAE path: the whole code
    loss, _ = j.loss(x)
    loss.backward()
    assert j.nfm.W_lin.grad.abs().sum() > 0 and j.sae.W_enc.grad.abs().sum() > 0 and j.sae.b_dec.grad is None


def test_reference_recipe_through_part2_part5_part3(tiny_demo, tmp_path):
    """part1 -> part2 -> part5 -> part3 --joint, all --recipe reference: each saves its recipe, uses the
    reference's optimizer, batch and inits; the joint model's NFM reads the top K/2 of the code; a later stage
    refuses a parent of the other recipe with one line naming --allow-recipe-mix."""
    data = ["--train-tokens", "8000", "--val-tokens", "2000", "--epochs", "1", "--cache-dir", str(tmp_path / "cache")]
    src = ["--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"), "--layer", "1"]
    run_script("part1_train_topk_sae.py", *src, "--n-latents", "64", "--k", "8", "--recipe", "reference",
               "--out", str(tmp_path / "p1"), *data)
    bad = run_script("part2_train_residual_nfm.py", "--sae", str(tmp_path / "p1"), "--nfm-dim", "8", "--controls", "none",
                     "--out", str(tmp_path / "bad"), *data, check=False)
    assert bad.returncode == 2 and "--allow-recipe-mix" in bad.stderr and "Traceback" not in bad.stderr
    run_script("part2_train_residual_nfm.py", "--sae", str(tmp_path / "p1"), "--nfm-dim", "8", "--controls",
               "mlp_on_code", "--recipe", "reference", "--out", str(tmp_path / "p2"), *data)
    c2 = json.loads((tmp_path / "p2" / "config.json").read_text())
    m2 = json.loads((tmp_path / "p2" / "metrics.json").read_text())
    assert c2["recipe"]["name"] == "reference" and c2["hparams"]["init"] == "reference" and c2["hparams"]["top_n"] is None
    assert m2["train"]["optimizer"] == "adam-reference" and m2["train"]["batch_size"] == 130 and m2["train"]["lr"] == 1e-4
    run_script("part5_joint_sae_nfm.py", *src, "--n-latents", "64", "--k", "8", "--nfm-dim", "8", "--recipe",
               "reference", "--steps", "40", "--out", str(tmp_path / "p5"), *data)
    c5 = json.loads((tmp_path / "p5" / "config.json").read_text())
    m5 = json.loads((tmp_path / "p5" / "metrics.json").read_text())
    assert c5["recipe"]["name"] == "reference" and c5["hparams"]["nfm"]["top_n"] == 4 and c5["normalize"] == "zscore"
    assert c5["hparams"]["sae"]["b_dec"] is False and c5["hparams"]["sae"]["auxk_alpha"] == 0
    assert m5["train"]["batch_size"] == 64 and m5["train"]["optimizer"] == "adam-reference"
    cb = json.loads((tmp_path / "p5" / "baseline_sae" / "config.json").read_text())
    assert cb["hparams"]["unit_norm"] is False and cb["recipe"]["name"] == "reference"   # the baseline: same recipe
    run_script("part3_train_secondary_sae.py", "--joint", str(tmp_path / "p5"), "--expansion", "2", "--k", "2",
               "--recipe", "reference", "--steps", "20", "--out", str(tmp_path / "p3"), *data)
    c3 = json.loads((tmp_path / "p3" / "config.json").read_text())
    assert c3["recipe"]["name"] == "reference" and c3["normalize"] == "zscore" and c3["hparams"]["b_dec"] is False
    # part7 runs the study's own squared-norm analysis on the free decoder norms of the reference joint model
    run_script("part7_gram_analysis.py", "--sae", "", "--joint", str(tmp_path / "p5"), "--out", str(tmp_path / "p7"),
               "--val-tokens", "2000", "--cache-dir", str(tmp_path / "cache"))
    seed = json.loads((tmp_path / "p7" / "metrics.json").read_text())["models"]["joint (W_dec + W_lin)"]["seed_bimodality"]
    assert not seed["all_unit_norm"] and seed["n_features"] == 64 and "spearman_rho" in seed["ratios"]["nfm_total"]
    assert (tmp_path / "p7" / "seed_ratios_vs_squared_norm.png").stat().st_size > 0


def test_seed_bimodality_against_a_direct_computation():
    """The study's own squared-norm analysis (§8.3) on planted rows: two groups of ||W_dec[i]||^2 (0.05 and
    0.4), ratios of plain weight norms, group means, Student t and Spearman rho as scipy computes them; with
    unit-norm rows it says so."""
    from scipy import stats
    from common.featurestats import seed_bimodality
    g = torch.Generator().manual_seed(0)
    n, d = 200, 16
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    W = W * torch.where(torch.arange(n) < 120, 0.05 ** 0.5, 0.4 ** 0.5)[:, None]
    W_lin, V = torch.randn(n, d, generator=g) * 0.1, torch.randn(n, 5, generator=g) * 0.3
    r = seed_bimodality(W, W_lin, V)
    R, L, I = W.double().norm(dim=1), W_lin.double().norm(dim=1), V.double().norm(dim=1)
    nfm = ((L + I) / (R + L + I)).numpy()
    s = (R ** 2).numpy()
    low = s < 0.2
    assert r["n_low"] == 120 and r["n_high"] == 80 and not r["all_unit_norm"]
    row = r["ratios"]["nfm_total"]
    assert row["mean_low"] == pytest.approx(nfm[low].mean()) and row["mean_high"] == pytest.approx(nfm[~low].mean())
    t, p = stats.ttest_ind(nfm[low], nfm[~low])
    assert row["t"] == pytest.approx(t) and row["p"] == pytest.approx(p)
    assert row["spearman_rho"] == pytest.approx(stats.spearmanr(s, nfm)[0])
    # built in (§14.7): nfm_total = 1 - residual, so their rho mirror exactly, and R_i = sqrt(s_i) pushes it up
    assert row["spearman_rho"] == pytest.approx(-r["ratios"]["residual"]["spearman_rho"]) and row["spearman_rho"] < -0.5
    lo, hi = row["spearman_rho_ci"]
    assert lo < row["spearman_rho"] < hi and hi - lo < 0.5
    # squared norms spread around 0.05 and 0.4 have two modes; around 0.2 alone, one
    unit_rows = W / W.norm(dim=1, keepdim=True)
    spread = 1 + 0.1 * torch.randn(n, 1, generator=g)
    two = seed_bimodality(unit_rows * (torch.from_numpy(s)[:, None].float() * spread).sqrt(), W_lin, V)
    assert two["modes"]["two_modes"] and sorted(two["modes"]["means"]) == pytest.approx([0.05, 0.4], rel=0.1)
    one = seed_bimodality(unit_rows * (0.2 * spread).sqrt(), W_lin, V)
    assert not one["modes"]["two_modes"]
    unit = seed_bimodality(torch.nn.functional.normalize(W, dim=1), W_lin, V)
    assert unit["all_unit_norm"] and unit["n_low"] == 0 and "spearman_rho" not in unit["ratios"]["nfm_total"]
    assert unit["modes"] is None


def test_latest_as_best_keeps_the_last_step():
    """--defects latest-as-best (§14.13): the model returned is the last step's, though the selection half says
    an earlier one was better (the same run without the switch keeps that one: tests/test_train.py)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    evals = iter([3.0, 1.0, 2.0, 5.0])
    weights = []

    def evaluate():
        weights.append(model.weight.item())
        return {"val_loss": next(evals)}
    res = fit(model, 8, 4, 8, 0.1, lambda i: ((model.weight - 10).pow(2).sum(), {}), evaluate, 2, 0, "t",
              keep_latest=True)
    assert res.best_step == 8 and model.weight.item() == weights[-1] != weights[1]


def test_defect_switches_are_checked_per_stage():
    from common.errors import UserError
    assert recipe.parse_defects("", "part6") == () and recipe.parse_defects("raw-activations,splice-offset", "part6") == (
        "splice-offset", "raw-activations")
    with pytest.raises(UserError, match="does not apply to part1"):
        recipe.parse_defects("splice-offset", "part1")
    with pytest.raises(UserError, match="choose from"):
        recipe.parse_defects("no-such-defect", "part6")


def test_part6_splice_offset_and_raw_activation_switches(pipeline, tmp_path):
    """part6 --defects splice-offset: the models read and write one block downstream, and 'identity' (the training
    layer's own activation written there) is no longer KL 0; --defects raw-activations: the SAE reads raw
    activations and its KL rises far above the normalised splice's; --defects zero-ablation: the zero-ablated
    path variants become the headline (baselines, comparisons). Each is announced and recorded."""
    common = ["--sae", str(pipeline / "p1"), "--nfm", str(pipeline / "p2"), "--joint", "", "--controls", "none",
              "--docs", "20", "--n-boot", "50", "--cov-tokens", "2000", "--kl-adapter-steps", "0",
              "--cache-dir", str(pipeline / "cache")]
    normal = tmp_path / "normal"
    run_script("part6_kl_divergence.py", *common, "--out", str(normal))
    off = run_script("part6_kl_divergence.py", *common, "--defects", "splice-offset", "--out", str(tmp_path / "off"))
    raw = run_script("part6_kl_divergence.py", *common, "--defects", "raw-activations", "--out", str(tmp_path / "raw"))
    zero = run_script("part6_kl_divergence.py", *common, "--defects", "zero-ablation", "--out", str(tmp_path / "zero"))
    mz = json.loads((tmp_path / "zero" / "metrics.json").read_text())
    assert mz["headline"]["ablation"] == "zero" and "REFERENCE DEFECT ON: zero-ablation" in zero.stdout
    assert mz["headline"]["sequential"]["kl_linear"] == mz["variants"]["sae+nfm_linear[zero_ablation]"]["kl"]
    assert "kl_ratio_to_eps_random" in mz["variants"]["sae+nfm_linear[zero_ablation]"]          # now the headline
    assert "kl_ratio_to_eps_random" not in mz["variants"]["sae+nfm_linear[mean_ablation]"]      # now second
    assert "sae+nfm_linear[zero_ablation] vs sae" in mz["paired_comparisons"]
    vn, mo, mr = (json.loads((d / "metrics.json").read_text()) for d in (normal, tmp_path / "off", tmp_path / "raw"))
    vn = vn["variants"]
    assert vn["identity"]["kl"] < 1e-6 and mo["variants"]["identity"]["kl"] > 1e-3
    assert mo["splice_layer"] == vn_layer(pipeline) + 1 and [d["name"] for d in mo["reference_defects"]] == ["splice-offset"]
    assert mr["variants"]["identity"]["kl"] < 1e-6 and mr["variants"]["sae"]["kl"] > 3 * vn["sae"]["kl"]
    for proc, name in ((off, "splice-offset"), (raw, "raw-activations")):
        assert proc.stdout.count(f"REFERENCE DEFECT ON: {name}") == 2        # at the start and beside the results
    bad = run_script("part6_kl_divergence.py", *common, "--defects", "latest-as-best", "--out", str(tmp_path / "bad"),
                     check=False)
    assert bad.returncode == 2 and "does not apply to part6" in bad.stderr


def vn_layer(pipeline) -> int:
    return json.loads((pipeline / "p1" / "config.json").read_text())["data"]["layer"]


def test_token_split_holds_out_a_random_tenth_of_the_training_rows():
    """--defects token-split (§14.8): the held-out rows are a random 10% of the training rows (capped), the
    training rows the rest, disjoint, in order; the same seed gives the same split."""
    from common.data import token_split
    from common.rows import TensorRows
    x = torch.arange(1000.0)[:, None].repeat(1, 3)
    tr, va = token_split(TensorRows(x), 5000, seed=3)
    assert va.shape[0] == 100 and tr.n == 900
    held, kept = set(va[:, 0].long().tolist()), set(tr.load()[:, 0].long().tolist())
    assert not held & kept and held | kept == set(range(1000))
    assert torch.equal(tr.gather(torch.tensor([0, 899])), x[sorted(kept)][[0, -1]])
    assert max(held) - min(held) > 500                                   # spread over the rows, not one block
    tr2, va2 = token_split(TensorRows(x), 40, seed=3)
    assert va2.shape[0] == 40 and torch.equal(token_split(TensorRows(x), 40, seed=3)[1], va2)


def test_part1_token_split_switch(tiny_demo, tmp_path):
    run_script("part1_train_topk_sae.py", "--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"),
               "--layer", "1", "--n-latents", "64", "--k", "8", "--train-tokens", "8000", "--val-tokens", "3000",
               "--steps", "4", "--cache-dir", str(tmp_path / "cache"), "--defects", "token-split",
               "--out", str(tmp_path / "p1"))
    m = json.loads((tmp_path / "p1" / "metrics.json").read_text())
    n = m["train"]["train_tokens"]
    assert m["data"]["split"].startswith("token-level") and m["data"]["val_tokens"] == (n + m["data"]["val_tokens"]) // 10
    assert "first / second half" in m["held_out_documents"]["split"]
    assert [d["name"] for d in m["reference_defects"]] == ["token-split"]
