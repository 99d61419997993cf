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


class _Payload:
    """Unpickling this object writes a marker file: proof that a loader executed the pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_where_weights_are_expected_is_refused_not_executed(tmp_path):
    import pickle

    from common.data import load_activation_file
    from common.loading import load_sae_checkpoint

    marker = tmp_path / "PWNED"
    blob = pickle.dumps({"w": _Payload(marker)})
    fn, args = _Payload(tmp_path / "selftest").__reduce__()
    fn(*args)                                  # what unpickling would call: the payload is live
    assert (tmp_path / "selftest").exists()
    # (1) in a checkpoint folder, with a config that claims the right kind and the pickle's own hash
    _save(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(blob)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["content_hash"] = checkpoint.file_hash(tmp_path / "ck" / "model.safetensors")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="cannot be read"):
        load_sae_checkpoint(tmp_path / "ck")
    # (2) as an activation file, also under a .pt name
    for name in ("acts.safetensors", "acts.pt"):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(UserError, match="not a readable safetensors file"):
            load_activation_file(tmp_path / name, "--activations")
    assert not marker.exists()


def test_streamed_safetensors_writer_gives_save_files_bytes(tmp_path):
    """write_safetensors (no in-memory bytes copy of the tensors) against safetensors' own save_file: the same
    bytes, for every stored dtype, 0-d, empty and non-contiguous tensors, with and without metadata."""
    from safetensors.torch import save_file

    from common.checkpoint import ST_DTYPE_NAMES, write_safetensors
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}.{str(dt)[6:]}": (torch.randn(3, 5, generator=g) * 50).to(dt) for i, dt in enumerate(ST_DTYPE_NAMES)}
    tensors.update({"zero_d": torch.tensor(2.5), "empty": torch.zeros(0, 4), "strided": torch.randn(6, 4, generator=g).T,
                    "a.first": torch.arange(9, dtype=torch.int32)})
    for meta in (None, {"key": "value"}):
        write_safetensors(tmp_path / "ours.safetensors", tensors, meta)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "theirs.safetensors"), metadata=meta)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    # several metadata keys: save_file's order follows a Rust HashMap (it varies between processes); ours is the
    # dict's, so the same call gives the same bytes every time
    from safetensors import safe_open
    meta = {"key": "value", "n": "3", "a": "x"}
    write_safetensors(tmp_path / "ours.safetensors", tensors, meta)
    first = (tmp_path / "ours.safetensors").read_bytes()
    write_safetensors(tmp_path / "ours.safetensors", tensors, meta)
    assert (tmp_path / "ours.safetensors").read_bytes() == first
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
