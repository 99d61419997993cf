import json

import pytest

from common.cli import UserError
from common.models import load_model, resolve_model_path


def test_model_resolution_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    assert resolve_model_path("openlm-research/open_llama_3b") == "openlm-research/open_llama_3b"   # hub id kept


def test_local_folder_loads_through_from_pretrained(tiny_demo):
    model, tok, path = load_model(str(tiny_demo), "float32", "cpu")
    assert path == str(tiny_demo) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tok.bos_token_id is not None


def test_plots_and_summary(tmp_path, capsys):
    from common import plots, summary
    hist = [{"step": s, "train_fvu": 1 / s, "val_fvu": 1.1 / s} for s in (1, 2, 3)]
    for p in (plots.training_curves(hist, ["fvu"], tmp_path / "c.png", "t", 2),
              plots.density_histogram([0.0, 0.1, 0.01], 100, tmp_path / "d.png", "t"),
              plots.bars(["a", "b"], [0.1, -0.2], tmp_path / "b.png", "t", "y")):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(
        {"stage": "part1_train_topk_sae", "held_out_test": {"fvu": 0.25, "l0": 8.0, "dead_fraction": 0.5}}))
    summary.main([str(tmp_path / "run"), str(tmp_path / "absent")])
    out = capsys.readouterr().out
    assert "FVU 0.2500" in out and "dead 50.0%" in out and "not run" in out
