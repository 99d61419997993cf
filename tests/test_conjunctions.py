"""The conjunction-latent detector (common/conjunctions.py, detect_conjunctions.py).

A hand-built code and decoder where the answer is known: latent C is a conjunction of latents 0 and 1 (fires
when both features are present, absorbs them, and its decoder row adds the direction of a planted product
interaction), latent E a co-occurrence latent of 2 and 3 (fires when both are present, absorbs them, decoder
row in their span, no interaction in the data); 2 and 3 co-occur exactly as often as 0 and 1."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from common import conjunctions as cj
from common.errors import UserError
from conftest import run_script

D, N_FEAT, C, E = 16, 10, 10, 11          # width, features (= ordinary latents 0..9), the two test latents
U = 15                                    # the planted interaction's own direction (basis vector 15)


def hand_built(n: int = 6000, seed: int = 0):
    """(x [n, D], idx [n, 6], val [n, 6], W [12, D]) for the story above."""
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(n, N_FEAT, generator=g) < 0.08
    follow = torch.rand(n, 2, generator=g) < 0.6                             # 1 follows 0, 3 follows 2
    active[:, 1] |= active[:, 0] & follow[:, 0]
    active[:, 3] |= active[:, 2] & follow[:, 1]
    a = (1 + torch.rand(n, N_FEAT, generator=g)) * active                   # magnitudes in [1, 2]
    eye = torch.eye(D)
    inter = a[:, 0] * a[:, 1]                                               # product interaction of 0 and 1
    x = a @ eye[:N_FEAT] + inter[:, None] * eye[U] + 0.05 * torch.randn(n, D, generator=g)
    W = torch.cat([eye[:N_FEAT], torch.nn.functional.normalize(0.45 * eye[0] + 0.45 * eye[1] + 0.77 * eye[U], dim=0)[None],
                   torch.nn.functional.normalize(eye[2] + eye[3], dim=0)[None]])   # [12, D]
    code = torch.cat([a, torch.zeros(n, 2)], 1)                             # [n, 12] dense code
    absorbed = torch.rand(n, 4, generator=g) > 0.3                           # parents fire on ~30% of C's / E's rows
    both01, both23 = active[:, 0] & active[:, 1], active[:, 2] & active[:, 3]
    code[:, C] = inter * both01
    code[:, E] = (a[:, 2] + a[:, 3]) / 2 ** 0.5 * both23
    for j, (both, col) in enumerate(((both01, 0), (both01, 1), (both23, 2), (both23, 3))):
        code[both & absorbed[:, j], col] = 0
    val, idx = code.topk(6, dim=1)                                          # zero-valued slots are padding
    return x, idx, val, W


def batches_of(x, idx, val, batch):
    return lambda: ((x[s:s + batch], idx[s:s + batch], val[s:s + batch]) for s in range(0, x.shape[0], batch))


@pytest.fixture(scope="module")
def built():
    x, idx, val, W = hand_built()
    return x, idx, val, W, cj.detect(W, batches_of(x, idx, val, 1000), cfg=cj.DetectConfig(batch=1000, screen=False))


def row_of(res, latent):
    return res.rows(only_detected=False)[[r["latent"] for r in res.rows(only_detected=False)].index(latent)]


def test_conjunction_found_with_its_parents_and_outranks_the_cooccurrence_latent(built):
    *_, res = built
    c, e = row_of(res, C), row_of(res, E)
    assert {c["parent_a"], c["parent_b"]} == {0, 1}
    assert c["detected"] and c["score"] > 0.2
    assert c["rho"] > 0.7 and c["z"] > res.z_crit and c["effect"] > 0.5
    assert c["a_fires_given_c"] < 0.5 and c["b_fires_given_c"] < 0.5       # absorbed parents, still attributed
    # the decoy: the firing evidence alone cannot tell it apart, the geometry and the data do
    assert {e["parent_a"], e["parent_b"]} == {2, 3}
    assert e["jaccard"] > 0.5 and min(e["excess_a"], e["excess_b"]) > 0.1
    assert e["rho"] < 0.05 and not e["detected"] and e["score"] == 0
    pair = cj.pair_scores(res, torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]))
    assert pair[0] == pytest.approx(c["score"]) and pair[1] == 0 and pair[2] == 0
    assert cj.pair_scores(res, 1, 0)[0] == pair[0]                          # either order
    detected = {r["latent"] for r in res.rows()}
    assert detected == {C}, res.rows()                                       # no ordinary latent is flagged
    # each principle's figure on its own (no gate): the decoy pair scores under firing, not under geometry
    assert cj.pair_scores(res, 2, 3, key="jaccard")[0] > 0.5
    assert cj.pair_scores(res, 2, 3, key="rho")[0] < 0.05


def test_no_interaction_no_detection():
    """The same code and decoder, but the data hold no interaction: C's new direction carries nothing that
    the parents' co-presence explains beyond additivity, so the data gate rejects it."""
    x, idx, val, W = hand_built()
    x = x.clone()
    x[:, U] = 0.05 * torch.randn(x.shape[0], generator=torch.Generator().manual_seed(1))
    res = cj.detect(W, batches_of(x, idx, val, 1000))
    assert not res.detected.any(), res.rows()
    assert row_of(res, C)["z"] < res.z_crit


def test_batch_size_and_screening_do_not_change_the_result(built):
    x, idx, val, W, ref = built
    other = cj.detect(W, batches_of(x, idx, val, 257), cfg=cj.DetectConfig(batch=257, screen=True))
    assert torch.equal(ref.latent, other.latent)
    assert torch.equal(ref.parent_a, other.parent_a) and torch.equal(ref.parent_b, other.parent_b)
    assert torch.equal(ref.detected, other.detected)
    for col in ("score", "rho", "excess_a", "presence_a", "coef_a"):
        assert torch.allclose(getattr(ref, col), getattr(other, col), rtol=1e-5, atol=1e-6), col
    scr = ~other.jaccard.isnan()                                            # the screened rows carry row figures
    assert 0 < int(scr.sum()) < len(scr) and bool(scr[ref.latent == E].item()) is False
    for col in ("jaccard", "recall", "z", "effect", "delta"):
        a, b = getattr(ref, col)[scr], getattr(other, col)[scr]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), col
    # held-out rows for pass 2: same parents, row figures from the other rows
    x2, idx2, val2, _ = hand_built(seed=1)
    ho = cj.detect(W, batches_of(x, idx, val, 1000), batches_of(x2, idx2, val2, 1000))
    assert ho.n_test == x2.shape[0] and torch.equal(ho.parent_a, ref.parent_a)
    assert row_of(ho, C)["detected"]


def test_streaming_memory_pieces():
    """No [rows, n_latents] or [n_latents, n_latents] tensor: the candidate search is chunked and every pass
    takes its rows in batches; the co-firing counts are the exact counts."""
    x, idx, val, W = hand_built(n=1500)
    F = torch.zeros(x.shape[0], W.shape[0]).scatter_add_(1, idx, (val > 0).float()) > 0
    lat = torch.tensor([C, E])
    cand = torch.tensor([[0, 1, 2], [2, 3, 0]])
    co = cj.cofiring(batches_of(x, idx, val, 100)(), lat, cand, W.shape[0])
    exact = torch.stack([(F[:, l, None] & F[:, k]).sum(0) for l, k in zip(lat, cand)]).double()
    assert torch.equal(co, exact)
    p1 = cj.firing_centroids(batches_of(x, idx, val, 100)(), W.shape[0])
    assert torch.equal(p1["count"], F.sum(0))
    assert torch.allclose(p1["M"][C], (x[F[:, C]].mean(0) - x.mean(0)), atol=1e-5)


def test_stage_script_smoke(tmp_path):
    from common import synthetic
    cfg = synthetic.SyntheticConfig(d=16, n_true=32, n_pairs=3, n_decoys=3, p_active=0.05, seed=0)
    synthetic.write(tmp_path / "data", cfg, 6000)
    acts = str(tmp_path / "data" / "activations.safetensors")
    import detect_conjunctions
    import part1_train_topk_sae
    part1_train_topk_sae.main(["--activations", acts, "--n-latents", "64", "--k", "4", "--epochs", "3",
                               "--out", str(tmp_path / "p1")])
    proc = run_script("detect_conjunctions.py", "--sae", str(tmp_path / "p1"), "--activations", acts,
                      "--out", str(tmp_path / "conj"))
    out = tmp_path / "conj"
    assert "results in" in proc.stdout and "conjunction latents among" in proc.stdout
    with open(out / "conjunctions.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"latent", "parent_a", "parent_b", "score", "rho", "jaccard", "z", "effect", "detected",
                     "z_heldout"} <= set(rows[0])
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_examined"] == len(rows) and m["n_conjunction_latents"] == sum(r["detected"] == "True" for r in rows)
    assert "definitions" in m and m["rows"]["fit_and_test"] == 5400
    assert (out / "conjunctions.png").stat().st_size > 1000
    with pytest.raises(UserError, match="--max-rows"):
        detect_conjunctions.main(["--sae", str(tmp_path / "p1"), "--activations", acts, "--out", str(tmp_path / "bad"),
                                  "--max-rows", "-1"])
