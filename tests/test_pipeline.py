"""Smoke tests: part1 -> part2 -> part3 as subprocesses on the tiny demo, plus bad-input errors."""
import json

import torch

from conftest import run_script



def test_part1_outputs(pipeline):
    d = pipeline / "p1"
    for f in ("model.safetensors", "config.json", "metrics.json", "training_curves.png", "feature_density.png"):
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    m = json.loads((d / "metrics.json").read_text())["held_out_test"]
    assert 0 < m["fvu"] < 1
    assert m["l0"] <= 8 and 0 <= m["dead_fraction"] < 1 and m["n_tokens"] > 0
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["kind"] == "sae" and cfg["data"]["layer"] == 1 and cfg["data"]["split"] == "by document"
    assert cfg["normalize"] == "scalar"


def test_part2_beats_zero_prediction(pipeline):
    d = pipeline / "p2"
    for f in ("model.safetensors", "config.json", "metrics.json", "training_curves.png", "residual_reduction.png",
              "residual_sae/model.safetensors"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    red = m["held_out_test"]["residual_reduction"]
    assert set(red) == {"both"} | {f"{p}_only[{h}_ablation]" for p in ("linear", "interaction") for h in ("mean", "zero")}
    assert set(m["held_out_test"]["magnitude"]) == {f"{p}[{h}_ablation]" for p in ("linear", "interaction")
                                                    for h in ("mean", "zero")}
    assert red["both"] > 0                                     # beats predicting zero on held-out data
    assert m["held_out_test"]["sae_plus_nfm_fvu"] < m["held_out_test"]["sae_fvu"]
    ctl = m["held_out_test"]["controls"]
    assert list(ctl) == ["linear_from_x", "mlp_on_code", "mlp_from_x", "residual_sae"]
    assert ctl["residual_sae"]["params"] >= ctl["residual_sae"]["nfm_params"] == m["params"]["total"]
    for name in ("mlp_on_code", "mlp_from_x"):                 # parameter-matched to the NFM (within a hidden unit)
        assert abs(ctl[name]["params"] - m["params"]["total"]) <= 0.5 * (ctl[name]["params"] / ctl[name]["hidden"]), name
        assert (d / "controls" / name / "model.safetensors").is_file()
    for c in ctl.values():
        assert c["ci"][0] <= c["residual_reduction"] <= c["ci"][1]
    ev = m["held_out_test"]["integration_evidence"]
    assert ev["best_code_control"] == "mlp_on_code"
    assert abs(ev["gain"] - (red["both"] - ctl["mlp_on_code"]["residual_reduction"])) < 1e-9
    cfg = json.loads((d / "config.json").read_text())
    p1 = json.loads((pipeline / "p1" / "config.json").read_text())
    assert cfg["parents"]["sae"]["content_hash"] == p1["content_hash"]


def test_part3_outputs(pipeline):
    d = pipeline / "p3"
    for f in ("model.safetensors", "config.json", "metrics.json", "training_curves.png", "feature_density.png"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())["held_out_test"]
    assert 0 < m["fvu"] < 1 and m["l0"] <= 4 and 0 <= m["dead_fraction"] < 1
    assert "nfm_residual_reduction_with_secondary_reconstruction" in m
    assert abs(m["nfm_residual_reduction_intact"]
               - json.loads((pipeline / "p2" / "metrics.json").read_text())["held_out_test"]["residual_reduction"]["both"]) < 1e-6


def test_activation_files_without_any_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    f = torch.zeros(6000, 64).scatter(1, torch.randint(0, 64, (6000, 3), generator=g), torch.rand(6000, 3, generator=g) + 0.5)
    from common.data import save_activation_file
    save_activation_file(tmp_path / "acts.safetensors", (f @ D).half(), torch.arange(6000) // 20)
    common = ["--activations", str(tmp_path / "acts.safetensors"), "--epochs", "3"]
    run_script("part1_train_topk_sae.py", "--model", "/nonexistent/never/loaded", "--n-latents", "64", "--k", "4",
               "--out", str(tmp_path / "p1"), *common)
    run_script("part2_train_residual_nfm.py", "--sae", str(tmp_path / "p1"), "--nfm-dim", "8", "--out",
               str(tmp_path / "p2"), *common)
    m1 = json.loads((tmp_path / "p1" / "metrics.json").read_text())
    assert m1["data"]["source"] == "activation_file" and m1["held_out_test"]["fvu"] < 1
    assert (m1["data"]["train_tokens"], m1["data"]["val_tokens"]) == (5400, 600)   # every row; last 10% by document
    m2 = json.loads((tmp_path / "p2" / "metrics.json").read_text())
    assert "both" in m2["held_out_test"]["residual_reduction"]


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors(pipeline, tiny_demo, tmp_path):
    _one_line_error(run_script("part1_train_topk_sae.py", "--model", str(tmp_path / "nope"), "--out",
                               str(tmp_path / "x"), check=False), "--model", "no such folder")
    _one_line_error(run_script("part1_train_topk_sae.py", "--model", str(tiny_demo), "--dataset",
                               str(tiny_demo / "corpus.txt"), "--layer", "9", "--out", str(tmp_path / "x"),
                               "--cache-dir", "", check=False), "--layer 9", "out of range")
    # an NFM paired with an SAE other than the one it was trained on
    other = tmp_path / "other_sae"
    run_script("part1_train_topk_sae.py", "--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"),
               "--layer", "1", "--n-latents", "128", "--k", "8", "--train-tokens", "3000", "--val-tokens", "1000",
               "--epochs", "1", "--seed", "1", "--out", str(other), "--cache-dir", str(pipeline / "cache"))
    _one_line_error(run_script("part3_train_secondary_sae.py", "--nfm", str(pipeline / "p2"), "--sae", str(other),
                               "--out", str(tmp_path / "p3"), check=False), "was trained on the sae")
    # an activation file of the wrong width
    from common.data import save_activation_file
    save_activation_file(tmp_path / "wide.safetensors", torch.randn(500, 7))
    _one_line_error(run_script("part2_train_residual_nfm.py", "--sae", str(pipeline / "p1"), "--activations",
                               str(tmp_path / "wide.safetensors"), "--out", str(tmp_path / "p2"), check=False),
                    "width 7")
    _one_line_error(run_script("part1_train_topk_sae.py", "--activations", str(tmp_path / "wide.safetensors"),
                               "--n-latents", "4", "--k", "5", "--out", str(tmp_path / "x"), check=False), "--k 5")
    # a missing --sae folder
    _one_line_error(run_script("part2_train_residual_nfm.py", "--sae", str(tmp_path / "missing"), "--out",
                               str(tmp_path / "p2"), check=False), "--sae", "no such directory")
