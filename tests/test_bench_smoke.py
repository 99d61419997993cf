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
