import json

import pytest
import torch

from common import checkpoint
from common.cli import UserError


def _save(d, kind="sae"):
    return checkpoint.save(d, kind, {"w": torch.arange(6.0).reshape(2, 3)}, {"hparams": {"a": 1}, "parents": {}})


def test_round_trip_and_hash(tmp_path):
    h = _save(tmp_path)
    t, cfg = checkpoint.load(tmp_path, "sae", "--sae")
    assert torch.equal(t["w"], torch.arange(6.0).reshape(2, 3))
    assert cfg["content_hash"] == h == checkpoint.file_hash(tmp_path / "model.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]   # no temporary files left


def test_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        checkpoint.load(tmp_path / "missing", "sae", "--sae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="finished run"):
        checkpoint.load(tmp_path / "empty", "sae", "--sae")
    _save(tmp_path / "n", kind="nfm")
    with pytest.raises(UserError, match="holds a 'nfm' checkpoint"):
        checkpoint.load(tmp_path / "n", "sae", "--sae")
    _save(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.load(tmp_path / "c", "sae", "--sae")
    _save(tmp_path / "m")
    checkpoint.atomic_save_tensors(tmp_path / "m" / "model.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(UserError, match="mixes two runs"):
        checkpoint.load(tmp_path / "m", "sae", "--sae")


def test_check_parent(tmp_path):
    _save(tmp_path / "a")
    checkpoint.save(tmp_path / "b", "sae", {"w": torch.ones(3)}, {"hparams": {}, "parents": {}})
    _, a = checkpoint.load(tmp_path / "a", "sae", "--sae")
    _, b = checkpoint.load(tmp_path / "b", "sae", "--sae")
    child = {"path": "nfm", "parents": {"sae": checkpoint.parent_ref(a)}}
    checkpoint.check_parent(child, "sae", a, "--nfm", "--sae")
    with pytest.raises(UserError, match="pass the sae it was trained on") as e:
        checkpoint.check_parent(child, "sae", b, "--nfm", "--sae")
    assert "\n" not in str(e.value)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    checkpoint.atomic_write_bytes(p, b'{"ok": 1}')

    with pytest.raises(TypeError):
        checkpoint.atomic_write_bytes(p, object())
    assert json.loads(p.read_text()) == {"ok": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]
