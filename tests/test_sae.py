"""TopK SAE: sparse fast path == dense reference (outputs and gradients), and the training recipe."""
import pytest
import torch

from common.cli import UserError
from common.metrics import recon_stats
from common.sae import SAEConfig, TopKSAE, train_sae


def _sae(d=24, n=96, k=6, seed=0, **kw):
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d=d, n_latents=n, k=k, **kw)).double()
    sae.renorm_decoder()  # exact unit norm in float64
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def test_sparse_and_dense_paths_agree_outputs_and_gradients():
    sae = _sae()
    x = torch.randn(64, 24, dtype=torch.float64)
    target = torch.randn(64, 24, dtype=torch.float64)
    x_hat, idx, val = sae(x)
    ((x_hat - target) ** 2).sum().backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    x_hat_dense, f = sae.forward_dense(x)
    ((x_hat_dense - target) ** 2).sum().backward()
    assert torch.allclose(x_hat, x_hat_dense, atol=1e-12)
    assert torch.equal((f > 0).sum(1), (val > 0).sum(1))
    for n, p in sae.named_parameters():
        assert torch.allclose(sparse_grads[n], p.grad, atol=1e-10), n
        assert p.grad.abs().sum() > 0, n


def test_encoder_gradient_only_on_selected_latents():
    sae = _sae()
    x = torch.randn(8, 24, dtype=torch.float64)
    x_hat, idx, val = sae(x)
    x_hat.sum().backward()
    touched = (sae.W_enc.grad.abs().sum(1) > 0).nonzero().squeeze(1)
    assert set(touched.tolist()) <= set(idx[val > 0].tolist())


def test_zero_valued_picks_get_no_gradient():
    # with b_enc very negative, fewer than k latents are positive: the zero picks must not learn
    sae = _sae(k=10)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)
        sae.b_enc[:3] = 5.0
    x = torch.randn(4, 24, dtype=torch.float64) * 0.01
    x_hat, idx, val = sae(x)
    assert (val == 0).any()
    x_hat.sum().backward()
    assert sae.b_enc.grad[3:].abs().max() == 0


def test_unit_norm_decoder_and_parallel_gradient_removal():
    sae = _sae()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96, dtype=torch.float64))
    x = torch.randn(32, 24, dtype=torch.float64)
    loss, _ = sae.loss(x)
    loss.backward()
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-12
    with torch.no_grad():
        sae.W_dec += 0.3
    sae.renorm_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96, dtype=torch.float64))


def test_tied_init_and_data_init_of_b_dec():
    sae = _sae()
    assert torch.allclose(torch.nn.functional.normalize(sae.W_enc, dim=1), sae.W_dec, atol=1e-6)
    x = torch.randn(50, 24, dtype=torch.float64) + 3
    sae.init_b_dec(x)
    assert torch.allclose(sae.b_dec, x.mean(0))


def _dead_sae(dead):
    sae = _sae(dead_tokens=10)
    with torch.no_grad():
        sae.since_fired.fill_(0)
        sae.since_fired[dead] = 100
    return sae


@pytest.mark.parametrize("dead", [torch.arange(48, 96), torch.tensor([3, 17, 40, 41, 90])],
                         ids=["48 dead > k_aux", "5 dead < k_aux"])
def test_auxk_is_openais_recipe_against_a_dense_reference(dead):
    sae = _dead_sae(dead)
    x = torch.randn(32, 24, dtype=torch.float64) * 2 + 1
    # the fused training path: the aux picks come from the main encoder matmul, sparse backward
    idx, val, picks = sae.encode_with_aux(x)
    x_hat = sae.decode(idx, val)
    aux = sae.auxk_loss(picks, x, x_hat)
    assert aux > 0
    aux.backward()
    fused = {n: p.grad.clone() for n, p in sae.named_parameters()}
    rows = (fused["W_enc"].abs().sum(1) > 0).nonzero().squeeze(1)
    assert len(rows) > 0 and set(rows.tolist()) <= set(dead.tolist())      # only dead latents learn from it
    # openai/sparse_autoencoder train.py, written out densely: latents_pre_act with the live latents zeroed
    # (auxk_mask_fn), top k_aux = d // 2 = 12, ReLU; decode_sparse adds pre_bias (= b_dec); loss
    # normalized_mse(decode_sparse(...), x - recons.detach() + pre_bias.detach()) with
    # normalized_mse(r, t) = mse(r, t) / mse(t.mean(0), t); no scale for few dead latents
    sae.zero_grad()
    x_hat = x_hat.detach()
    dead_mask = torch.zeros(96, dtype=torch.bool)
    dead_mask[dead] = True
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    vals, inds = (pre * dead_mask).topk(12, dim=-1)
    f = torch.zeros_like(pre).scatter(1, inds, torch.relu(vals))
    recon = f @ sae.W_dec + sae.b_dec
    target = x - x_hat + sae.b_dec.detach()
    mse = lambda a, b: (a - b).pow(2).mean()
    expected = mse(recon, target) / mse(target.mean(0).expand_as(target), target)
    e = x - x_hat       # the denominator is the residual's variance, which here is far from x's
    assert (e - e.mean(0)).pow(2).sum() < 0.9 * (x - x.mean(0)).pow(2).sum()
    assert torch.allclose(aux, expected.detach(), rtol=1e-10)
    expected.backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-10), n
    assert sae.b_dec.grad.abs().sum() > 0       # b_dec cancels in the value, not in the gradient


@pytest.mark.parametrize("k, dead", [(6, torch.arange(48, 96)), (6, torch.tensor([3, 17, 40, 41, 90])),
                                     (16, torch.arange(10, 96)), (6, torch.arange(96))],
                         ids=["48 dead", "5 dead", "k 16 > k_aux 12", "all dead"])
def test_training_loss_fused_decode_equals_the_plain_pieces(k, dead):
    """TopKSAE.loss with AuxK on: the main top-k from the live block and the dead block's best, both decodes in
    one op (_PairBag) whose W_dec gradient is one CSR product on the encoder's sort. Against a full top-k over
    every column and two embedding_bag decodes: same loss, same gradients (float64)."""
    import torch.nn.functional as F
    sae = _sae(k=k, dead_tokens=10)
    with torch.no_grad():
        sae.since_fired.fill_(0)
        sae.since_fired[dead] = 100
    x = torch.randn(40, 24, dtype=torch.float64) * 2 + 1
    idx, val, (aidx, aval), code = sae._encode_aux(x)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    v0, i0 = pre.topk(k, dim=-1)                                                   # one top-k over every column
    assert torch.equal(idx.sort(1).values, i0.sort(1).values)
    assert torch.equal(val.sort(1).values, v0.clamp_min(0).sort(1).values)
    dmask = torch.zeros(96, dtype=torch.bool)
    dmask[dead] = True
    va, ia = pre.masked_fill(~dmask, -torch.inf).topk(min(12, len(dead)), dim=-1)   # AuxK's picks
    assert torch.equal(aidx.sort(1).values, ia.sort(1).values)
    loss, logs = sae.loss(x)
    assert logs["auxk"] > 0
    loss.backward()
    fused = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    with torch.no_grad():
        sae.since_fired.fill_(0)
        sae.since_fired[dead] = 100                                                # loss() updated the counters
    # the plain pieces: a dense top-k through autograd, two embedding_bags, the same loss formula
    f = torch.zeros_like(pre).scatter(1, i0, v0.clamp_min(0))
    fa = torch.zeros_like(pre).scatter(1, ia, va.clamp_min(0))
    x_hat = F.embedding_bag(i0, sae.W_dec, per_sample_weights=f.gather(1, i0), mode="sum") + sae.b_dec
    a_hat = F.embedding_bag(ia, sae.W_dec, per_sample_weights=fa.gather(1, ia), mode="sum") + sae.b_dec
    e = (x - x_hat).detach()
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    auxk = (a_hat - e - sae.b_dec.detach()).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    ref = fvu + sae.cfg.auxk_alpha * auxk
    assert torch.allclose(loss, ref, rtol=1e-12)
    ref.backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-12), n


def test_auxk_is_zero_until_latents_die():
    sae = _sae(dead_tokens=10)
    x = torch.randn(32, 24, dtype=torch.float64)
    assert sae.encode_with_aux(x)[2] is None
    _, logs0 = sae.loss(x)                  # nothing is dead yet: AuxK is zero
    assert logs0["auxk"] == 0.0


def test_fused_aux_encode_keeps_the_main_code_and_its_gradients():
    sae = _sae(dead_tokens=10)
    with torch.no_grad():
        sae.since_fired[::2] = 100                 # half the latents dead
    x = torch.randn(16, 24, dtype=torch.float64)
    idx, val, picks = sae.encode_with_aux(x)
    idx0, val0 = sae.encode(x)
    assert torch.equal(idx.sort(1).values, idx0.sort(1).values) and torch.allclose(val.sort(1).values, val0.sort(1).values)
    sae.decode(idx, val).pow(2).sum().backward()   # the aux picks get no gradient when unused
    g1 = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    sae.decode(idx0, val0).pow(2).sum().backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(g1[n], p.grad, atol=1e-12), n


def test_bad_sizes():
    with pytest.raises(UserError, match="exceeds"):
        TopKSAE(SAEConfig(d=8, n_latents=4, k=5))
    with pytest.raises(UserError, match="positive"):
        TopKSAE(SAEConfig(d=8, n_latents=0, k=1))


def test_training_recovers_planted_dictionary():
    # 48 unit directions in 16 dims, 2 active per token: a TopK SAE must explain most variance
    g = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(48, 16, generator=g), dim=1)
    n = 12000
    idx = torch.randint(0, 48, (n, 2), generator=g)
    f = torch.zeros(n, 48).scatter(1, idx, torch.rand(n, 2, generator=g) + 0.5)
    x = f @ D
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d=16, n_latents=96, k=4, dead_tokens=20000))
    before = recon_stats(sae, x[10000:])["fvu"]
    res = train_sae(sae, x[:10000], x[10000:11000], 300, 256, 3e-3, 50, 0, "test")
    after = recon_stats(sae, x[11000:])
    assert res.best_step > 0 and res.history
    assert after["fvu"] < 0.15 < before
    assert after["l0"] <= 4


def test_default_recipe_is_schedule_free_signsgd_and_saves_unit_norm_decoder():
    from common.sae import DEFAULT_OPTIMIZER, default_lr
    assert DEFAULT_OPTIMIZER == "signsgd-sf"
    assert default_lr(2 ** 14) == pytest.approx(5e-3) and default_lr(2 ** 16) == pytest.approx(2.5e-3)
    assert default_lr(2 ** 14, "adam") == pytest.approx(2e-4)
    g = torch.Generator().manual_seed(1)
    D = torch.nn.functional.normalize(torch.randn(48, 16, generator=g), dim=1)
    idx = torch.randint(0, 48, (6000, 2), generator=g)
    x = torch.zeros(6000, 48).scatter(1, idx, torch.rand(6000, 2, generator=g) + 0.5) @ D
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d=16, n_latents=96, k=4, dead_tokens=5000))
    res = train_sae(sae, x[:5000], x[5000:5500], 200, 256, default_lr(96), 50, 0, "test")
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-5)   # projected back at the averaged iterate
    assert recon_stats(sae, x[5500:])["fvu"] < 0.1
    assert res.history[-1]["val_fvu"] == pytest.approx(recon_stats(sae, x[5000:5500])["fvu"], rel=1e-5)
