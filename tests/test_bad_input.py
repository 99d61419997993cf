"""Bad input, one test per case of the README's Troubleshooting table (issue 7, item 2).

Every case checks (a) exit status 2 (run as a subprocess, as a researcher would) or the UserError (called in
process, which is what `cli.run_main` turns into that exit), (b) the exact one-line message, which names the
problem and the fix, and (c) that nothing was written or deleted: every file under the input checkpoint folders
and activation files involved, and under a pre-existing --out folder holding an earlier run's results that the
failing command is pointed at WITH --overwrite (bad input is detected before anything is written), has the same
bytes afterwards. The session fixtures' folders are only read; anything corrupted is a copy in tmp_path.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from common import checkpoint, cli
from common.cli import UserError
from common.data import save_activation_file
from conftest import ROOT, run_script


def snapshot(*paths) -> dict:
    """{(root, path relative to it): sha256 of the bytes} for every file under each folder (or each file) given;
    a path that does not exist contributes nothing, so one that appears later shows up as a difference."""
    snap = {}
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            snap[(str(root), f.relative_to(root).as_posix() if f != root else ".")] = hashlib.sha256(f.read_bytes()).hexdigest()
    return snap


def fails(script: str, args, message, watch, subprocess: bool = False, env_remove: tuple = ()) -> str:
    """Run `script` with `args`; it must fail with exactly `message` (a str, or a compiled regex that must match
    all of it) on one line and leave every file under `watch` untouched. Returns the message."""
    args = [str(a) for a in args]
    before = snapshot(*watch)
    if subprocess:
        proc = run_script(script, *args, check=False, env_remove=env_remove)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert proc.stderr.rstrip().splitlines()[-1] == errors[0]         # the last thing printed
        got = errors[0].removeprefix("error: ")
    else:
        mod = importlib.import_module(script.removesuffix(".py"))
        with pytest.raises(UserError) as e:
            mod.main(args)
        got = str(e.value)
    assert "\n" not in got
    if isinstance(message, re.Pattern):
        assert message.fullmatch(got), got
    else:
        assert got == message
    assert snapshot(*watch) == before
    return got


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture
def earlier(pipeline, tmp_path) -> Path:
    """An --out folder holding an earlier run's results (a copy of the finished part1 run)."""
    return Path(shutil.copytree(pipeline / "p1", tmp_path / "earlier_run"))


@pytest.fixture(scope="module")
def acts(pipeline, tmp_path_factory) -> dict[str, Path]:
    """Activation files for the part1 SAE's width d: a good one and one per defect."""
    d = json.loads((pipeline / "p1" / "config.json").read_text())["hparams"]["d"]
    folder = tmp_path_factory.mktemp("acts")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, d, generator=g)
    nan, inf = x.clone(), x.clone()
    nan[5, 3] = float("nan")
    inf[7, 1] = float("inf")
    files = {"good": x, "wide": torch.randn(600, d + 1, generator=g),
             "int32": torch.randint(0, 5, (600, d), dtype=torch.int32), "float64": x.double(), "nan": nan, "inf": inf}
    for name, t in files.items():
        save_activation_file(folder / f"{name}.safetensors", t)
    return {name: folder / f"{name}.safetensors" for name in files}


@pytest.fixture(scope="module")
def other_models(pipeline, tmp_path_factory) -> dict[str, Path]:
    """Another SAE (p1 re-saved with a perturbed W_dec) and another NFM (p2 with a perturbed V, same parents):
    complete, valid checkpoints whose content hashes differ from those their children record."""
    from safetensors.torch import load_file
    folder = tmp_path_factory.mktemp("others")
    out = {}
    for src, name, kind, tensor in (("p1", "sae2", "sae", "W_dec"), ("p2", "nfm2", "nfm", "V")):
        dst = Path(shutil.copytree(pipeline / src, folder / name))
        t = load_file(str(dst / "model.safetensors"))
        t[tensor] = t[tensor] + 1e-3
        cfg = {k: v for k, v in json.loads((dst / "config.json").read_text()).items() if k not in ("kind", "content_hash")}
        checkpoint.save(dst, kind, t, cfg)
        out[name] = dst
    return out


def _hash(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["content_hash"]


def _n_latents(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["hparams"]["n_latents"]


# ---------------------------------------------------------------------------------- 1. checkpoint folders

def test_missing_checkpoint_folder(pipeline, acts, earlier, tmp_path):
    missing = tmp_path / "no_such_sae"
    fails("part2_train_residual_nfm.py", ["--sae", missing, "--activations", acts["good"], "--out", earlier, "--overwrite"],
          f"--sae {missing}: no such directory; pass the --out folder of the stage that trained it",
          [earlier, acts["good"], missing], subprocess=True)
    assert not missing.exists()


@pytest.mark.parametrize("defect", ["truncated", "random-bytes"])
def test_corrupt_checkpoint(pipeline, acts, earlier, tmp_path, defect):
    bad = Path(shutil.copytree(pipeline / "p1", tmp_path / "bad_sae"))
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if defect == "truncated" else torch.randint(0, 256, (5000,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(1)).numpy().tobytes())
    fails("part2_train_residual_nfm.py", ["--sae", bad, "--activations", acts["good"], "--out", earlier, "--overwrite"],
          re.compile(re.escape(f"--sae {bad}: model.safetensors cannot be read (") + r"[^()]+"
                     + re.escape("); the checkpoint is corrupt, retrain it")),
          [bad, earlier, acts["good"]])


# ------------------------------------------------------------------------------------------ 2. wrong kind

@pytest.mark.parametrize("script", ["part2_train_residual_nfm.py", "part6_kl_divergence.py"])
def test_wrong_kind_nfm_passed_as_sae(pipeline, acts, earlier, script):
    nfm = pipeline / "p2"
    extra = ["--activations", acts["good"]] if script.startswith("part2") else ["--nfm", nfm, "--joint", ""]
    fails(script, ["--sae", nfm, *extra, "--out", earlier, "--overwrite"],
          f"--sae {nfm} holds a 'nfm' checkpoint, not a 'sae'; pass the right folder",
          [nfm, earlier, acts["good"]])


# ------------------------------------------------------------------------------------- 3. mismatched parent

def test_mismatched_parent_nfm_with_another_sae(pipeline, acts, other_models, earlier):
    p2, sae2 = pipeline / "p2", other_models["sae2"]
    want = json.loads((p2 / "config.json").read_text())["parents"]["sae"]
    fails("part3_train_secondary_sae.py", ["--nfm", p2, "--sae", sae2, "--activations", acts["good"],
                                           "--out", earlier, "--overwrite"],
          f"--nfm {p2.resolve()} was trained on the sae at {want['path']} (hash {want['content_hash'][:12]}), but "
          f"--sae {sae2.resolve()} has hash {_hash(sae2)[:12]}; pass the sae it was trained on",
          [p2, sae2, pipeline / "p1", earlier, acts["good"]])


@pytest.mark.parametrize("script", ["part8_stimulus_response.py", "part9_clamping_intervention.py"])
def test_mismatched_parent_secondary_with_another_nfm(pipeline, other_models, earlier, script):
    p1, p3, nfm2 = pipeline / "p1", pipeline / "p3", other_models["nfm2"]
    want = json.loads((p3 / "config.json").read_text())["parents"]["nfm"]
    extra = ["--feature", "0"] if script.startswith("part9") else []
    fails(script, ["--sae", p1, "--nfm", nfm2, "--secondary", p3, *extra, "--out", earlier, "--overwrite"],
          f"--secondary {p3.resolve()} was trained on the nfm at {want['path']} (hash {want['content_hash'][:12]}), "
          f"but --nfm {nfm2.resolve()} has hash {_hash(nfm2)[:12]}; pass the nfm it was trained on",
          [p1, p3, nfm2, earlier])


# ------------------------------------------------------------------------------------------- 4. layer

def test_layer_out_of_range(tiny_demo, earlier, tmp_path):
    cache = tmp_path / "cache"
    fails("part1_train_topk_sae.py", ["--model", tiny_demo, "--layer", "99", "--dataset", tiny_demo / "corpus.txt",
                                      "--cache-dir", cache, "--out", earlier, "--overwrite"],
          "--layer 99 is out of range: the model has 2 decoder blocks, so layer must be in 1..2 "
          "(layer L = residual after L blocks)",
          [tiny_demo, earlier, cache], subprocess=True)
    assert not cache.exists()                      # refused before any activation was collected


# --------------------------------------------------------------------------------------- 5. activation files

@pytest.mark.parametrize("defect", ["wide", "int32", "float64", "nan", "inf"])
def test_bad_activation_file(pipeline, acts, earlier, defect):
    f = acts[defect]
    expected = {
        "wide": f"--activations {f}: activations have width 65, but the model expects d=64; pass activations from "
                f"the same layer and model",
        "int32": f"--activations {f}: 'activations' has dtype int32; save it as float16, bfloat16 or float32",
        "float64": f"--activations {f}: 'activations' has dtype float64; save it as float16, bfloat16 or float32",
        "nan": f"--activations {f}: 'activations' contains nan at row 5, column 3 (the first non-finite value); "
               f"remove or fix the rows with NaN or inf",
        "inf": f"--activations {f}: 'activations' contains inf at row 7, column 1 (the first non-finite value); "
               f"remove or fix the rows with NaN or inf",
    }[defect]
    fails("part2_train_residual_nfm.py", ["--sae", pipeline / "p1", "--activations", f, "--out", earlier, "--overwrite"],
          expected, [pipeline / "p1", f, earlier])


# -------------------------------------------------------------------------------------- 6-7. text sources

def test_unknown_dataset(tiny_demo, earlier, tmp_path):
    cache = tmp_path / "cache"
    fails("part1_train_topk_sae.py", ["--model", tiny_demo, "--dataset", "no-such-dataset", "--cache-dir", cache,
                                      "--out", earlier, "--overwrite"],
          "unknown --dataset 'no-such-dataset': use wikitext-103, wikitext-2, demo, or a path to a .txt file or "
          "folder of .txt files",
          [tiny_demo, earlier, cache], subprocess=True)
    assert not cache.exists()


@pytest.mark.parametrize("source", ["empty-file", "blank-folder", "folder-without-txt"])
def test_empty_text_source(tiny_demo, earlier, tmp_path, source):
    if source == "empty-file":
        text = tmp_path / "empty.txt"
        text.write_text("")
        expected = f"--dataset {text}: the text is empty (1 .txt file, blank lines only); pass a text source whose " \
                   f"documents are separated by blank lines"
    elif source == "blank-folder":
        text = tmp_path / "blank"
        text.mkdir()
        (text / "a.txt").write_text("\n\n   \n\n")
        (text / "b.txt").write_text("")
        expected = f"--dataset {text}: the text is empty (2 .txt files, blank lines only); pass a text source whose " \
                   f"documents are separated by blank lines"
    else:
        text = tmp_path / "notxt"
        text.mkdir()
        (text / "a.md").write_text("some text\n")
        expected = f"--dataset {text}: the folder holds no .txt files; pass a .txt file or a folder of them"
    cache = tmp_path / "cache"
    fails("part1_train_topk_sae.py", ["--model", tiny_demo, "--dataset", text, "--cache-dir", cache,
                                      "--out", earlier, "--overwrite"],
          expected, [tiny_demo, text, earlier, cache], subprocess=source == "empty-file")
    assert not cache.exists()


# ------------------------------------------------------------------------------------------- 8. sizes

@pytest.mark.parametrize("flags,expected", [
    (["--n-latents", "8", "--k", "16"], "--k 16 exceeds --n-latents 8; choose k <= n_latents"),
    (["--n-latents", "0"], "--n-latents must be positive, got 0"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
], ids=["k-over-n-latents", "n-latents-0", "batch-size-0"])
def test_bad_sizes(acts, earlier, flags, expected):
    fails("part1_train_topk_sae.py", ["--activations", acts["good"], *flags, "--out", earlier, "--overwrite"],
          expected, [acts["good"], earlier])


def test_k_over_n_latents_is_refused_before_collection(tiny_demo, earlier, tmp_path):
    cache = tmp_path / "cache"
    fails("part1_train_topk_sae.py", ["--model", tiny_demo, "--dataset", tiny_demo / "corpus.txt", "--n-latents", "8",
                                      "--k", "16", "--cache-dir", cache, "--out", earlier, "--overwrite"],
          "--k 16 exceeds --n-latents 8; choose k <= n_latents", [tiny_demo, earlier, cache])
    assert not cache.exists()


def test_non_positive_top_in_part8(pipeline, earlier):
    fails("part8_stimulus_response.py", ["--sae", pipeline / "p1", "--nfm", pipeline / "p2", "--secondary", pipeline / "p3",
                                         "--top", "0", "--out", earlier, "--overwrite"],
          "--top must be positive, got 0", [pipeline / "p1", pipeline / "p2", pipeline / "p3", earlier])


# ------------------------------------------------------------------------------ 9. --resume with new flags

def test_resume_with_changed_flags_message(acts, tmp_path):
    """The full behaviour (a real interrupted run) is tests/test_resume.py::
    test_resume_with_changed_flags_is_refused_unless_forced; this pins the message of the table."""
    import part1_train_topk_sae as part1
    run = tmp_path / "interrupted"
    argv = ["--activations", str(acts["good"]), "--n-latents", "32", "--k", "4", "--out", str(run)]
    saved = cli.parse(part1.build_parser(), argv + ["--lr", "0.001"])
    (run / "train_state").mkdir(parents=True)
    (run / "train_state" / "run.json").write_text(json.dumps({"args": cli.run_args(saved)}, default=str))
    fails("part1_train_topk_sae.py", argv + ["--lr", "0.002", "--resume"],
          "--resume with flags that differ from the interrupted run's (--lr 0.001 -> 0.002); rerun with the original "
          "flags, or add --force to continue anyway (recorded in metrics.json)",
          [run, acts["good"]])


# ------------------------------------------------------------------------------ 10. --out holding a run

@pytest.mark.parametrize("script", ["part1_train_topk_sae.py", "part7_gram_analysis.py", "part4_nfm_inspector.py"])
def test_out_folder_holding_a_run_without_overwrite(pipeline, acts, earlier, script):
    args, watch = {"part1_train_topk_sae.py": (["--activations", acts["good"]], [acts["good"]]),
                   "part7_gram_analysis.py": (["--sae", pipeline / "p1", "--joint", ""], [pipeline / "p1"]),
                   "part4_nfm_inspector.py": (["--nfm", pipeline / "p2"], [pipeline / "p2"])}[script]
    resume = ", --resume to continue it" if script.startswith("part1") else ""
    fails(script, [*args, "--out", earlier],
          f"--out {earlier} already holds a run (config.json); pass --overwrite to replace it{resume}, or choose "
          f"another --out",
          [earlier, *watch], subprocess=script.startswith("part1"))


# ----------------------------------------------------------------------------------- 11. stimulus JSON

@pytest.mark.parametrize("defect", ["invalid-json", "missing-cells", "missing-cell"])
def test_malformed_stimulus_json(pipeline, earlier, tmp_path, defect):
    stim = tmp_path / "bad.json"
    if defect == "invalid-json":
        text = '{"name": "x", "factors": {'
        stim.write_text(text)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            expected = (f"{stim}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the syntax there "
                        f"(python -m json.tool {stim} shows it)")
    else:
        obj = json.loads((ROOT / "stimuli" / "demo_formality_emotion.json").read_text())
        if defect == "missing-cells":
            del obj["cells"]
            expected = f'{stim}: missing "cells"; add it at the top level (see the format in stimuli/README.md)'
        else:
            del obj["cells"]["casual|neutral"]
            expected = (f"{stim}: missing cell 'casual|neutral'; \"cells\" needs exactly the keys ['formal|emotional', "
                        f"'formal|neutral', 'casual|emotional', 'casual|neutral'] (\"<levelA>|<levelB>\" with the levels "
                        f"of \"factors\")")
        stim.write_text(json.dumps(obj))
    p = pipeline
    fails("part8_stimulus_response.py", ["--sae", p / "p1", "--nfm", p / "p2", "--secondary", p / "p3", "--stimuli", stim,
                                         "--out", earlier, "--overwrite"],
          expected, [p / "p1", p / "p2", p / "p3", stim, earlier], subprocess=defect == "invalid-json")


# ---------------------------------------------------------------------------------- 12. word buckets

def test_bucket_word_not_a_single_token(pipeline, earlier, tmp_path):
    obj = json.loads((ROOT / "stimuli" / "demo_word_buckets.json").read_text())
    obj["buckets"]["formal|emotional"] = ["zzqxjvbw"]          # several tokens in the tiny demo's BPE vocabulary
    buckets = tmp_path / "buckets.json"
    buckets.write_text(json.dumps(obj))
    p = pipeline
    fails("part9_clamping_intervention.py", ["--sae", p / "p1", "--nfm", p / "p2", "--secondary", p / "p3", "--feature", "0",
                                             "--buckets", buckets, "--multi-token", "exclude", "--out", earlier, "--overwrite"],
          f"{buckets}: bucket 'formal|emotional' has no usable token left (words ['zzqxjvbw']: multi-token, unknown or "
          f"shared with another bucket); add single-token words or use multi_token='first' (--multi-token first)",
          [p / "p1", p / "p2", p / "p3", buckets, earlier])


# ---------------------------------------------------------------------------------- 13. feature index

def test_feature_out_of_range_part9(pipeline, earlier):
    p, n = pipeline, _n_latents(pipeline / "p3")
    fails("part9_clamping_intervention.py", ["--sae", p / "p1", "--nfm", p / "p2", "--secondary", p / "p3",
                                             "--feature", "9999", "--out", earlier, "--overwrite"],
          f"--feature 9999 is out of range: the secondary SAE has {n} latents (0..{n - 1}); pass a feature in that range",
          [p / "p1", p / "p2", p / "p3", earlier])


def test_feature_out_of_range_part4(pipeline, earlier):
    n = _n_latents(pipeline / "p1")
    fails("part4_nfm_inspector.py", ["--nfm", pipeline / "p2", "--feature", "-1", "--out", earlier, "--overwrite"],
          f"--feature -1 is out of range: the SAE has {n} latents (0..{n - 1}); pass a feature in that range",
          [pipeline / "p1", pipeline / "p2", earlier])


# ----------------------------------------------------------------------------------- 14. API key

KEY_MESSAGE = ("ANTHROPIC_API_KEY is not set; export it (the key is read from the environment only) or run without "
               "the Claude step")


def test_missing_api_key_interpret(pipeline, earlier):
    fails("interpret_features.py", ["--sae", pipeline / "p1", "--features", "0", "--out", earlier, "--overwrite"],
          KEY_MESSAGE, [pipeline / "p1", earlier], subprocess=True, env_remove=("ANTHROPIC_API_KEY",))


def test_missing_api_key_generate_stimuli(pipeline, earlier, tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    new = tmp_path / "new_stimuli.json"
    fails("part8_stimulus_response.py", ["--sae", pipeline / "p1", "--generate-stimuli", "formality x emotion",
                                         "--stimuli", new, "--out", earlier, "--overwrite"],
          KEY_MESSAGE, [pipeline / "p1", earlier, new])
    assert not new.exists()


# ------------------------------------------------------------------------------------------ 15. device

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_unavailable_device(pipeline, acts, earlier):
    fails("part2_train_residual_nfm.py", ["--sae", pipeline / "p1", "--activations", acts["good"], "--device", "cuda",
                                          "--out", earlier, "--overwrite"],
          "--device cuda asked for, but torch sees no CUDA GPU; use --device cpu or install a CUDA build of torch",
          [pipeline / "p1", acts["good"], earlier], subprocess=True)


# -------------------------------------------------------------------------------------- 16. NaN loss

def test_non_finite_loss_stops_and_keeps_the_last_good_state(acts, earlier):
    before = snapshot(earlier, acts["good"])
    state = earlier / "train_state" / "sae"
    proc = run_script("part1_train_topk_sae.py", "--activations", str(acts["good"]), "--n-latents", "32", "--k", "4",
                      "--batch-size", "64", "--lr", "1e30", "--checkpoint-every", "1", "--out", str(earlier),
                      "--overwrite", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    steps = int(6 * 540 / 64)                        # 6 epochs of the 540 training rows (600 minus the held-out 10%)
    m = re.fullmatch(r"error: train SAE: the loss became (nan|inf|-inf) at step (\d+) of " + str(steps)
                     + r"; training stopped and the last good training state \(step (\d+)\) is kept in "
                     + re.escape(str(state)) + r"; lower --lr or check the activations for extreme values", errors[0])
    assert m, errors[0]
    bad_step, kept = int(m.group(2)), int(m.group(3))
    assert kept == bad_step - 1 >= 1                 # --checkpoint-every 1: the step before the bad one was saved
    assert (state / f"step-{kept:08d}.json").is_file() and (state / f"step-{kept:08d}.safetensors").is_file()
    after = snapshot(earlier, acts["good"])
    assert {k: v for k, v in after.items() if not k[1].startswith("train_state/")} == before   # results untouched


# ------------------------------------------------------------------------- 14. issue 12: provenance

def test_part9_refuses_a_part8_run_on_other_models(pipeline, earlier, tmp_path):
    """part9 takes its default feature only from a part8 run on the very secondary SAE it clamps."""
    p = pipeline
    other = tmp_path / "part8_elsewhere"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"models": {"path": "sequential", "secondary": {
        "path": "/elsewhere/p3", "content_hash": "0" * 64, "kind": "secondary_sae"}}}))
    fails("part9_clamping_intervention.py", ["--sae", p / "p1", "--nfm", p / "p2", "--secondary", p / "p3",
                                             "--part8", other, "--out", earlier, "--overwrite"],
          re.compile(re.escape(f"--part8 {other} picked its features on the sequential model path with secondary "
                               f"/elsewhere/p3 (hash 000000000000), but here the secondary is ")
                     + r".*p3 \(hash [0-9a-f]{12}\); run part8 on these models or pass --feature N"),
          [p / "p1", p / "p2", p / "p3", other, earlier])


def test_an_nfm_without_path_means_is_refused(pipeline, earlier, tmp_path):
    """An NFM checkpoint written before mean-ablation holds no path means: a one-line error, not a state-dict
    traceback (and never a silent zero-ablation)."""
    from safetensors.torch import load_file, save_file
    old = Path(shutil.copytree(pipeline / "p2", tmp_path / "old_nfm"))
    tensors = {k: v for k, v in load_file(str(old / "model.safetensors")).items()
               if k not in ("linear_mean", "interaction_mean", "mean_tokens")}
    save_file(tensors, str(old / "model.safetensors"))
    cfg = json.loads((old / "config.json").read_text())
    cfg["content_hash"] = checkpoint.file_hash(old / "model.safetensors")
    (old / "config.json").write_text(json.dumps(cfg))
    fails("part4_nfm_inspector.py", ["--nfm", old, "--out", earlier, "--overwrite"],
          "this NFM checkpoint predates mean-ablation (it holds no path means); retrain it with part2 (or part5 for "
          "a joint model)", [old, pipeline / "p1", earlier])
