import pytest
import torch

from common.cli import UserError
from common.normalize import Normalizer


def _x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5000, 16, generator=g) * torch.linspace(0.1, 10, 16) + 4


def test_scalar_mode_unit_mean_squared_norm_and_keeps_geometry():
    x = _x()
    n = Normalizer.fit(x, "scalar")
    z = n.encode(x)
    assert abs(z.pow(2).sum(1).mean().item() - 16) < 1e-2
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(cos(x[:10], x[10:20]), cos(z[:10], z[10:20]), atol=1e-5)   # directions unchanged
    assert torch.allclose(n.decode(z), x, atol=1e-4)


def test_zscore_mode():
    x = _x()
    n = Normalizer.fit(x, "zscore")
    z = n.encode(x)
    assert torch.allclose(z.mean(0), torch.zeros(16), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(16), atol=1e-3)
    assert torch.allclose(n.decode(z), x, atol=1e-4)


def test_round_trip_through_tensors():
    x = _x()
    n = Normalizer.fit(x, "zscore")
    m = Normalizer.from_tensors(n.tensors(), "zscore")
    assert torch.equal(m.encode(x), n.encode(x))


def test_unknown_mode():
    with pytest.raises(UserError, match="normalize"):
        Normalizer.fit(_x(), "layernorm")
