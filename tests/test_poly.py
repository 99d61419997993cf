"""PolySAE joint model (common/poly.py, part5 --decoder poly) against known answers: the low-rank pairwise and
triple terms against explicit sums over the active latents with the full interaction tensors built from the
factors; the parameter count against its closed form and the joint NFM model's; mean-ablation of the interaction
path; the checkpoint round trip and the refusal of stages that need an NFM; part5 --decoder poly then part3
--joint as subprocesses on the tiny demo."""
import itertools
import json

import pytest
import torch

from common import checkpoint
from common.errors import UserError
from common.joint import JointModel, load_joint_checkpoint, path_outputs, variants
from common.nfm import NFMConfig, combine_paths
from common.normalize import Normalizer
from common.poly import (PolyConfig, PolyDecoder, PolyJointModel, joint_nfm_param_count, matched_ranks,
                         poly_param_count)
from common.sae import SAEConfig, encode_all

from conftest import run_script

N, D, K = 14, 6, 4


def decoder(order=3, rank2=5, rank3=3, seed=0) -> PolyDecoder:
    torch.manual_seed(seed)
    m = PolyDecoder(PolyConfig(n_features=N, d=D, rank2=rank2, rank3=rank3, order=order)).double()
    with torch.no_grad():                      # not the init values: any bug in a lambda or a slice shows
        m.lambda2.fill_(0.7)
        if order == 3:
            m.lambda3.fill_(-1.3)
        m.U.normal_()
    return m.eval()


def codes(n, seed, k=K):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(n)])
    return idx, (torch.rand(n, k, generator=g, dtype=torch.float64) + 0.1)


def dense_reference(m: PolyDecoder, idx, val) -> torch.Tensor:
    """Explicit sums over ordered pairs and triples of active latents, with the full tensors
    T2[i,j] = lambda2 sum_{r<R2} U_ir U_jr C2[:, r] and T3[i,j,l] = lambda3 sum_{r<R3} U_ir U_jr U_lr C3[:, r]."""
    c = m.cfg
    with torch.no_grad():
        U2, U3 = m.U[:, :c.rank2], m.U[:, :c.r3]
        T2 = m.lambda2 * torch.einsum("ir,jr,mr->ijm", U2, U2, m.C2)                      # [N, N, D]
        T3 = (m.lambda3 * torch.einsum("ir,jr,lr,mr->ijlm", U3, U3, U3, m.C3) if c.order == 3
              else torch.zeros(N, N, N, D, dtype=torch.float64))
        out = torch.zeros(idx.shape[0], D, dtype=torch.float64)
        for b in range(idx.shape[0]):
            act = list(zip(idx[b].tolist(), val[b].tolist()))
            for (i, fi), (j, fj) in itertools.product(act, repeat=2):
                out[b] += fi * fj * T2[i, j]
            for (i, fi), (j, fj), (l, fl) in itertools.product(act, repeat=3):
                out[b] += fi * fj * fl * T3[i, j, l]
    return out


@pytest.mark.parametrize("order", [2, 3])
def test_low_rank_terms_equal_the_dense_tensor_sums(order):
    m = decoder(order)
    idx, val = codes(7, 1)
    ref = dense_reference(m, idx, val)
    with torch.no_grad():
        fast = m.interaction(idx, val)
        f = torch.zeros(7, N, dtype=torch.float64).scatter(1, idx, val)
        assert torch.allclose(fast, ref, rtol=1e-9, atol=1e-9)
        assert torch.allclose(m.forward_dense(f), ref, rtol=1e-9, atol=1e-9)
        # the factor accessors are the same tensors
        i, j, l = torch.tensor([2, 5]), torch.tensor([5, 9]), torch.tensor([1, 2])
        assert torch.allclose(m.pair_tensor(i, j), m.pair_tensor(j, i))
        T2 = m.lambda2 * torch.einsum("ir,jr,mr->ijm", m.V, m.V, m.C2)
        assert torch.allclose(m.pair_tensor(i, j), T2[i, j])
        if order == 3:
            U3 = m.U[:, :3]
            T3 = m.lambda3 * torch.einsum("ir,jr,lr,mr->ijlm", U3, U3, U3, m.C3)
            assert torch.allclose(m.triple_tensor(i, j, l), T3[i, j, l])


def test_sparse_path_gradients_equal_the_dense_formula():
    m = decoder()
    idx, val = codes(5, 2)
    val.requires_grad_(True)
    g = torch.randn(5, D, dtype=torch.float64)
    (m.interaction(idx, val) * g).sum().backward()
    gU, gval = m.U.grad.clone(), val.grad.clone()
    m.zero_grad()
    f = torch.zeros(5, N, dtype=torch.float64).scatter(1, idx, val.detach()).requires_grad_(True)
    (m.forward_dense(f) * g).sum().backward()
    assert torch.allclose(gU, m.U.grad, atol=1e-9)
    assert torch.allclose(gval, f.grad.gather(1, idx), atol=1e-9)


def test_hidden_pairwise_pooling_pair_effect_and_leave_one_out():
    m = decoder()
    idx, val = codes(6, 3)
    with torch.no_grad():
        h = m.hidden(idx, val)
        assert h.shape == (6, m.cfg.hidden) and torch.allclose(m.interaction_from_hidden(h), m.interaction(idx, val))
        # a[:, :R2]^2 = 2 p + sum_i f_i^2 u_i^2 with p the NFM-style pooling of the pairwise factors
        p = m.bi_interaction(idx, val)
        own = ((val[..., None] * m.V[idx]) ** 2).sum(1)
        assert torch.allclose(h[:, :m.cfg.rank2], 2 * p + own)
        J = m.hidden_per_pooled()                                         # d h / d p, part8's W_1
        assert torch.allclose(h[:, :m.cfg.rank2] - own, p @ J[:m.cfg.rank2].T) and not J[m.cfg.rank2:].any()
        # pair effect = ||g(i, j) - g(i) - g(j) + g()|| by brute force (g() = 0: no bias)
        i, j = torch.tensor([1, 4, 7]), torch.tensor([3, 4 + 1, 0])
        ci, cj = torch.tensor([0.5, 1.2, 2.0], dtype=torch.float64), torch.tensor([1.5, 0.3, 0.8], dtype=torch.float64)
        g2 = m.interaction(torch.stack([i, j], 1), torch.stack([ci, cj], 1))
        gi, gj = m.interaction(i[:, None], ci[:, None]), m.interaction(j[:, None], cj[:, None])
        assert torch.allclose(m.pair_effect(i, j, ci, cj), (g2 - gi - gj).norm(dim=1))
        # leave-one-out against recomputation without each feature
        loo = m.interaction_leave_one_out(idx, val)
        full = m.interaction(idx, val)
        for jj in range(K):
            v = val.clone()
            v[:, jj] = 0
            assert torch.allclose(loo[:, jj], (full - m.interaction(idx, v)).norm(dim=1))


def test_qr_retraction_is_the_references():
    m = decoder()
    with torch.no_grad():
        m.orthogonalize()
        U = m.U.clone()
        assert torch.allclose(U.T @ U, torch.eye(m.cfg.rank, dtype=torch.float64), atol=1e-12)
        m.orthogonalize()                      # an orthonormal U with positive-diagonal R is left as it is
        assert torch.allclose(m.U, U, atol=1e-12)


@pytest.mark.parametrize("n,d,dim,hidden", [(2048, 256, 64, 64), (128, 32, 16, 16), (50, 12, 6, 8), (4096, 512, 64, 128)])
def test_parameter_count_closed_form_and_match_to_the_joint_nfm(n, d, dim, hidden):
    sae_cfg = SAEConfig(d=d, n_latents=n, k=4)
    target = JointModel(sae_cfg, NFMConfig(n_features=n, d=d, dim=dim, hidden=hidden)).param_counts()["total"]
    assert joint_nfm_param_count(n, d, dim, hidden) == target
    r2, r3 = matched_ranks(n, d, target)
    assert 1 <= r3 <= r2 <= n
    m = PolyJointModel(sae_cfg, PolyConfig(n_features=n, d=d, rank2=r2, rank3=r3))
    counts = m.param_counts()
    assert counts["total"] == sum(p.numel() for p in m.parameters()) == poly_param_count(n, d, r2, r3)
    assert counts["total"] == counts["sae"] + counts["poly_interaction"]
    assert abs(counts["total"] / target - 1) < 0.01                       # within 1%
    # and no nearby pair of ranks is nearer
    best = min(abs(poly_param_count(n, d, a, b) - target) for a in range(max(1, r2 - 3), r2 + 4) for b in range(1, a + 1))
    assert abs(counts["total"] - target) == best
    assert poly_param_count(n, d, 5, 3) == 2 * n * d + n + d + n * 5 + d * 8 + 2
    assert poly_param_count(n, d, 5, 0, order=2) == 2 * n * d + n + d + n * 5 + d * 5 + 1


def joint_model(seed=0) -> PolyJointModel:
    torch.manual_seed(seed)
    m = PolyJointModel(SAEConfig(d=D, n_latents=N, k=K), PolyConfig(n_features=N, d=D, rank2=4, rank3=3))
    with torch.no_grad():
        m.poly.U.normal_()                     # a sizeable interaction path
    return m.eval()


def test_mean_ablation_of_the_interaction_path():
    m = joint_model()
    with pytest.raises(UserError, match="no interaction path mean"):
        m.poly.path_mean("interaction")
    x_train, x = torch.randn(300, D), torch.randn(50, D)
    idx, val = encode_all(m.sae, x_train)
    m.poly.set_path_means(idx, val)
    with torch.no_grad():
        mean = m.poly.interaction(idx, val).double().mean(0).float()
    assert torch.allclose(m.poly.path_mean("interaction"), mean, atol=1e-6) and int(m.poly.mean_tokens) == 300
    o = path_outputs(m, x)
    assert set(o) == {"sae", "interaction"} and set(variants(m)) == {"sae", "full"}
    assert torch.allclose(combine_paths(o, ("sae",), m.poly, "mean"), o["sae"] + mean, atol=1e-6)
    assert torch.allclose(combine_paths(o, ("sae",), m.poly, "zero"), o["sae"])
    assert torch.allclose(combine_paths(o, ("sae", "interaction"), m.poly, "mean"), o["sae"] + o["interaction"])
    assert torch.allclose(o["sae"] + o["interaction"], m(x), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(m(x), m.forward_dense(x), atol=1e-5)


def test_checkpoint_round_trip_and_refusal(tmp_path):
    m = joint_model()
    x = torch.randn(40, D)
    m.poly.set_path_means(*encode_all(m.sae, x))
    norm = Normalizer.fit(x, "scalar")
    checkpoint.save(tmp_path / "p5", "joint", {**m.state_dict(), **norm.tensors()},
                    {"hparams": m.hparams(), "normalize": "scalar", "data": {}, "seed": 0, "parents": {}})
    with pytest.raises(UserError, match="PolySAE joint model .*--decoder nfm"):
        load_joint_checkpoint(tmp_path / "p5")
    m2, _, cfg = load_joint_checkpoint(tmp_path / "p5", allow_poly=True)
    assert isinstance(m2, PolyJointModel) and cfg["hparams"]["decoder"] == "poly"
    assert torch.equal(path_outputs(m2, x)["interaction"], path_outputs(m, x)["interaction"])


@pytest.fixture(scope="module")
def poly_run(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("poly")
    data = ["--train-tokens", "12000", "--val-tokens", "3000", "--epochs", "2", "--cache-dir", str(out / "cache")]
    run_script("part5_joint_sae_nfm.py", "--decoder", "poly", "--model", str(tiny_demo), "--dataset",
               str(tiny_demo / "corpus.txt"), "--layer", "1", "--n-latents", "128", "--k", "8", "--nfm-dim", "16",
               "--out", str(out / "p5"), *data)
    run_script("part3_train_secondary_sae.py", "--joint", str(out / "p5"), "--expansion", "4", "--k", "4",
               "--out", str(out / "p3j"), *data)
    run_script("part8_stimulus_response.py", "--joint", str(out / "p5"), "--secondary", str(out / "p3j"),
               "--n-perm", "199", "--out", str(out / "p8j"))
    return out, data


def test_part5_poly_then_part3_and_part8_joint(poly_run):
    out, data = poly_run
    m = json.loads((out / "p5" / "metrics.json").read_text())
    h, c, p = m["held_out_test"], m["comparisons"], m["params"]
    assert set(h["fvu"]) == {"full", "sae[mean_ablation]", "sae[zero_ablation]"} and 0 < h["fvu"]["full"] < 1
    cfg = json.loads((out / "p5" / "config.json").read_text())
    assert cfg["kind"] == "joint" and cfg["hparams"]["decoder"] == "poly"
    d = cfg["hparams"]["sae"]["d"]
    target = joint_nfm_param_count(128, d, 16, 16)
    assert p["joint_nfm_total"] == target and abs(p["total"] / target - 1) < 0.01
    assert p["total"] == poly_param_count(128, d, p["rank2"], p["rank3"]) == p["sae"] + p["poly_interaction"]
    assert p["total"] <= c["standalone_sae"]["params"] < p["total"] + 2 * d + 1
    assert abs(c["joint_vs_standalone_relative_fvu_reduction"] - (1 - h["fvu"]["full"] / c["standalone_sae"]["fvu"])) < 1e-12
    for f in ("model.safetensors", "training_curves.png", "fvu_by_variant.png", "baseline_sae/model.safetensors"):
        assert (out / "p5" / f).is_file()
    m3 = json.loads((out / "p3j" / "metrics.json").read_text())
    assert m3["source"].startswith("joint") and m3["input_tensor"].startswith("PolySAE")
    assert 0 < m3["held_out_test"]["fvu"] < 1
    assert json.loads((out / "p3j" / "config.json").read_text())["hparams"]["d"] == p["rank2"] + p["rank3"]
    m8 = json.loads((out / "p8j" / "metrics.json").read_text())
    assert m8["models"]["path"] == "joint" and m8["nfm_dimensions"]["combined_weight"]
    assert m8["secondary"]["pair_attribution"] and m8["secondary"]["pair_attribution_scope"].startswith("PolySAE")
    # the stages that need the NFM refuse it in one line
    for script, extra in (("part4_nfm_inspector.py", [a for a in data if a not in ("--epochs", "2")]),
                          ("part9_clamping_intervention.py", ["--secondary", str(out / "p3j"), "--part8", str(out / "p8j")])):
        proc = run_script(script, "--joint", str(out / "p5"), "--out", str(out / "refused"), *extra, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, script
        lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and "PolySAE" in lines[0] and "--decoder nfm" in lines[0], script


def test_part8_pair_attribution_reads_the_poly_pairwise_factors():
    """part8's exact pair attribution of a secondary feature, on an order-2 PolySAE (no triple term): the mean
    contribution of pair (i, j) is the second difference of that feature's pre-activation,
    pre(i, j) - pre(i) - pre(j) + pre(), since h = a^2 is 2 p + the features' own squares."""
    from types import SimpleNamespace

    import numpy as np

    from common.sae import TopKSAE
    from part8_stimulus_response import nfm_dimensions, secondary_pairs

    m = decoder(order=2, rank2=5, rank3=0).float()
    i, j, ci, cj = 3, 9, 0.8, 1.7
    idx = torch.tensor([[i, j]] * 3 + [[0, 1]] * 5)
    val = torch.tensor([[ci, cj]] * 3 + [[0.5, 0.4]] * 5)
    torch.manual_seed(1)
    sec = TopKSAE(SAEConfig(d=m.cfg.hidden, n_latents=8, k=2))
    with torch.no_grad():
        i50, v50 = codes(50, 4)
        unorm = Normalizer.fit(m.hidden(i50, v50.float()), "scalar")
        pre = lambda ii, vv: (sec.W_enc[2] * (unorm.encode(m.hidden(ii, vv)) - sec.b_dec)).sum(1)  # noqa: E731
        second = (pre(torch.tensor([[i, j]]), torch.tensor([[ci, cj]])) - pre(torch.tensor([[i]]), torch.tensor([[ci]]))
                  - pre(torch.tensor([[j]]), torch.tensor([[cj]])) + pre(torch.tensor([[i]]), torch.tensor([[0.0]])))
    sel = SimpleNamespace(idx=idx, val=val, owner=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), n=4,
                          a=np.array(["x", "x", "y", "y"]), b=np.array(["u", "v", "u", "v"]))
    [res] = secondary_pairs(m, sec, unorm, sel, [{"feature": 2}], top=5)
    top = {tuple(p["pair"]): p for p in res["pairs"]}
    assert top[(i, j)]["tokens_both_active"] == 3
    assert abs(top[(i, j)]["mean_contribution"] - float(second)) < 1e-4 * max(1.0, abs(float(second)))
    dims = nfm_dimensions(m, sel, (["x", "y"], ["u", "v"]), i, j, top=3)
    assert len(dims["combined_weight"]) == 3 and dims["pairs_driving_top_max_difference_dim"]["pairs"]


class _Crash(Exception):
    pass


def test_crash_and_resume_is_bitwise_identical(tmp_path):
    """part5 --resume for a PolySAE: the state (U after its QR retraction, lambdas, Adam moments) resumes exactly."""
    from common.train import TrainCheckpoints, fit

    torch.manual_seed(0)
    x = torch.randn(600, 16)

    def run(out, resume: bool, crash_at):
        torch.manual_seed(1)
        model = PolyJointModel(SAEConfig(d=16, n_latents=64, k=4, dead_tokens=64),
                               PolyConfig(n_features=64, d=16, rank2=6, rank3=4))
        calls = {"n": 0}

        def step_loss(idx):
            calls["n"] += 1
            if crash_at is not None and calls["n"] == crash_at:
                raise _Crash
            return model.loss(x[idx])

        args = type("A", (), {"checkpoint_every": 4, "resume": resume, "seed": 0})()
        res = fit(model, 600, 64, 30, 1e-2, step_loss, lambda: {"val_loss": float(step_loss(torch.arange(64))[0])},
                  eval_every=7, seed=3, desc="t", before_step=model.sae.remove_parallel_grad,
                  after_step=model.after_step, ckpt=TrainCheckpoints(out, args), tag="joint")
        return model, res

    ref_model, ref = run(tmp_path / "ref", False, None)
    with pytest.raises(_Crash):
        run(tmp_path / "crash", False, 19)
    model, res = run(tmp_path / "crash", True, None)
    assert res.history == ref.history and res.best_step == ref.best_step
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
