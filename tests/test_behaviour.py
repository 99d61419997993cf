"""part8 / part9 on the tiny demo, and the error-preserving clamp."""
import json

import pytest
import torch

from conftest import run_script


@pytest.fixture(scope="module")
def behaviour(pipeline):
    out = pipeline
    run_script("part8_stimulus_response.py", "--sae", str(out / "p1"), "--nfm", str(out / "p2"), "--secondary",
               str(out / "p3"), "--out", str(out / "p8"))
    run_script("part9_clamping_intervention.py", "--sae", str(out / "p1"), "--nfm", str(out / "p2"), "--secondary",
               str(out / "p3"), "--part8", str(out / "p8"), "--multipliers", "0", "1", "4", "8", "--n-prompts", "12",
               "--generate-tokens", "5", "--out", str(out / "p9"))
    return out


def test_part8_discovers_features_for_both_factors(behaviour):
    d = behaviour / "p8"
    for f in ("metrics.json", "primary_anova.csv", "secondary_anova.csv", "boxplots_features.png", "boxplots_nfm_outputs.png"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    for factor in ("formality", "emotion"):
        top = m["primary"]["top"][factor]
        assert top and top[0]["q"] < 0.05, (factor, top[:1])           # the demo factors are learned
    assert set(m["nfm_dimensions"]) >= {"combined_weight", "max_difference", "max_variance_of_cell_means"}
    assert isinstance(m["stimulus_warnings"], list)
    assert m["secondary"]["top_by_interaction_F"] and m["primary"]["counter_examples_lowest_overall_F"]
    for block in m["secondary"]["pair_attribution"]:
        for p in block["pairs"]:
            assert p["pair"][0] < p["pair"][1] and p["tokens_both_active"] >= 3


def test_part9_anova_per_multiplier_with_controls(behaviour):
    d = behaviour / "p9"
    for f in ("metrics.json", "anova.csv", "generations.txt", "interaction_lines.png", "cell_heatmap.png",
              "effect_by_multiplier.png", "word_scatter.png"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    target = m["conditions"]["target"]
    assert "mult=1" in target and "A:B" not in target["mult=1"] and target["mult=1"]["max_abs_logit_change"] == 0
    tested = [s for s in target if "A:B" in target[s]]
    assert len(tested) >= 2 or all(target[s]["max_abs_logit_change"] == 0 for s in target)
    for s in tested:
        r = target[s]
        assert 0 <= r["A:B"]["partial_eta_sq"] <= 1 and r["interaction_contrast"]["ci"][0] <= r["interaction_contrast"]["estimate"]
    assert set(m["conditions"]) == {"target", "random_feature_control", "linear_path_control"}
    assert m["control_feature"] != m["feature"]
    assert "greedy" in (d / "generations.txt").read_text()


def test_multiplier_one_and_no_clamp_reproduce_the_model_exactly(pipeline, tiny_lm):
    import part9_clamping_intervention as p9
    from common import checkpoint
    from common.nfm import NFM
    from common.sae import load_sae_checkpoint, load_secondary_checkpoint

    model, tok = tiny_lm
    sae, norm, _ = load_sae_checkpoint(pipeline / "p1")
    t, c = checkpoint.load(pipeline / "p2", "nfm", "--nfm")
    nfm = NFM.from_tensors(t, c["hparams"])
    sec, unorm, _ = load_secondary_checkpoint(pipeline / "p3")
    prompts = ["the weather is nice today and", "dear sir, I am writing to"]
    with torch.no_grad():
        plain = torch.stack([model(input_ids=torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]])).logits[0, -1]
                             for p in prompts])
    assert torch.equal(p9.run_prompts(model, tok, 1, prompts, None, False), plain)
    for kind, feat in (("secondary", 0), ("primary", 0)):
        one = p9.Clamp(sae, norm, nfm, sec, unorm, kind, feat, mult=1.0)
        assert torch.equal(p9.run_prompts(model, tok, 1, prompts, one, False), plain), kind
        # a real clamp of a firing feature changes the logits
        h = torch.randn(5, sae.cfg.d) * norm.scale
        idx, _ = sae.encode(norm.encode(h))
        strong = p9.Clamp(sae, norm, nfm, sec, unorm, "primary", int(idx[0, 0]), mult=5.0)
        assert strong.delta(h).abs().max() > 0


def test_part9_on_the_joint_model(pipeline, tiny_demo, tmp_path):
    """The joint model path: part5 + part3 --joint, then part9 --joint (feature given explicitly)."""
    out = pipeline
    data = ["--train-tokens", "12000", "--val-tokens", "3000", "--cache-dir", str(out / "cache")]
    run_script("part5_joint_sae_nfm.py", "--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"),
               "--layer", "1", "--n-latents", "128", "--k", "8", "--nfm-dim", "16", "--epochs", "1",
               "--baseline-sae", str(out / "p1"), "--out", str(tmp_path / "p5"), *data)
    run_script("part3_train_secondary_sae.py", "--joint", str(tmp_path / "p5"), "--expansion", "4", "--k", "4",
               "--epochs", "1", "--out", str(tmp_path / "p3j"), *data)
    run_script("part9_clamping_intervention.py", "--joint", str(tmp_path / "p5"), "--secondary", str(tmp_path / "p3j"),
               "--feature", "0", "--multipliers", "0", "1", "4", "--n-prompts", "8", "--generate-tokens", "0",
               "--out", str(tmp_path / "p9j"))
    m = json.loads((tmp_path / "p9j" / "metrics.json").read_text())
    assert m["model_path"].startswith("joint") and set(m["conditions"]["target"]) == {"mult=0", "mult=1", "mult=4"}
    wrong = run_script("part9_clamping_intervention.py", "--secondary", str(tmp_path / "p3j"), "--feature", "0",
                       "--sae", str(out / "p1"), "--nfm", str(out / "p2"), "--out", str(tmp_path / "x"), check=False)
    assert wrong.returncode == 2 and "not trained on a nfm model" in wrong.stderr


def test_generate_stimuli_without_key_is_one_line_and_writes_nothing(pipeline, tmp_path):
    target, out = tmp_path / "new.json", tmp_path / "p8"
    proc = run_script("part8_stimulus_response.py", "--sae", str(pipeline / "p1"), "--stimuli", str(target),
                      "--generate-stimuli", "formality x emotion", "--out", str(out), check=False,
                      env_remove=("ANTHROPIC_API_KEY",))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "ANTHROPIC_API_KEY" in proc.stderr
    assert not target.exists() and not out.exists()
