"""Lossless --resume: a killed run, resumed, ends bitwise where an uninterrupted run ends.

Why bitwise equality holds on CPU: the resumed process rebuilds everything before training from the same seed
and data, then loads every piece of state that training mutates (parameters and buffers, optimizer moments /
schedule-free z and weight sum, the step, torch/numpy/Python RNG states, the epoch permutation, the row
reached and the shuffling generator, the logs since the last evaluation, the history and the best state).
The same CPU kernels on the same thread count are deterministic, so every later step repeats exactly.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import cli
from common.train import TrainCheckpoints, fit
from conftest import ROOT, run_script, script_env

STEPS = 300


def _acts_file(tmp: Path) -> Path:
    from common.data import save_activation_file
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(96, 64, generator=g)
    codes = torch.rand(8000, 96, generator=g).pow(6)
    x = codes @ basis + 0.05 * torch.randn(8000, 64, generator=g)
    docs = torch.arange(8000) // 50
    path = tmp / "acts.safetensors"
    save_activation_file(path, x, docs)
    return path


def _part1_args(acts: Path, out: Path) -> list[str]:
    return ["--activations", str(acts), "--n-latents", "512", "--k", "16", "--batch-size", "512",
            "--steps", str(STEPS), "--eval-every", "25", "--checkpoint-every", "20", "--out", str(out),
            "--block-rows", "512", "--shuffle-blocks", "4"]    # 7,200 training rows: windows of 2,048 read from disk


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    acts = _acts_file(tmp)
    run_script("part1_train_topk_sae.py", *_part1_args(acts, tmp / "ref"))
    return acts, tmp / "ref"


def _start(args: list[str], script: str = "part1_train_topk_sae.py") -> subprocess.Popen:
    """Start a stage script in the background (to be killed partway)."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_state(proc: subprocess.Popen, folder: Path, min_step: int, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = [int(p.stem.split("-")[1]) for p in folder.glob("step-*.json")]
        if done and max(done) >= min_step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {min_step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("no training state appeared")


def _assert_same_run(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs by {(ta[k].double() - tb[k].double()).abs().max()}"
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    assert ma["history"] == mb["history"] and len(ma["history"]) == STEPS // 25
    assert ma["held_out_test"] == mb["held_out_test"]
    assert ma["train"]["best_step"] == mb["train"]["best_step"]


def test_sigkill_then_resume_is_bitwise_identical(reference):
    acts, ref = reference
    out = ref.parent / "killed"
    proc = _start(_part1_args(acts, out))
    _wait_for_state(proc, out / "train_state" / "sae", 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    states = sorted((out / "train_state" / "sae").glob("step-*.json"))
    assert not (out / "config.json").exists(), "the run finished before the kill; the test proves nothing"
    assert 1 <= len(states) <= 2, states                              # the last two are kept
    killed_at = int(states[-1].stem.split("-")[1])
    assert killed_at < STEPS

    proc = run_script("part1_train_topk_sae.py", *_part1_args(acts, out), "--resume")
    assert f"resuming train SAE at step {killed_at} of {STEPS}" in proc.stdout
    _assert_same_run(ref, out)
    assert not (out / "train_state").exists()                         # removed once the results are written
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed"] is True


def test_sigterm_saves_state_and_exits_130_then_resume_is_identical(reference):
    acts, ref = reference
    out = ref.parent / "terminated"
    proc = _start(_part1_args(acts, out))
    _wait_for_state(proc, out / "train_state" / "sae", 20)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: SIGTERM at step ") and "rerun the same command with --resume" in line
    step = int(line.split("at step ")[1].split(" ")[0])
    assert (out / "train_state" / "sae" / f"step-{step:08d}.json").is_file()   # saved at the signal, not only every N

    run_script("part1_train_topk_sae.py", *_part1_args(acts, out), "--resume")
    _assert_same_run(ref, out)


def test_resume_with_changed_flags_is_refused_unless_forced(reference, tmp_path):
    acts, _ = reference
    out = tmp_path / "run"
    (out / "train_state").mkdir(parents=True)
    args = cli.parse(__import__("part1_train_topk_sae").build_parser(), _part1_args(acts, out))
    (out / "train_state" / "run.json").write_text(json.dumps({"args": cli.run_args(args)}))
    before = (out / "train_state" / "run.json").read_text()
    proc = run_script("part1_train_topk_sae.py", *_part1_args(acts, out), "--resume", "--k", "8", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --resume with flags that differ from the interrupted run's (--k 16 -> 8); rerun with the original "
        "flags, or add --force to continue anyway (recorded in metrics.json)"]
    assert (out / "train_state" / "run.json").read_text() == before     # nothing touched
    forced = cli.parse(__import__("part1_train_topk_sae").build_parser(),
                       _part1_args(acts, out) + ["--resume", "--k", "8", "--force"])
    cli.prepare_out(out, forced)
    assert forced.resume_changed == {"k": [16, 8]}
    assert cli.resume_record(forced) == {"resumed": True, "resumed_with_changed_flags": {"k": [16, 8]}}


def test_resume_without_an_interrupted_run_is_refused(reference, tmp_path):
    acts, ref = reference
    proc = run_script("part1_train_topk_sae.py", *_part1_args(acts, ref), "--resume", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --resume: {ref} holds a finished run (no train_state/run.json); drop --resume to start a new "
        "run (with --overwrite)"]


# ---------------------------------------------------------------- in process: every trained model kind
class _Crash(Exception):
    pass


def _models():
    from common.joint import JointModel
    from common.nfm import NFM, NFMConfig
    from common.sae import SAEConfig, TopKSAE
    torch.manual_seed(0)
    x = torch.randn(600, 16)
    sae_cfg = SAEConfig(d=16, n_latents=64, k=4, dead_tokens=64)
    return {
        "sae-signsgd": (lambda: TopKSAE(sae_cfg), lambda m, i: m.loss(x[i]), "signsgd-sf"),
        "sae-adam": (lambda: TopKSAE(sae_cfg), lambda m, i: m.loss(x[i]), "adam"),
        # dropout draws from the global torch RNG: resuming must restore it
        "nfm-dropout": (lambda: NFM(NFMConfig(n_features=64, d=16, dim=8, hidden=8, dropout=0.3)),
                        lambda m, i: ((m(torch.arange(4).repeat(len(i), 1) + i[:, None] % 60,
                                         x[i, :4].abs()) - x[i]).pow(2).mean(), {}), "adam"),
        "joint": (lambda: JointModel(sae_cfg, NFMConfig(n_features=64, d=16, dim=8, hidden=8, dropout=0.2)),
                  lambda m, i: m.loss(x[i]), "adam"),
    }


@pytest.mark.parametrize("shuffle", [None, (64, 2)], ids=["in-memory", "windowed"])
@pytest.mark.parametrize("name", list(_models()))
def test_crash_and_resume_in_process_is_bitwise_identical(name, shuffle, tmp_path):
    """Also with the windowed order of rows read from disk (common/rows.py): 600 rows in windows of 128, the
    crash in the second epoch's order."""
    make, loss_fn, optimizer = _models()[name]

    def run(out: Path, resume: bool, crash_at: int | None):
        torch.manual_seed(1)
        model = make()
        calls = {"n": 0}

        def step_loss(idx):
            calls["n"] += 1
            if crash_at is not None and calls["n"] == crash_at:
                raise _Crash
            return loss_fn(model, idx)

        args = type("A", (), {"checkpoint_every": 4, "resume": resume, "seed": 0})()
        ckpt = TrainCheckpoints(out, args)
        res = fit(model, 600, 64, 30, 1e-2, step_loss, lambda: {"val_loss": float(step_loss(torch.arange(64))[0])},
                  eval_every=7, seed=3, desc="t", optimizer=optimizer, ckpt=ckpt, tag="m", shuffle=shuffle)
        return model, res

    ref_model, ref = run(tmp_path / "ref", False, None)
    with pytest.raises(_Crash):
        run(tmp_path / "crash", False, 19)        # 19th call: training step 17 (two evaluations came first)
    model, res = run(tmp_path / "crash", True, None)
    assert res.history == ref.history and res.best_step == ref.best_step
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_non_finite_loss_stops_names_the_step_and_keeps_the_last_good_state(tmp_path):
    model = torch.nn.Linear(2, 1)
    seen = {"n": 0}

    def step_loss(idx):
        seen["n"] += 1
        bad = seen["n"] == 7
        return model.weight.sum() * (float("nan") if bad else 1.0), {}

    args = type("A", (), {"checkpoint_every": 2, "resume": False, "seed": 0})()
    ckpt = TrainCheckpoints(tmp_path, args)
    with pytest.raises(cli.UserError) as e:
        fit(model, 8, 2, 20, 1e-2, step_loss, lambda: {"val_loss": 0.0}, eval_every=100, seed=0, desc="train X",
            ckpt=ckpt, tag="m")
    assert str(e.value) == (f"train X: the loss became nan at step 7 of 20; training stopped and the last good training "
                            f"state (step 6) is kept in {tmp_path / 'train_state' / 'm'}; lower --lr or check the "
                            f"activations for extreme values")
    assert sorted(p.name for p in (tmp_path / "train_state" / "m").glob("*.json")) == [
        "step-00000004.json", "step-00000006.json"]


def test_part2_killed_in_its_last_model_resumes_all_identically(reference, tmp_path):
    """part2 trains the NFM, then its controls (the residual-SAE control last): a kill during the last resumes
    it and reuses the finished ones from their final saved states (the ridge control is refitted: closed form)."""
    acts, ref_sae = reference
    args = ["--sae", str(ref_sae), "--activations", str(acts), "--nfm-dim", "16", "--batch-size", "256",
            "--steps", "150", "--eval-every", "30", "--checkpoint-every", "10"]
    run_script("part2_train_residual_nfm.py", *args, "--out", str(tmp_path / "ref"))
    out = tmp_path / "killed"
    proc = _start([*args, "--out", str(out)], "part2_train_residual_nfm.py")
    _wait_for_state(proc, out / "train_state" / "residual_sae", 20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    assert (out / "train_state" / "nfm" / "step-00000150.json").is_file()     # the finished NFM's final state
    resumed = run_script("part2_train_residual_nfm.py", *args, "--out", str(out), "--resume")
    assert "resuming train NFM at step 150 of 150" in resumed.stdout
    assert "resuming train residual SAE (control) at step" in resumed.stdout
    assert "resuming train mlp_on_code (control) at step 150 of 150" in resumed.stdout
    for sub in ("", "residual_sae", "controls/linear_from_x", "controls/mlp_on_code", "controls/mlp_from_x"):
        ta, tb = (load_file(str(d / sub / "model.safetensors")) for d in (tmp_path / "ref", out))
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (sub, k)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "ref", out))
    assert ma["held_out_test"] == mb["held_out_test"] and ma["history"] == mb["history"]
    assert ma["held_out_test"]["controls"] == mb["held_out_test"]["controls"]
