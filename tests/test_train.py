import torch

from common.train import fit, lr_factor, split_selection_test


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


def test_selection_and_test_halves_split_at_a_document_boundary():
    x = torch.arange(20.0)[:, None]
    docs = torch.tensor([0] * 6 + [1] * 8 + [2] * 6)
    (xs, ds), (xt, dt) = split_selection_test(x, docs, docs)
    assert not set(ds.tolist()) & set(dt.tolist())
    assert xs.shape[0] + xt.shape[0] == 20 and xs.shape[0] == 6
