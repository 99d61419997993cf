"""No result depends on machine speed: the same seed on the same machine gives byte-identical checkpoints.

Two runs of part1 -> part2 -> part3 on the tiny demo with the same seed, into two different folders (each with
its own activation cache, so the LM forward is repeated too), and two tiny demo LM builds with the same config,
are compared file by file. The first run is the session's `pipeline` fixture (conftest.py), so the suite pays
for one extra run only."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import pytest

from common import demo
from common.demo import DemoConfig, build_demo_model
from conftest import run_script

STAGES = ("p1", "p2", "p2/residual_sae", "p3")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_runs(pipeline, tiny_demo, tmp_path_factory):
    """conftest.pipeline's folder and a second run with exactly its settings (keep the two in step: a
    difference in flags shows up below as a config.json difference) and seed 0, in another folder."""
    root = tmp_path_factory.mktemp("determinism")
    data = ["--train-tokens", "12000", "--val-tokens", "3000", "--epochs", "2", "--cache-dir", str(root / "cache"),
            "--seed", "0"]
    run_script("part1_train_topk_sae.py", "--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"),
               "--layer", "1", "--n-latents", "128", "--k", "8", "--out", str(root / "p1"), *data)
    run_script("part2_train_residual_nfm.py", "--sae", str(root / "p1"), "--nfm-dim", "16", "--out", str(root / "p2"),
               *data)
    run_script("part3_train_secondary_sae.py", "--nfm", str(root / "p2"), "--expansion", "4", "--k", "4",
               "--out", str(root / "p3"), *data)
    return [pipeline, root]


def _without_timing(obj):
    """metrics.json minus its wall-clock fields (information only)."""
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


@pytest.mark.parametrize("stage", STAGES)
def test_same_seed_gives_byte_identical_weights(two_runs, stage):
    a, b = (root / stage / "model.safetensors" for root in two_runs)
    assert _sha(a) == _sha(b), f"{stage}: model.safetensors differs between two runs with the same seed"


@pytest.mark.parametrize("stage", STAGES)
def test_config_names_only_parents_and_is_identical_up_to_their_folder(two_runs, stage):
    texts = [(root / stage / "config.json").read_text() for root in two_runs]
    for root, text in zip(two_runs, texts):
        assert f'"{root / stage}"' not in text, f"{stage}/config.json names its own output folder"
    # The only paths a config holds are its parents' --out folders; with each run's root replaced they agree.
    normalised = [text.replace(str(root), "<RUN>") for root, text in zip(two_runs, texts)]
    assert normalised[0] == normalised[1]
    assert json.loads(texts[0])["content_hash"] == _sha(two_runs[0] / stage / "model.safetensors")


@pytest.mark.parametrize("stage", ("p1", "p2", "p3"))
def test_same_seed_gives_identical_metrics(two_runs, stage):
    m = [_without_timing(json.loads((root / stage / "metrics.json").read_text().replace(str(root), "<RUN>")))
         for root in two_runs]
    assert m[0] == m[1]



@pytest.mark.parametrize("stage", ("p1", "p2", "p3"))
def test_same_seed_gives_byte_identical_figures(two_runs, stage):
    names = [sorted(p.name for p in (root / stage).glob("*.png")) for root in two_runs]
    assert names[0] == names[1] and names[0]
    for name in names[0]:
        assert (two_runs[0] / stage / name).read_bytes() == (two_runs[1] / stage / name).read_bytes(), name

# ------------------------------------------------------------------------------------------ demo LM build

@pytest.fixture(scope="module")
def two_tiny_builds(tiny_demo, tmp_path_factory):
    """The session's tiny build (conftest.tiny_demo, built by build_demo_model at the tests' thread count) and a
    second build_demo_model call with the same config, made while the caller asks for another thread count."""
    import torch

    b = tmp_path_factory.mktemp("demo_build") / "lm"
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        second = build_demo_model(b, DemoConfig.tiny(), quiet=True)
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert threads_after == (1 if before > 1 else 2)            # the build restores the caller's setting
    return [tiny_demo, b], [demo.read_build_info(tiny_demo), second]


def test_two_tiny_builds_are_byte_identical(two_tiny_builds):
    """Also at another caller thread count: DemoConfig.threads fixes the build's (1 and 2 threads gave
    different weights before)."""
    (a, b), _ = two_tiny_builds
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json", "corpus.txt", demo.BUILD_FILE} <= set(names)
    for name in names:
        if name != demo.BUILD_FILE:            # demo_build.json records wall time, as information
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_build_info_differs_only_in_wall_time(two_tiny_builds):
    (a, b), infos = two_tiny_builds
    assert demo.read_build_info(b) == infos[1]
    timing = {"train_seconds", "wall_seconds"}
    assert {k: v for k, v in infos[0].items() if k not in timing} == {k: v for k, v in infos[1].items() if k not in timing}


def test_a_build_cannot_stop_early(two_tiny_builds):
    _, infos = two_tiny_builds
    cfg = asdict(DemoConfig.tiny())
    for info in infos:
        assert info["steps_done"] == cfg["steps"] == info["config"]["steps"]
        assert info["train_tokens"] == cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]
        assert not any("cap" in k or "max_train" in k for k in (*info, *info["config"]))   # no wall-clock stop
    assert not any("seconds" in k for k in cfg)   # nothing timed is part of the config ensure_demo_model compares
