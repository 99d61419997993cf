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
               "--null-features", "5", "--generate-tokens", "5", "--out", str(out / "p9"))
    return out


def test_part8_discovers_features_for_both_factors(behaviour):
    d = behaviour / "p8"
    for f in ("metrics.json", "primary_anova.csv", "secondary_anova.csv", "boxplots_features.png", "boxplots_nfm_outputs.png"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    for factor in ("formality", "emotion"):
        top = m["primary"]["top"][factor]
        assert top and top[0]["q"] < 0.05 and top[0]["q_perm"] < 0.05, (factor, top[:1])   # the demo factors are learned
        conf = m["primary"]["held_out_confirmation"]["A" if factor == "formality" else "B"]
        assert conf and conf[0]["feature"] == top[0]["feature"] and conf[0]["p_perm"] < 0.05   # and hold on the test half
    assert set(m["nfm_dimensions"]) >= {"combined_weight", "max_difference", "max_variance_of_cell_means"}
    assert isinstance(m["stimulus_warnings"], list)
    assert m["secondary"]["top_by_interaction_F"] and m["primary"]["counter_examples_lowest_overall_F"]
    for block in m["secondary"]["pair_attribution"]:
        for p in block["pairs"]:
            assert p["pair"][0] < p["pair"][1] and p["tokens_both_active"] >= 3
    # the demo set declares its matched topics: labels are permuted within them, and the design stays balanced
    assert m["blocking_factor"] == "topic" and m["balanced_within_blocks"]
    assert m["n_permutations"] >= m["primary"]["n_active_features"] / 0.05
    assert m["models"]["path"] == "sequential" and len(m["models"]["secondary"]["content_hash"]) == 64


def test_part8_selects_on_one_half_and_part9_tests_on_the_other(behaviour):
    """No double dipping: part8's selection half and part9's prompts (the test half) share no sentence, and
    both metrics files record the same split."""
    from common.stimuli import load_stimuli
    m8 = json.loads((behaviour / "p8" / "metrics.json").read_text())
    m9 = json.loads((behaviour / "p9" / "metrics.json").read_text())
    split = m8["stimulus_split"]
    assert split == m9["prompts"]["stimulus_split"] and m9["prompts"]["half"] == "test"
    stim = load_stimuli(m8["stimuli"])
    for key in stim.cell_keys():
        cell = "|".join(key)
        sel, test = set(split["selection"][cell]), set(split["test"][cell])
        assert not sel & test and sel | test == set(range(len(stim.cells[key])))
    selected = {stim.cells[k][i] for k in stim.cell_keys() for i in split["selection"]["|".join(k)]}
    from common.stimuli import load_stimuli as _load
    _, test_half, _ = _load(m9["prompts"]["stimuli"]).halves()
    prompts = [s for k in test_half.cell_keys() for s in test_half.cells[k][:m9["prompts"]["per_cell"]]]
    assert len(prompts) == m9["n_prompts"] and not set(prompts) & selected
    assert m9["feature"] == m8["secondary"]["top_by_interaction_F"][0]["feature"]


def test_part9_words_by_prompts_tests_with_null_features(behaviour):
    d = behaviour / "p9"
    for f in ("metrics.json", "anova.csv", "null_features.csv", "generations.txt", "interaction_lines.png",
              "cell_heatmap.png", "effect_by_multiplier.png", "word_scatter.png"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    target = m["conditions"]["target"]
    assert "mult=1" in target and "A:B" not in target["mult=1"] and target["mult=1"]["max_abs_logit_change"] == 0
    tested = [s for s in target if "A:B" in target[s]]
    assert len(tested) >= 2 or all(target[s]["max_abs_logit_change"] == 0 for s in target)
    for s in tested:
        for e in ("A", "B", "A:B"):
            r = target[s][e]
            assert r["p"] == max(r["by_word"]["p"], r["by_prompt"]["p"], r["min_F_prime"]["p"])
            assert r["by_word"]["df"] == [1, m["n_words"] - 4] and r["by_prompt"]["df"] == [1, m["n_prompts"] - 1]
            assert r["ci"][0] <= r["estimate"] <= r["ci"][1] and r["F"] <= min(r["by_word"]["F"], r["by_prompt"]["F"]) + 1e-9
    assert set(m["conditions"]) == {"target", "linear_path_control"}
    nulls = m["null_features"]
    assert len(nulls["features"]) == 5 and m["feature"] not in nulls["features"]
    for s in tested:
        spec = nulls["specificity"][s]
        assert spec["n_null"] == 5 and 1 / 6 <= spec["empirical_p"] <= 1 and 0 <= spec["percentile"] <= 100
    if tested:
        assert (d / "null_distribution.png").is_file()
    assert "greedy" in (d / "generations.txt").read_text()


def test_multiplier_one_and_no_clamp_reproduce_the_model_exactly(pipeline, tiny_lm):
    import part9_clamping_intervention as p9
    from common import checkpoint
    from common.nfm import NFM
    from common.loading import load_sae_checkpoint, load_secondary_checkpoint

    model, tok = tiny_lm
    sae, norm, _ = load_sae_checkpoint(pipeline / "p1")
    t, c = checkpoint.load(pipeline / "p2", "nfm", "--nfm")
    nfm = NFM.from_tensors(t, c["hparams"])
    sec, unorm, _ = load_secondary_checkpoint(pipeline / "p3")
    prompts = ["the weather is nice today and", "dear sir, I am writing to"]
    with torch.no_grad():
        plain = torch.stack([model(input_ids=torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]])).logits[0, -1]
                             for p in prompts])
    batched = p9.run_prompts(model, tok, 1, prompts, None, False)           # right-padded together
    assert torch.allclose(batched, plain, atol=1e-5)
    for kind, feat in (("secondary", 0), ("primary", 0)):
        one = p9.Clamp(sae, norm, nfm, sec, unorm, kind, feat, mult=1.0)
        assert torch.equal(p9.run_prompts(model, tok, 1, prompts, one, False), batched), kind
        # a real clamp of a firing feature changes the logits
        h = torch.randn(5, sae.cfg.d) * norm.scale
        idx, _ = sae.encode(norm.encode(h))
        strong = p9.Clamp(sae, norm, nfm, sec, unorm, "primary", int(idx[0, 0]), mult=5.0)
        assert strong.delta(h).abs().max() > 0


def test_the_joint_model_end_to_end(behaviour, tiny_demo, tmp_path):
    """part5 + part3 --joint + part8 --joint, then part9 --joint takes its feature from that part8 run; a part8
    run on other models is refused, in both directions."""
    out = behaviour
    data = ["--train-tokens", "12000", "--val-tokens", "3000", "--cache-dir", str(out / "cache")]
    run_script("part5_joint_sae_nfm.py", "--model", str(tiny_demo), "--dataset", str(tiny_demo / "corpus.txt"),
               "--layer", "1", "--n-latents", "128", "--k", "8", "--nfm-dim", "16", "--epochs", "1",
               "--baseline-sae", str(out / "p1"), "--out", str(tmp_path / "p5"), *data)
    run_script("part3_train_secondary_sae.py", "--joint", str(tmp_path / "p5"), "--expansion", "4", "--k", "4",
               "--epochs", "1", "--out", str(tmp_path / "p3j"), *data)
    run_script("part8_stimulus_response.py", "--joint", str(tmp_path / "p5"), "--secondary", str(tmp_path / "p3j"),
               "--n-perm", "199", "--out", str(tmp_path / "p8j"))
    m8 = json.loads((tmp_path / "p8j" / "metrics.json").read_text())
    assert m8["models"]["path"] == "joint" and "secondary" in m8 and m8["models"]["secondary"]["path"].endswith("p3j")
    run_script("part9_clamping_intervention.py", "--joint", str(tmp_path / "p5"), "--secondary", str(tmp_path / "p3j"),
               "--part8", str(tmp_path / "p8j"), "--multipliers", "0", "1", "4", "--n-prompts", "8",
               "--null-features", "3", "--generate-tokens", "0", "--out", str(tmp_path / "p9j"))
    m = json.loads((tmp_path / "p9j" / "metrics.json").read_text())
    assert m["model_path"].startswith("joint") and set(m["conditions"]["target"]) == {"mult=0", "mult=1", "mult=4"}
    assert m["feature"] == m8["secondary"]["top_by_interaction_F"][0]["feature"] and m["feature_picked_by"].startswith("part8")
    # part8 of the sequential model cannot pick the joint model's feature, nor the other way round
    for extra, p8 in ((["--joint", str(tmp_path / "p5"), "--secondary", str(tmp_path / "p3j")], out / "p8"),
                      (["--sae", str(out / "p1"), "--nfm", str(out / "p2"), "--secondary", str(out / "p3")], tmp_path / "p8j")):
        wrong = run_script("part9_clamping_intervention.py", *extra, "--part8", str(p8), "--out", str(tmp_path / "x"), check=False)
        assert wrong.returncode == 2 and "run part8 on these models" in wrong.stderr and "Traceback" not in wrong.stderr
        assert len(wrong.stderr.strip().splitlines()) == 1
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


def test_part9_contrasts_use_the_declared_level_order():
    """Only the formal|emotional bucket's logits rise: with formality declared (formal, casual) and emotion
    (emotional, neutral), the interaction contrast (m00 - m01) - (m10 - m11) is positive. The old part9 coded
    levels alphabetically ('casual' before 'formal') and reported the opposite sign."""
    import numpy as np
    import part9_clamping_intervention as p9
    a = np.array(["formal"] * 4 + ["casual"] * 4)
    b = np.array(["emotional", "emotional", "neutral", "neutral"] * 2)
    rng = np.random.default_rng(0)
    changes = rng.normal(0, 0.01, (6, 8))
    changes[:, (a == "formal") & (b == "emotional")] += 1.0
    r = p9.word_tests(changes, a, b, ["formal", "casual"], ["emotional", "neutral"])
    assert r["A:B"]["estimate"] > 0.9 and r["A"]["estimate"] > 0.4 and r["B"]["estimate"] > 0.4
    assert r["cell_means"]["formal|emotional"] > 0.9
    flipped = p9.word_tests(changes, a, b, ["casual", "formal"], ["emotional", "neutral"])
    assert flipped["A:B"]["estimate"] < -0.9                  # the order is the declared one, not a sorted one


def test_part9_pseudo_replicated_anova_switch(behaviour, tmp_path):
    """--defects pseudo-replicated-anova: the reference's per-observation statistics beside this tool's, on the
    same changes (the by-hand check and its false-positive rate: tests/test_stats_design.py), announced and
    recorded; the tool's own tests are unchanged by the switch."""
    out = behaviour
    proc = run_script("part9_clamping_intervention.py", "--sae", str(out / "p1"), "--nfm", str(out / "p2"),
                      "--secondary", str(out / "p3"), "--part8", str(out / "p8"), "--multipliers", "4", "--n-prompts",
                      "12", "--null-features", "0", "--generate-tokens", "0", "--defects", "pseudo-replicated-anova",
                      "--out", str(tmp_path / "p9"))
    m = json.loads((tmp_path / "p9" / "metrics.json").read_text())
    ours = json.loads((out / "p9" / "metrics.json").read_text())["conditions"]["target"]["mult=4"]
    r = m["conditions"]["target"]["mult=4"]
    assert r["A:B"] == ours["A:B"] and set(r["reference_anova"]) == {"A", "B", "A:B"}
    n_obs = 12 * len(r["word_mean_change"])
    assert r["reference_anova"]["A:B"]["df"][1] <= n_obs // 2 - 2 and 0 <= r["reference_anova"]["A:B"]["p"] <= 1
    assert [d["name"] for d in m["reference_defects"]] == ["pseudo-replicated-anova"]
    assert proc.stdout.count("REFERENCE DEFECT ON: pseudo-replicated-anova") == 2 and "REFERENCE (pseudo-replicated)" in proc.stdout
