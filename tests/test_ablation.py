"""Path ablations remove a path by its mean, everywhere (issue 12, section 3).

The NFM's two paths carry constant offsets that cancel: b_lin against the interaction MLP's biases. Moving a
constant c from one path to the other (b_lin + c, b_2 - c) leaves the model's output unchanged, so any honest
statement about "the linear path" or "the interaction path" must be unchanged too. Mean-ablation (the removed
path replaced by its mean output on training tokens) is; zero-ablation (the path deleted) is not, which is what
made "either NFM path alone makes it worse" an artefact. Each reporting function of part2, part4, part5, part6
and part9 is checked on such a pair of models."""
import copy

import pytest
import torch

from common.joint import JointModel
from common.nfm import PATHS, NFM, NFMConfig, combine_paths, predict
from common.normalize import Normalizer
from common.sae import SAEConfig, TopKSAE

D, N, K = 12, 40, 5


def codes(n, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(n)])
    return idx, torch.rand(n, K, generator=g) + 0.1


def nfm_pair(offset=3.0):
    """An NFM with path means set on training codes, and a copy whose constant moved between the paths."""
    torch.manual_seed(0)
    a = NFM(NFMConfig(n_features=N, d=D, dim=6, hidden=8, dropout=0.0))
    with torch.no_grad():
        a.W_lin.normal_(0, 0.3)
        a.b_lin.normal_(0, 1.0)
    b = copy.deepcopy(a)
    c = torch.full((D,), offset)
    with torch.no_grad():
        b.b_lin += c
        b.mlp2.bias -= c
    train = codes(500, 1)
    for m in (a, b):
        m.set_path_means(*train)
        m.eval()
    return a, b


def test_the_offset_transfer_changes_no_output():
    a, b = nfm_pair()
    idx, val = codes(64, 2)
    assert torch.allclose(predict(a, idx, val), predict(b, idx, val), atol=1e-5)
    assert torch.allclose(a.path_mean("linear") + 3.0, b.path_mean("linear"), atol=1e-5)


def test_combine_paths_mean_ablation_is_invariant_and_zero_ablation_is_not():
    a, b = nfm_pair()
    idx, val = codes(64, 3)
    outs = [{p: predict(m, idx, val, (p,)) for p in PATHS} for m in (a, b)]
    for keep in (("linear",), ("interaction",), PATHS):
        ya, yb = (combine_paths(o, keep, m, "mean") for o, m in zip(outs, (a, b)))
        assert torch.allclose(ya, yb, atol=1e-5), keep
    za, zb = (combine_paths(o, ("linear",), m, "zero") for o, m in zip(outs, (a, b)))
    assert (za - zb).abs().max() > 2.0


def test_part2_reductions_and_magnitudes():
    import part2_train_residual_nfm as p2
    a, b = nfm_pair()
    idx, val = codes(200, 4)
    r = predict(a, idx, val) + 0.1 * torch.randn(200, D, generator=torch.Generator().manual_seed(5))
    ra, rb = p2.path_ablations(a, idx, val, r), p2.path_ablations(b, idx, val, r)
    for key, v in ra["residual_reduction"].items():
        if "zero" not in key:
            assert v == pytest.approx(rb["residual_reduction"][key], abs=1e-5), key
    for key, v in ra["magnitude"].items():
        if "mean" in key:
            assert v == pytest.approx(rb["magnitude"][key], abs=1e-5), key
    assert abs(ra["residual_reduction"]["linear_only[zero_ablation]"] - rb["residual_reduction"]["linear_only[zero_ablation]"]) > 0.1


def test_part4_output_shares():
    import part4_nfm_inspector as p4
    a, b = nfm_pair()
    idx, val = codes(200, 6)
    sa, sb = p4.output_shares(a, idx, val), p4.output_shares(b, idx, val)
    for key in ("linear_share_of_output_magnitude[mean_ablation]", "linear_share_of_output_energy[mean_ablation]"):
        assert sa[key] == pytest.approx(sb[key], abs=1e-6), key
    assert abs(sa["linear_share_of_output_magnitude[zero_ablation]"] - sb["linear_share_of_output_magnitude[zero_ablation]"]) > 0.05


def test_part6_spliced_variants():
    import part6_kl_divergence as p6
    a, b = nfm_pair()
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d=D, n_latents=N, k=K)).eval()
    norm = Normalizer(torch.zeros(D), torch.full((D,), 2.0), "scalar")
    h = torch.randn(50, D) * 2
    ra, rb = (p6.Spliceable(sae, norm, m, None, None, None, None).reconstructions(h) for m in (a, b))
    for name in ra:
        if "zero_ablation" not in name:
            assert torch.allclose(ra[name], rb[name], atol=1e-4), name
    assert (ra["sae+nfm_linear[zero_ablation]"] - rb["sae+nfm_linear[zero_ablation]"]).abs().max() > 1.0


def test_part5_and_part6_joint_variants():
    import part6_kl_divergence as p6
    from common.joint import VARIANTS, path_outputs
    torch.manual_seed(2)
    ja = JointModel(SAEConfig(d=D, n_latents=N, k=K), NFMConfig(n_features=N, d=D, dim=6, hidden=8, dropout=0.0)).eval()
    with torch.no_grad():
        ja.nfm.W_lin.normal_(0, 0.3)
        ja.nfm.b_lin.normal_(0, 1.0)
    jb = copy.deepcopy(ja)
    with torch.no_grad():
        jb.nfm.b_lin += 3.0
        jb.nfm.mlp2.bias -= 3.0
    x_train, x = torch.randn(300, D), torch.randn(60, D)
    for m in (ja, jb):
        m.nfm.set_path_means(*m.sae.encode(x_train))
    oa, ob = path_outputs(ja, x), path_outputs(jb, x)
    for name, keep in VARIANTS.items():                       # part5's variants
        assert torch.allclose(combine_paths(oa, keep, ja.nfm), combine_paths(ob, keep, jb.nfm), atol=1e-4), name
    norm = Normalizer(torch.zeros(D), torch.ones(D), "none")
    ra, rb = (p6.Spliceable(TopKSAE(SAEConfig(d=D, n_latents=N, k=K)), norm, None, j, norm, None, None).reconstructions(x)
              for j in (ja, jb))
    for name in ra:
        if name.startswith("joint") and "zero_ablation" not in name:
            assert torch.allclose(ra[name], rb[name], atol=1e-4), name


def test_part9_linear_path_control_direction():
    import part9_clamping_intervention as p9
    a, b = nfm_pair()
    torch.manual_seed(3)
    sae = TopKSAE(SAEConfig(d=D, n_latents=N, k=K)).eval()
    norm = Normalizer(torch.zeros(D), torch.ones(D), "none")
    h = torch.randn(30, D)
    feat = int(sae.encode(h)[0][0, 0])
    da, db = (p9.Clamp(sae, norm, m, None, None, "primary", feat, mult=4.0, mode="linear_control").delta(h) for m in (a, b))
    assert da.abs().max() > 0 and torch.allclose(da, db, atol=1e-4)


def test_a_checkpoint_without_path_means_is_refused_in_one_line():
    from common.errors import UserError
    a, _ = nfm_pair()
    state = {k: v for k, v in a.state_dict().items() if k not in ("linear_mean", "interaction_mean", "mean_tokens")}
    with pytest.raises(UserError, match="retrain it with part2"):
        NFM.from_tensors(state, a.hparams())
    fresh = NFM(NFMConfig(n_features=N, d=D))
    with pytest.raises(UserError, match="no path means"):
        fresh.path_mean("linear")
