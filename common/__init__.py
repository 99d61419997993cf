"""Shared code for the feature-integration pipeline (part1 ... part9 scripts).

Kept small and flat: one module per concern.
  cli.py         argparse conventions, presets, one-line error handling
  checkpoint.py  safetensors + JSON checkpoints, atomic writes, content hashes
  models.py      loading an LM + tokenizer (HF id, local folder, or the embedded demo)
  hooks.py       THE layer-hook resolver: what "layer L" means, collection and splicing
  data.py        text sources, document split, tokenisation, activation collection and files
  normalize.py   the activation normalisation saved with every model
  sae.py         TopK SAE (sparse and dense paths) and its training loop
  nfm.py         Neural Factorization Machine (sparse and dense paths) and its training loop
  train.py       the small generic training loop shared by SAE and NFM
  metrics.py     reconstruction metrics with explicit definitions
  plots.py       the PNGs every stage writes
  demo.py        the embedded demo corpus and tiny Llama
"""
