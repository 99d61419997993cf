"""Shared fixtures: a tiny demo model built once per test session (same code path as the real demo)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent  # the project root
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer + corpus folder, built by common.demo with its test preset."""
    from common.demo import DemoConfig, ensure_demo_model

    return ensure_demo_model(tmp_path_factory.mktemp("demo") / "tiny", DemoConfig.tiny(), quiet=True)


@pytest.fixture(scope="session")
def tiny_lm(tiny_demo):
    from common.models import load_model

    model, tok, _ = load_model(str(tiny_demo), "float32", "cpu")
    return model, tok


def script_env(env_remove: tuple = (), threads: int = 2) -> dict:
    """The environment stage scripts run in under the tests: unbuffered, no progress bars, fixed thread count."""
    env = {k: v for k, v in os.environ.items() if k not in env_remove}
    env.update({"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)})
    return env


def run_script(script: str, *args: str, check: bool = True, env_remove: tuple = ()) -> subprocess.CompletedProcess:
    """Run a stage script as a subprocess (as a researcher would), from the project root."""
    env = script_env(env_remove)
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def pipeline(tiny_demo, tmp_path_factory):
    """part1 -> part2 -> part3 on the tiny demo with tiny settings (run once per session)."""
    out = tmp_path_factory.mktemp("pipe")
    data = ["--train-tokens", "12000", "--val-tokens", "3000", "--epochs", "2", "--cache-dir", str(out / "cache")]
    run_script("part1_train_topk_sae.py", "--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"),
               "--layer", "1", "--n-latents", "128", "--k", "8", "--out", str(out / "p1"), *data)
    run_script("part2_train_residual_nfm.py", "--sae", str(out / "p1"), "--nfm-dim", "16", "--out", str(out / "p2"), *data)
    run_script("part3_train_secondary_sae.py", "--nfm", str(out / "p2"), "--expansion", "4", "--k", "4",
               "--out", str(out / "p3"), *data)
    return out
