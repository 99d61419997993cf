"""Schedule-free SignSGD (common/optim.py) against the paper's recurrences written out plainly."""
import copy

import pytest
import torch

from common.optim import ScheduleFreeSignSGD


def _reference(w0, grads_at, lr, beta, steps):
    """Defazio et al. 2024, Alg. 1 with SignSGD as the base step and c_t = lr^2 / sum lr^2 (= 1/t at constant lr)."""
    z, x = w0.clone(), w0.clone()
    for t in range(1, steps + 1):
        y = (1 - beta) * z + beta * x
        z = z - lr * grads_at(y, t).sign()
        c = 1.0 / t
        x = (1 - c) * x + c * z
    return (1 - beta) * z + beta * x, x        # (y for the next gradient, x the averaged model)


def test_matches_the_plain_recurrences_and_switches_between_y_and_x():
    torch.manual_seed(0)
    w0, target = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)

    def grads_at(w, t):
        return (w - target) * torch.cos(torch.arange(40.0, dtype=torch.float64) + t)

    p = torch.nn.Parameter(w0.clone())
    opt = ScheduleFreeSignSGD([p], lr=0.05, momentum=0.9)
    for t in range(1, 26):
        p.grad = grads_at(p.detach(), t)
        opt.step()
    y_ref, x_ref = _reference(w0, grads_at, 0.05, 0.9, 25)
    assert torch.allclose(p.detach(), y_ref, atol=1e-12)
    opt.eval()
    assert torch.allclose(p.detach(), x_ref, atol=1e-12)
    opt.eval()                                   # idempotent
    assert torch.allclose(p.detach(), x_ref, atol=1e-12)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    assert torch.allclose(p.detach(), y_ref, atol=1e-12)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = ScheduleFreeSignSGD([a], lr=0.1), ScheduleFreeSignSGD([b], lr=0.1)
    for t in range(5):
        a.grad = torch.sin(a.detach() * (t + 1))
        oa.step()
    with torch.no_grad():
        b.copy_(a)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))   # as if read back from disk
    for t in range(5, 9):
        for p, o in ((a, oa), (b, ob)):
            p.grad = torch.sin(p.detach() * (t + 1))
            o.step()
    assert torch.equal(a, b)


def test_bad_hyperparameters():
    with pytest.raises(ValueError):
        ScheduleFreeSignSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
