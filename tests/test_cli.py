"""Every flag of every script is documented; presets set defaults but explicit flags win."""
import importlib

import pytest

from common import cli

SCRIPTS = ["part1_train_topk_sae", "part2_train_residual_nfm", "part3_train_secondary_sae", "part4_nfm_inspector",
           "part5_joint_sae_nfm", "part6_kl_divergence", "part7_gram_analysis", "detect_conjunctions"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help_and_docstring_has_paper_command(name):
    mod = importlib.import_module(name)
    p = mod.build_parser()
    for action in p._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, f"{name}: {action.option_strings} lacks help"
    for flag in ("--out", "--seed", "--device", "--dtype", "--preset"):
        assert flag in p._option_string_actions, f"{name} lacks {flag}"
    if name != "part6_kl_divergence":                  # part6 splices into the LM, so it needs text, not a file
        assert "--activations" in p._option_string_actions, f"{name} lacks --activations"
    assert "--preset paper" in mod.__doc__
    stage = "detect" if name == "detect_conjunctions" else name.split("_")[0]
    cli.parse(mod.build_parser(), ["--preset", "paper"], stage=stage)   # every stage has its preset entry


def test_paper_preset_and_override():
    mod = importlib.import_module("part1_train_topk_sae")
    a = cli.parse(mod.build_parser(), ["--preset", "paper"])
    assert (a.model, a.layer, a.dataset, a.n_latents, a.k) == ("openlm-research/open_llama_3b", 16, "wikitext-103", 50_000, 1024)
    b = cli.parse(mod.build_parser(), ["--preset", "paper", "--layer", "12", "--k", "64"])
    assert (b.layer, b.k, b.n_latents) == (12, 64, 50_000)
    c = cli.parse(mod.build_parser(), [])
    assert (c.model, c.layer) == ("demo", 2)


def test_non_positive_sizes_rejected():
    mod = importlib.import_module("part1_train_topk_sae")
    with pytest.raises(cli.UserError, match="--train-tokens must be positive"):
        cli.parse(mod.build_parser(), ["--train-tokens", "0"])


def test_paper_preset_is_per_stage():
    p3 = importlib.import_module("part3_train_secondary_sae")
    a = cli.parse(p3.build_parser(), ["--preset", "paper"], stage="part3")
    assert (a.k, a.expansion) == (150, 25)
    p2 = importlib.import_module("part2_train_residual_nfm")
    b = cli.parse(p2.build_parser(), ["--preset", "paper"], stage="part2")
    assert (b.nfm_dim, b.train_tokens) == (300, 5_000_000)


def test_validation_script_flags_have_help():
    mod = importlib.import_module("validate_planted_interactions")
    for action in mod.build_parser()._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_unavailable_device_is_one_line_and_touches_no_output(tmp_path):
    from conftest import run_script
    out = tmp_path / "p1"
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": true}')
    proc = run_script("part1_train_topk_sae.py", "--device", "cuda", "--out", str(out), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --device cuda asked for, but torch sees no CUDA GPU; use --device cpu or install a CUDA build of torch"]
    assert [p.name for p in out.iterdir()] == ["metrics.json"] and (out / "metrics.json").read_text() == '{"keep": true}'
