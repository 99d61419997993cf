# The two commands of the README:
#   make demo   the full pipeline (every stage so far) on the embedded demo, offline, on CPU
#   make test   the test suite
# Each creates .venv and installs requirements.txt on first use.
PY := .venv/bin/python
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test validate setup clean
setup: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

demo: .venv/.installed
	$(PY) -m common.demo
	$(PY) part1_train_topk_sae.py --out checkpoints/part1_sae
	$(PY) part2_train_residual_nfm.py --sae checkpoints/part1_sae --out checkpoints/part2_nfm
	$(PY) part3_train_secondary_sae.py --nfm checkpoints/part2_nfm --out checkpoints/part3_secondary_sae
	@$(PY) -m common.summary checkpoints/part1_sae checkpoints/part2_nfm checkpoints/part3_secondary_sae

test: .venv/.installed
	$(PY) -m pytest -q tests

# planted-ground-truth validation (README: "Does the method find interactions that are not there?")
validate: .venv/.installed
	$(PY) validate_planted_interactions.py

clean:
	rm -rf checkpoints/part1_sae checkpoints/part2_nfm checkpoints/part3_secondary_sae checkpoints/activation_cache
