"""torchrun / DDP (common/dist.py): 2 gloo processes on CPU end where 1 process with the same global batch ends.

Both runs take the same optimizer steps on the same global batches: each rank computes its half of every batch,
the FVU is normalised by the global batch's variance, and DDP averages the gradients. What can differ is float
summation order (per-rank partial sums, then the all-reduce), so weights and metrics are compared to 1e-5, not
bitwise (on this machine they came out bitwise equal for part1).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script, script_env


def _torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / script), *args], cwd=ROOT, env=script_env(threads=1), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{script} under torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    from common.data import save_activation_file
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6000, 96, generator=g).pow(6) @ torch.randn(96, 48, generator=g) + 0.05 * torch.randn(6000, 48, generator=g)
    path = tmp_path_factory.mktemp("ddp") / "acts.safetensors"
    save_activation_file(path, x, torch.arange(6000) // 40)
    return path


def _metrics(d: Path) -> dict:
    return json.loads((d / "metrics.json").read_text())


def _close_weights(a: Path, b: Path, tol: float) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        if ta[k].is_floating_point():
            err = (ta[k].double() - tb[k].double()).abs().max().item()
            assert err <= tol * max(1.0, ta[k].abs().max().item()), (k, err)
        else:
            assert torch.equal(ta[k], tb[k]), k          # the AuxK counters saw every rank's firing


def test_part1_and_part2_two_gloo_processes_match_one(acts, tmp_path):
    common = ["--activations", str(acts), "--batch-size", "256", "--steps", "40", "--eval-every", "10"]
    sae = ["--n-latents", "192", "--k", "12", "--dead-tokens", "2048", *common]   # AuxK active within 40 steps
    run_script("part1_train_topk_sae.py", *sae, "--out", str(tmp_path / "one"))
    proc = _torchrun("part1_train_topk_sae.py", *sae, "--out", str(tmp_path / "two"))
    assert proc.stdout.count("held-out: FVU") == 1                # rank 0 alone reports
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert m1["train"]["dead_fraction_at_end_of_training"] > 0   # AuxK was exercised
    assert abs(m1["held_out_test"]["fvu"] - m2["held_out_test"]["fvu"]) < 1e-5
    for r1, r2 in zip(m1["history"], m2["history"], strict=True):
        assert abs(r1["val_fvu"] - r2["val_fvu"]) < 1e-5
        assert abs(r1["train_fvu"] - r2["train_fvu"]) < 1e-5     # training logs reduced over ranks
    _close_weights(tmp_path / "one", tmp_path / "two", 1e-5)

    # part2 on that SAE: the NFM (Adam; dropout off so one process and two draw no different masks)
    nfm = ["--sae", str(tmp_path / "one"), "--nfm-dim", "8", "--dropout", "0", "--controls", "mlp_on_code,residual_sae",
           *common]
    run_script("part2_train_residual_nfm.py", *nfm, "--out", str(tmp_path / "nfm1"))
    _torchrun("part2_train_residual_nfm.py", *nfm, "--out", str(tmp_path / "nfm2"))
    h1, h2 = _metrics(tmp_path / "nfm1")["held_out_test"], _metrics(tmp_path / "nfm2")["held_out_test"]
    assert h1["residual_reduction"]["both"] > 0.01
    for key in h1["residual_reduction"]:
        assert abs(h1["residual_reduction"][key] - h2["residual_reduction"][key]) < 1e-4, key
    _close_weights(tmp_path / "nfm1", tmp_path / "nfm2", 1e-4)
    for name in ("mlp_on_code", "residual_sae"):
        b1, b2 = (_metrics(tmp_path / d)["held_out_test"]["controls"][name]["residual_reduction"] for d in ("nfm1", "nfm2"))
        assert abs(b1 - b2) < 1e-4, name


def test_part5_two_gloo_processes_match_one(acts, tmp_path):
    args = ["--activations", str(acts), "--n-latents", "128", "--k", "8", "--nfm-dim", "8", "--dropout", "0",
            "--batch-size", "256", "--steps", "30", "--eval-every", "10"]
    run_script("part5_joint_sae_nfm.py", *args, "--out", str(tmp_path / "one"))
    _torchrun("part5_joint_sae_nfm.py", *args, "--out", str(tmp_path / "two"))
    r1, r2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for name, v in r1["held_out_test"]["fvu"].items():
        assert abs(v - r2["held_out_test"]["fvu"][name]) < 1e-4, name
    assert abs(r1["comparisons"]["standalone_sae"]["fvu"] - r2["comparisons"]["standalone_sae"]["fvu"]) < 1e-4
    _close_weights(tmp_path / "one", tmp_path / "two", 1e-4)


def test_stages_without_ddp_refuse_torchrun(pipeline, tmp_path):
    env_extra = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env = dict(os.environ, **env_extra, TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "part7_gram_analysis.py"), "--sae", str(pipeline / "p1"),
                           "--out", str(tmp_path / "p7")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: this stage does not train under torchrun (only part1, part2 and part5 do); run it with python"]
    assert not (tmp_path / "p7").exists()


def test_batch_that_does_not_split_over_ranks_is_refused(acts, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "part1_train_topk_sae.py"), "--activations", str(acts), "--batch-size", "255",
                           "--steps", "2", "--out", str(tmp_path / "x")], cwd=ROOT, env=script_env(threads=1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: --batch-size 255 does not split over 2 processes; use a multiple of 2" in proc.stderr
    assert not (tmp_path / "x").exists()
