"""Early-exit collection vs the full forward pass: tokens/s of `common.hooks.collect(model, L, ...)` against
`model(input_ids, attention_mask)` (the normal logits forward), on the same model and the same text, A and B
alternated, medians of repeats.

Target: collecting layer L of an N-layer model reaches >= 0.8 * N / L times the full forward's throughput
(the forward after block L-1 is skipped, so the work scales with L / N; 0.8 leaves room for the embedding,
mask and rotary set-up that both paths pay).

    .venv/bin/python bench/bench_collection.py            # demo model at L = 1..N, plus a random 16-layer Llama
    .venv/bin/python bench/bench_collection.py --quick    # smoke run, a few seconds

Models:
  demo      the embedded demo Llama (`common.models.load_model('demo')`, 4 blocks, d=256, vocab 2048), built
            on first use (about 100 s)
  deep16    a randomly initialised LlamaForCausalLM from a config: 16 blocks, d=512, 8 heads, MLP 1376,
            vocab 32000 (weights do not matter for speed), at L = 4 and 8
Text: sequences of the demo corpus's validation split ([BOS] + tokens, `--seq-len`, right-padded), tokenised
by the demo tokenizer; the same input_ids go to both models (the demo ids fit in the larger vocabulary).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.data import batch_sequences, iter_documents, iter_sequences  # noqa: E402
from common.hooks import collect, n_layers  # noqa: E402
from common.models import load_model  # noqa: E402


def alternate(fns: dict, rounds: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, the fns taking turns (warm-up call each first)."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(repeats):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def demo_batch(tok, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    from common.demo import ensure_demo_model
    corpus = str(ensure_demo_model() / "corpus.txt")
    seqs = []
    for s, _ in iter_sequences(tok, iter_documents(corpus, "validation", 0.1), seq_len):
        seqs.append(s)
        if len(seqs) == batch:
            break
    return batch_sequences(seqs, tok.pad_token_id if tok.pad_token_id is not None else 0)


def deep_model(layers: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=512, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=1376, vocab_size=32000, max_position_embeddings=512, bos_token_id=0,
                      eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def bench_model(name: str, model, ids, mask, layers: list[int], rounds: int, repeats: int) -> list[dict]:
    N = n_layers(model)
    tokens = int(mask.sum())

    @torch.no_grad()
    def full():
        model(input_ids=ids, attention_mask=mask)

    fns = {"full": full}
    for L in layers:
        fns[f"L{L}"] = (lambda L=L: collect(model, L, ids, mask))
    med = alternate(fns, rounds, repeats)
    full_tps = tokens / med["full"]
    print(f"\n{name}: N={N} blocks, batch {tuple(ids.shape)} = {tokens} real tokens, full forward "
          f"{med['full'] * 1e3:8.1f} ms = {full_tps:10.0f} tok/s")
    rows = []
    for L in layers:
        tps = tokens / med[f"L{L}"]
        ratio, target = tps / full_tps, 0.8 * N / L
        ok = ratio >= target
        rows.append(dict(model=name, L=L, N=N, ratio=ratio, target=target, ok=ok))
        print(f"  collect L={L:2d}  {med[f'L{L}'] * 1e3:8.1f} ms = {tps:10.0f} tok/s   collect/full {ratio:5.2f}x   "
              f"target 0.8*N/L = {target:5.2f}x   {'met' if ok else 'MISSED'}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: demo model at its default layer, 1 round")
    p.add_argument("--rounds", type=int, default=3, help="A/B alternations (default: 3)")
    p.add_argument("--repeats", type=int, default=3, help="calls timed per turn (default: 3)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence, BOS included (default: 64)")
    p.add_argument("--batch", type=int, default=32, help="sequences per forward on the demo model (default: 32)")
    p.add_argument("--deep-batch", type=int, default=8, help="sequences per forward on deep16 (default: 8)")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.repeats, a.batch = 1, 2, 8
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rounds {a.rounds} x repeats {a.repeats}")

    model, tok, _ = load_model("demo", "float32", "cpu")
    ids, mask = demo_batch(tok, max(a.batch, a.deep_batch), a.seq_len)
    N = n_layers(model)
    rows = bench_model("demo", model, ids[:a.batch], mask[:a.batch], [2] if a.quick else list(range(1, N + 1)),
                       a.rounds, a.repeats)
    if not a.quick:
        rows += bench_model("deep16 (random init)", deep_model(16), ids[:a.deep_batch], mask[:a.deep_batch], [4, 8],
                            a.rounds, a.repeats)
    missed = [r for r in rows if not r["ok"]]
    print(f"\ntarget collect/full >= 0.8*N/L: {len(rows) - len(missed)}/{len(rows)} met"
          + ("; missed: " + ", ".join(f"{r['model']} L={r['L']}" for r in missed) if missed else ""))


if __name__ == "__main__":
    main()
