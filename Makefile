# The two commands of the README:
#   make demo   the full pipeline (every stage so far) on the embedded demo, offline, on CPU
#   make test   the test suite
# Each creates .venv and installs requirements.txt on first use.
PY := .venv/bin/python
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test validate setup clean demo-seeds ladder
setup: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

STAGES := checkpoints/part1_sae checkpoints/part2_nfm checkpoints/conjunctions checkpoints/part3_secondary_sae checkpoints/part5_joint checkpoints/part5_poly \
          checkpoints/part3_secondary_sae_joint checkpoints/part6_kl checkpoints/part4_inspect_sequential \
          checkpoints/part4_inspect_joint checkpoints/part7_gram checkpoints/part8_stimuli checkpoints/part9_clamp checkpoints/feature_browser

demo: .venv/.installed
	$(PY) -m common.demo
	$(PY) part1_train_topk_sae.py --overwrite --out checkpoints/part1_sae
	$(PY) part2_train_residual_nfm.py --overwrite --sae checkpoints/part1_sae --out checkpoints/part2_nfm
	$(PY) detect_conjunctions.py --overwrite --sae checkpoints/part1_sae --out checkpoints/conjunctions
	$(PY) part3_train_secondary_sae.py --overwrite --nfm checkpoints/part2_nfm --out checkpoints/part3_secondary_sae
	$(PY) part5_joint_sae_nfm.py --overwrite --sae checkpoints/part1_sae --out checkpoints/part5_joint
	$(PY) part5_joint_sae_nfm.py --overwrite --decoder poly --sae checkpoints/part1_sae --baseline-sae checkpoints/part5_joint/baseline_sae --out checkpoints/part5_poly
	$(PY) part3_train_secondary_sae.py --overwrite --joint checkpoints/part5_joint --out checkpoints/part3_secondary_sae_joint
	$(PY) part6_kl_divergence.py --overwrite --sae checkpoints/part1_sae --nfm checkpoints/part2_nfm --joint checkpoints/part5_joint --poly checkpoints/part5_poly --docs 120 --out checkpoints/part6_kl
	$(PY) part4_nfm_inspector.py --overwrite --nfm checkpoints/part2_nfm --out checkpoints/part4_inspect_sequential
	$(PY) part4_nfm_inspector.py --overwrite --joint checkpoints/part5_joint --out checkpoints/part4_inspect_joint
	$(PY) part7_gram_analysis.py --overwrite --sae checkpoints/part1_sae --joint checkpoints/part5_joint --out checkpoints/part7_gram
	$(PY) part8_stimulus_response.py --overwrite --sae checkpoints/part1_sae --nfm checkpoints/part2_nfm --secondary checkpoints/part3_secondary_sae --out checkpoints/part8_stimuli
	$(PY) part9_clamping_intervention.py --overwrite --sae checkpoints/part1_sae --nfm checkpoints/part2_nfm --secondary checkpoints/part3_secondary_sae --part8 checkpoints/part8_stimuli --out checkpoints/part9_clamp
	$(PY) browse_features.py --overwrite --sae checkpoints/part1_sae --nfm checkpoints/part2_nfm --secondary checkpoints/part3_secondary_sae --joint checkpoints/part5_joint --joint-secondary checkpoints/part3_secondary_sae_joint --conjunctions checkpoints/conjunctions --part8 checkpoints/part8_stimuli --part9 checkpoints/part9_clamp --out checkpoints/feature_browser
	@$(PY) -m common.summary $(STAGES)

.venv/.installed-test: requirements-test.txt .venv/.installed
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

test: .venv/.installed-test
	$(PY) -m pytest -q tests

# the demo's headline figures over seeds 0 1 2: mean and range (README "Results on the demo")
demo-seeds: .venv/.installed
	$(PY) bench/demo_seeds.py

# planted-ground-truth validation (README: "Does the method find interactions that are not there?")
validate: .venv/.installed
	$(PY) validate_planted_interactions.py --overwrite

# the original study rung by rung, its defects fixed one at a time (README "Reproducing the original study")
ladder: .venv/.installed
	$(PY) reproduce_reference.py

clean:
	rm -rf $(STAGES) checkpoints/activation_cache checkpoints/seeds checkpoints/bench_stream_memory checkpoints/paper_rehearsal checkpoints/reference_ladder
