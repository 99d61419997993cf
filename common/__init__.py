"""Shared code for the feature-integration pipeline (part1 ... part9 scripts).

Kept small and flat: one module per concern, and a module imports only modules below it
(tests/test_structure.py checks there is no import circle).
  errors.py      UserError / Interrupted: the bottom, imports nothing of the project
  cli.py         argparse conventions, presets, one-line error handling
  checkpoint.py  safetensors + JSON checkpoints, atomic writes, content hashes
  models.py      loading an LM + tokenizer (HF id, local folder, or the embedded demo)
  hooks.py       THE layer-hook resolver: what "layer L" means, collection and splicing
  data.py        text sources, document split and held-out halves, tokenisation, activation collection and files
  normalize.py   the activation normalisation saved with every model
  sae.py         TopK SAE (sparse and dense paths) and its training loop
  nfm.py         Neural Factorization Machine (sparse and dense paths), path means and ablation, training loop
  joint.py       the joint SAE + NFM model
  loading.py     any SAE folder (ours or SAELens); the model path of part8, part9 and interpret_features
  train.py       the small generic training loop shared by SAE and NFM
  stats.py       document-level CIs, ANOVAs, permutation tests, words x prompts tests
  metrics.py     reconstruction metrics with explicit definitions
  plots.py       the PNGs every stage writes
  demo.py        the embedded demo corpus and tiny Llama (shipped build in demo_lm/)
"""
