"""The bench scripts start (they are run by hand, never by the suite: timings need a quiet machine)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=300):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_roofline_quick():
    out = _run("bench/bench_roofline.py", "--quick")
    assert "GFLOP/s" in out and "share" in out


def test_peer_bench_help_does_not_install_anything():
    out = _run("bench/bench_sae_peers.py", "--help")
    assert "eai-sparsify" in out and "--quick" in out
    reqs = (ROOT / "bench" / "requirements-peers.txt").read_text()
    assert "eai-sparsify" in reqs and "sae-lens" in reqs
    runtime = (ROOT / "requirements.txt").read_text()
    assert "sparsify" not in runtime and "sae-lens" not in runtime and "sae_lens" not in runtime


def test_end_to_end_lists_the_readme_stages():
    out = _run("bench/bench_end_to_end.py", "--dry-run")
    assert "part1_train_topk_sae" in out and "part9_clamping_intervention" in out


@pytest.mark.parametrize("script", ["bench/bench_sparse_vs_dense.py", "bench/bench_collection.py",
                                    "bench/bench_cache.py", "bench/bench_auxk_recipes.py",
                                    "bench/part9_null_calibration.py", "bench/demo_seeds.py",
                                    "bench/bench_stream_memory.py"])
def test_other_benches_parse_their_arguments(script):
    assert "usage" in _run(script, "--help")


def test_demo_seeds_reruns_every_stage_per_seed_in_its_own_folders():
    out = _run("bench/demo_seeds.py", "--seeds", "3", "--dry-run")
    stages = [line for line in out.splitlines() if line.startswith(".venv/bin/python part")]
    assert len(stages) >= 11 and all(line.endswith("--seed 3") for line in stages)
    for line in stages:                                  # every stage folder moved; the shared LM and cache not
        outs = [w for w in line.split() if w.startswith("checkpoints/")]
        assert outs and all(w.startswith("checkpoints/seeds/seed3/") for w in outs), line


def test_stream_memory_bench_measures_each_stage_at_two_sizes(tmp_path):
    import json
    out = _run("bench/bench_stream_memory.py", "--rows", "1000", "--d", "8", "--n-latents", "32", "--k", "4",
               "--steps", "3", "--stages", "part1", "--work", str(tmp_path), "--json", str(tmp_path / "m.json"))
    m = json.loads((tmp_path / "m.json").read_text())
    by = m["stages"]["part1"]
    assert set(by) == {"1000", "4000", "ratio"} and by["1000"] > 50          # MB: a python process with torch
    assert abs(by["ratio"] - by["4000"] / by["1000"]) < 1e-12 and "peak RSS ratio" in out


def test_paper_rehearsal_runs_every_stage_with_the_paper_preset_at_tiny_size(tmp_path):
    """The rehearsal's smoke size: a tiny Llama and 2,048-entry tokenizer built by the bench, then every stage
    (part1 -> part9, detect, part3 --joint, part5 poly, interpret_features through the fake transport) under
    --preset paper with tiny dictionaries. Checks the commands stay valid as the stages' flags change."""
    import json
    out = _run("bench/paper_rehearsal.py", "--tiny", "--train-tokens", "1024", "--val-tokens", "512",
               "--work", str(tmp_path), timeout=900)
    m = json.loads((tmp_path / "tiny" / "rehearsal.json").read_text())
    names = ["part1", "part2", "detect", "part3", "part5", "part5_poly", "part3_joint", "part4", "part4_joint",
             "part6", "part7", "part8", "part9", "interpret"]
    assert list(m["stages"]) == names and all(s["rc"] == 0 for s in m["stages"].values()), out
    assert all(s["peak_rss_mb"] > 50 and s["seconds"] > 0 for s in m["stages"].values())
    cfg = json.loads((tmp_path / "tiny" / "model" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["vocab_size"] == 2048
    expl = json.loads((tmp_path / "tiny" / "interpret" / "explanations.json").read_text())
    assert {e["explanation"] for e in expl.values()} == {"Fires on a rehearsal token."}


def test_gpu_check_refuses_a_machine_without_cuda_in_one_line():
    """bench/gpu_check.sh on a CPU-only python: exit code 2, one line naming the problem, and RESULTS.md untouched
    (no GPU time is spent on a machine that cannot run it)."""
    import os
    import subprocess
    import sys
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sees no CUDA GPU" in lines[0]
    assert results.read_bytes() == before
