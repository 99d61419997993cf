import torch

from common.data import heldout_half, split_selection_test
from common.train import fit, lr_factor


def test_lr_schedule_warmup_constant_decay():
    total = 100
    f = [lr_factor(s, total) for s in range(total)]
    assert f[0] < f[4] <= 1.0 and f[4] == 1.0           # 5% warm-up
    assert all(v == 1.0 for v in f[5:80])               # constant
    assert f[80] == 1.0 > f[90] > f[99] > 0             # linear decay over the last 20%


def test_fit_keeps_the_best_state_not_the_last():
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    evals = iter([3.0, 1.0, 2.0, 5.0])                   # best at the second evaluation
    weights = []

    def step_loss(idx):
        return (model.weight - 10).pow(2).sum(), {"loss": 0.0}

    def evaluate():
        weights.append(model.weight.item())
        return {"val_loss": next(evals)}

    res = fit(model, n_train=8, batch_size=4, steps=8, lr=0.1, step_loss=step_loss, evaluate=evaluate,
              eval_every=2, seed=0, desc="t")
    assert res.best_step == 4 and res.best_val == 1.0
    assert model.weight.item() == weights[1] != weights[-1]
    assert [h["step"] for h in res.history] == [2, 4, 6, 8]


def test_selection_and_test_halves_split_by_document_whatever_the_token_count():
    """Each held-out document falls wholly in one half, fixed by its index: a stage that collects fewer or more
    held-out tokens (or part6, which reads documents itself) puts every document in the same half."""
    docs = torch.repeat_interleave(torch.arange(40), 5)                    # 40 documents of 5 tokens
    x = torch.arange(200.0)[:, None]
    (xs, ds), (xt, dt) = split_selection_test(x, docs, docs)
    assert not set(ds.tolist()) & set(dt.tolist()) and xs.shape[0] + xt.shape[0] == 200
    assert all(heldout_half(d) == "selection" for d in ds.tolist()) and all(heldout_half(d) == "test" for d in dt.tolist())
    assert 10 <= len(set(dt.tolist())) <= 30                                  # about half the documents each
    (_, ds2), (_, dt2) = split_selection_test(x[:77], docs[:77], docs[:77])  # a shorter collection
    assert set(dt2.tolist()) <= set(dt.tolist()) and set(ds2.tolist()) <= set(ds.tolist())
    # without document indices: the first and second half of the rows
    (xs, ), (xt, ) = split_selection_test(x, None)
    assert xs[-1, 0] == 99 and xt[0, 0] == 100


def test_normalized_halves_equal_normalising_first():
    """Activations.normalized_halves splits the stored bfloat16 rows, releases them and normalises each half: the
    same bytes as normalising every row first and splitting after (what the stages did), with less held at once."""
    from common.data import Activations
    from common.normalize import Normalizer
    g = torch.Generator().manual_seed(0)
    docs = torch.repeat_interleave(torch.arange(30), 7)
    val = (torch.randn(210, 12, generator=g) * 3 + 1).bfloat16()
    norm = Normalizer.fit(torch.randn(500, 12, generator=g) * 3 + 1, "zscore")
    (want_sel,), (want_test,) = split_selection_test(norm.encode(val), docs)
    acts = Activations(None, val, docs, {})
    sel, test = acts.normalized_halves(norm.encode)
    assert acts.val is None and sel.dtype == want_sel.dtype == torch.float32
    assert torch.equal(sel, want_sel) and torch.equal(test, want_test) and sel.shape[0] + test.shape[0] == 210
