"""Paper-shape rehearsal (issue 14): every stage at `--preset paper`'s shapes, on this machine, with reduced token
and document counts. It finds what breaks or does not fit at OpenLLaMA-3B's shapes before anyone rents a GPU.

    .venv/bin/python bench/paper_rehearsal.py                   # OpenLLaMA-3B shapes on the CPU (see RESULTS.md)
    .venv/bin/python bench/paper_rehearsal.py --tiny            # the smoke size (tests/test_bench_smoke.py)
    .venv/bin/python bench/paper_rehearsal.py --device cuda     # on a GPU (bench/gpu_check.sh runs this)

1. The model: a randomly initialised `LlamaForCausalLM` with OpenLLaMA-3B's exact config (26 layers, d 3200,
   MLP 8640, 32 heads, vocabulary 32,000), built locally and saved as safetensors (6.9 GB in bfloat16), and a
   byte-level BPE tokenizer with 32,000 entries trained by the project's own tokenizer code
   (`common.demo.train_tokenizer`) on the demo corpus plus deterministic pseudo-words (the demo corpus alone has
   too few distinct words to fill 32,000 merges). No hub.
2. The stages, each a subprocess as a researcher runs it, all with `--preset paper` (so 50,000 latents at K 1024,
   NFM K 300, secondary 25x at K 150, layer 16, seq-len 128) and the paper text replaced by the demo corpus:
   part1 -> part2 -> detect_conjunctions -> part3 -> part5 (joint, own parameter-matched baseline) -> part5 poly ->
   part3 --joint -> part4 (both) -> part6 -> part7 -> part8 -> part9 -> interpret_features (through a fake
   HTTP transport: the real `anthropic` SDK, no network).
   Reduced: --train-tokens, --val-tokens, --steps, part6 --docs, part8/9 sentence counts (flags below). part9
   reads the demo word buckets: the English buckets need OpenLLaMA's own tokenizer (single-token words).
3. Per stage: wall seconds and peak RSS (getrusage of the child); on CUDA also torch.cuda.max_memory_allocated
   (printed at the stage's exit by a wrapper, CUDA_WRAP); for trained stages a lower bound on training tokens/s
   (steps x the preset's batch / the stage's wall seconds). Then an extrapolation to the full
   preset: time scaled by training steps (training stages) and host memory by what grows with the preset's
   token counts (common/rows.py bounds the training rows to 8 blocks of 32,768 rows).
Writes bench/paper_rehearsal.json (rows written as stages finish; a rerun skips finished stages unless --fresh).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# OpenLLaMA-3B (openlm-research/open_llama_3b config.json)
OPENLLAMA_3B = dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
                    num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, vocab_size=32000,
                    hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY = dict(OPENLLAMA_3B, hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=2048)
# the full preset, for the extrapolation: (training tokens, batch) of the trained stages (6 epochs each) and host
# bytes per held-out row (d 3200, K 1024). Stages that normalise both halves (Activations.normalized_halves:
# split the bfloat16 rows, release them, normalise half by half) peak at one half's bfloat16 rows and both
# float32 halves, 16,000 B; test-half-only readers at the split, 12,800 B; part2/part3 also hold the codes,
# residuals and hidden layer (the arithmetic is in bench/RESULTS.md)
FULL_TRAIN = {"part1": (1_000_000, 4096), "part2": (5_000_000, 1024), "part3": (1_000_000, 4096),
              "part3_joint": (1_000_000, 4096), "part5": (5_000_000, 4096), "part5_poly": (5_000_000, 4096)}
FULL_VAL = 100_000
HELD_BYTES = {"part1": 16_000, "part2": 51_000, "part3": 72_000, "part3_joint": 72_000, "part5": 16_000,
              "part5_poly": 16_000, "part4": 12_800, "part4_joint": 12_800, "part7": 12_800}
# part6 at the preset evaluates full LM batches (--lm-batch-size 8 of 128 tokens; the rehearsal's 2 documents
# fill fewer): per batch the log-probabilities (4 float32 [8, 128, 32000] tensors at once) and ~25 variants'
# replacements of [8 x 127, 3200] float32
PART6_BATCH = 8 * 128 * (4 * 32_000 * 4 + 25 * 3200 * 4)
BLOCK_CACHE = 8 * 32_768 * 3200 * 2          # common/rows.py's bound at d 3200, bfloat16 rows
from bench.bench_stream_memory import LAUNCHER  # noqa: E402  (the child-peak-RSS launcher, shared)
# on CUDA each stage runs under this wrapper, which prints the stage's torch.cuda.max_memory_allocated at exit
CUDA_WRAP = ("import atexit, runpy, sys, torch\n"
             "atexit.register(lambda: torch.cuda.is_initialized() and print('CUDA_MAX_ALLOC_BYTES', "
             "torch.cuda.max_memory_allocated(), flush=True))\n"
             "if sys.argv[1] == '-c':\n"
             "    code, sys.argv = sys.argv[2], ['-c', *sys.argv[3:]]\n"
             "    exec(compile(code, '<stage>', 'exec'), {'__name__': '__main__'})\n"
             "else:\n"
             "    sys.argv = sys.argv[1:]\n"
             "    runpy.run_path(sys.argv[0], run_name='__main__')\n")
FAKE_CLAUDE = """
import json, sys
sys.path.insert(0, {root!r})
import interpret_features as itf
from common.claude import HTTPX
def handler(request):
    body = json.loads(request.content)
    prompt = body["messages"][0]["content"]
    prompt = prompt if isinstance(prompt, str) else prompt[0]["text"]
    if "what does this feature detect" in prompt:
        text = "Fires on a rehearsal token."
    else:
        text = "\\n".join(f"{{i + 1}}: 1" for i, l in enumerate(l for l in prompt.splitlines() if l[:1].isdigit()))
    return HTTPX.Response(200, json={{"id": "m", "type": "message", "role": "assistant", "model": body["model"],
        "content": [{{"type": "text", "text": text}}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {{"input_tokens": 1, "output_tokens": 1}}}})
from common import cli
cli.run_main(lambda: itf.main(sys.argv[1:], http_client=HTTPX.Client(transport=HTTPX.MockTransport(handler))))
"""


def pseudo_words(n: int, seed: int = 0) -> list[str]:
    """Deterministic letter strings, so BPE has enough distinct material to learn 32,000 merges."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(3, 11))) for _ in range(12))
            for _ in range(n)]


def build_model(folder: Path, cfg: dict, seed: int = 0) -> Path:
    """A random-init Llama of `cfg` and a 32,000-entry tokenizer in `folder` (kept across reruns)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.demo import train_tokenizer

    if (folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    from common.demo import ensure_demo_model
    texts = [t for t in (ensure_demo_model() / "corpus.txt").read_text().split("\n\n") if t.strip()]
    # the stimuli's words first and often, so they are single tokens as in a real LM's vocabulary
    stim = json.dumps([json.loads((ROOT / "stimuli" / f).read_text()) for f in
                       ("demo_word_buckets.json", "demo_formality_emotion.json")])
    tok = train_tokenizer([stim] * 50 + texts + pseudo_words(60_000 if cfg["vocab_size"] > 10_000 else 300),
                          cfg["vocab_size"], cfg["max_position_embeddings"])
    if len(tok) != cfg["vocab_size"]:
        raise SystemExit(f"the tokenizer has {len(tok)} entries, not {cfg['vocab_size']}")
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, **ids}, torch_dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def stage_commands(a, model: Path, corpus: Path, w: Path) -> list[tuple[str, list[str], str]]:
    """(name, argv, what it is) of every stage, in pipeline order."""
    py = [sys.executable]
    lm = ["--model", str(model), "--dataset", str(corpus), "--dtype", a.dtype, "--device", a.device,
          "--cache-dir", str(w / "cache")]
    if a.tiny:
        lm += ["--layer", "2"]
    data = ["--train-tokens", str(a.train_tokens), "--val-tokens", str(a.val_tokens), "--lm-batch-size", "8"]
    # every stage reads part1's collection from the rehearsal's own cache, under the same cache key (the LM's
    # dtype is part of it): otherwise a stage that reads activations collects them again through the LM, and its
    # peak holds the LM
    cache = ["--cache-dir", str(w / "cache"), "--dtype", a.dtype]
    train = ["--steps", str(a.steps), "--eval-every", str(a.steps), "--overwrite"]
    P = ["--preset", "paper"]
    small = (["--n-latents", "512", "--k", "16"] if a.tiny else [])
    nfm_small = (["--nfm-dim", "8"] if a.tiny else [])
    sec_small = (["--expansion", "2", "--k", "4"] if a.tiny else [])
    o = lambda n: ["--out", str(w / n)]  # noqa: E731
    return [
        ("part1", py + ["part1_train_topk_sae.py", *P, *lm, *data, *train, *small, *o("part1")], "TopK SAE"),
        ("part2", py + ["part2_train_residual_nfm.py", *P, "--sae", str(w / "part1"), *data[:4], *cache, *train, *nfm_small,
                        "--device", a.device, *o("part2")], "NFM + control ladder"),
        ("detect", py + ["detect_conjunctions.py", *P, "--sae", str(w / "part1"), *data[:4], *cache, "--max-rows",
                         str(a.train_tokens), "--device", a.device, "--overwrite", *o("conj")], "conjunction detector"),
        ("part3", py + ["part3_train_secondary_sae.py", *P, "--nfm", str(w / "part2"), *data[:4], *cache, *train, *sec_small,
                        "--device", a.device, *o("part3")], "secondary SAE"),
        ("part5", py + ["part5_joint_sae_nfm.py", *P, *lm, *data, *train, *small, *nfm_small, *o("part5")],
         "joint SAE+NFM and its parameter-matched SAE"),
        ("part5_poly", py + ["part5_joint_sae_nfm.py", *P, "--decoder", "poly", *lm, *data, *train, *small, *nfm_small,
                             "--baseline-sae", str(w / "part5" / "baseline_sae"), *o("part5_poly")], "joint SAE+PolySAE"),
        ("part3_joint", py + ["part3_train_secondary_sae.py", *P, "--joint", str(w / "part5"), *data[:4], *cache, *train,
                              *sec_small, "--device", a.device, *o("part3_joint")], "secondary SAE on the joint NFM"),
        ("part4", py + ["part4_nfm_inspector.py", *P, "--nfm", str(w / "part2"), "--val-tokens", str(a.val_tokens), *cache,
                        "--overwrite", *o("part4")], "NFM inspector"),
        ("part4_joint", py + ["part4_nfm_inspector.py", *P, "--joint", str(w / "part5"), "--val-tokens",
                              str(a.val_tokens), *cache, "--overwrite", *o("part4_joint")], "NFM inspector, joint"),
        ("part6", py + ["part6_kl_divergence.py", *P, "--sae", str(w / "part1"), "--nfm", str(w / "part2"), "--joint",
                        str(w / "part5"), "--poly", str(w / "part5_poly"), "--docs", str(a.docs), "--kl-adapter-steps",
                        str(a.steps), "--device", a.device, *cache, "--overwrite", *o("part6")],
         "splice KL/CE, baselines, controls, KL adapter"),
        ("part7", py + ["part7_gram_analysis.py", *P, "--sae", str(w / "part1"), "--joint", str(w / "part5"),
                        "--val-tokens", str(a.val_tokens), *cache, "--overwrite", *o("part7")], "decoder geometry"),
        ("part8", py + ["part8_stimulus_response.py", *P, "--sae", str(w / "part1"), "--nfm", str(w / "part2"),
                        "--secondary", str(w / "part3"), "--dtype", a.dtype, "--device", a.device, "--n-perm",
                        str(a.n_perm), "--overwrite", *o("part8")], "2x2 stimuli"),
        ("part9", py + ["part9_clamping_intervention.py", *P, "--sae", str(w / "part1"), "--nfm", str(w / "part2"),
                        "--secondary", str(w / "part3"), "--part8", str(w / "part8"), "--n-prompts", str(a.prompts),
                        "--null-features", "4", "--generate-tokens", "4", "--dtype", a.dtype, "--device", a.device,
                        "--buckets", str(ROOT / "stimuli" / "demo_word_buckets.json"),
                        "--overwrite", *o("part9")], "clamping"),
        ("interpret", py + ["-c", FAKE_CLAUDE.format(root=str(ROOT)), "--sae", str(w / "part1"), "--features", "0", "1",
                            "--docs", str(max(20, a.docs)), "--n-examples", "4", "--n-score", "2", "--dtype", a.dtype,
                            "--device", a.device, "--overwrite", *o("interpret")], "Claude explanations (fake transport)"),
    ]


def extrapolate(name: str, row: dict, a) -> dict:
    """The stage at the full preset's token counts: host memory = the rehearsal's peak + what grows with
    the tokens (held-out rows up to 100k; the training-row block cache up to its bound), an upper bound; time =
    the rehearsal's seconds x (full steps / rehearsal steps) for trained stages, also an upper bound (it scales
    the fixed costs too)."""
    grow = HELD_BYTES.get(name, 0) * max(0, FULL_VAL - a.val_tokens) + (PART6_BATCH if name == "part6" else 0)
    out = {}
    if name in FULL_TRAIN:
        tokens, batch = FULL_TRAIN[name]
        grow += BLOCK_CACHE
        out["full_steps"] = int(6 * tokens / batch)
        out["seconds_upper_bound"] = row["seconds"] * out["full_steps"] / a.steps
    out["peak_rss_mb_full_preset"] = row["peak_rss_mb"] + grow / 2 ** 20
    return out


def print_table(stages: dict) -> None:
    print("| stage | seconds | peak RSS | CUDA max allocated | full preset: peak RSS (upper bound) | "
          "full preset: steps, time (upper bound) |")
    print("|---|---|---|---|---|---|")
    for name, r in stages.items():
        e = r.get("extrapolated", {})
        steps = (f"{e['full_steps']:,} steps, {e['seconds_upper_bound'] / 3600:,.1f} h" if "full_steps" in e else "–")
        full = f"{e['peak_rss_mb_full_preset'] / 1024:.1f} GiB" if e else "–"
        gpu = f"{r['cuda_max_allocated_mb'] / 1024:.1f} GiB" if "cuda_max_allocated_mb" in r else "–"
        print(f"| {name} | {r['seconds']:.0f} | {r['peak_rss_mb'] / 1024:.1f} GiB | {gpu} | {full} | {steps} |")


def run_stage(argv: list[str], log: Path, cuda: bool = False) -> dict:
    """{seconds, peak_rss_mb, rc, cuda_max_allocated_mb (CUDA only)}; the stage's output goes to `log`."""
    if cuda:
        argv = [argv[0], "-c", CUDA_WRAP, *argv[1:]]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TQDM_DISABLE": "1", "ANTHROPIC_API_KEY": "sk-rehearsal"})
    row = {"seconds": time.perf_counter() - t0, "rc": proc.returncode}
    lines = log.read_text().splitlines()
    kib = [int(line.split()[1]) for line in lines if line.startswith("PEAK_RSS_KIB")]
    row["peak_rss_mb"] = kib[-1] / 1024 if kib else float("nan")
    alloc = [int(line.split()[1]) for line in lines if line.startswith("CUDA_MAX_ALLOC_BYTES")]
    if alloc:
        row["cuda_max_allocated_mb"] = alloc[-1] / 2**20
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny Llama and tiny dictionaries: the smoke size")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="bfloat16", help="LM dtype (default: bfloat16; the preset's float16 is slow on CPUs)")
    p.add_argument("--train-tokens", type=int, default=4096, help="training tokens of every stage (default: 4096)")
    p.add_argument("--val-tokens", type=int, default=2048, help="held-out tokens (default: 2048)")
    p.add_argument("--steps", type=int, default=2, help="training steps of every trained model (default: 2)")
    p.add_argument("--docs", type=int, default=4, help="held-out documents for part6 and interpret_features (default: 4)")
    p.add_argument("--prompts", type=int, default=4, help="part9 prompts (default: 4)")
    p.add_argument("--n-perm", type=int, default=20, help="part8 permutations (default: 20)")
    p.add_argument("--stages", nargs="+", default=None, help="only these stages (default: all)")
    p.add_argument("--fresh", action="store_true", help="rerun the chosen stages even if the JSON has them")
    p.add_argument("--work", default=str(ROOT / "checkpoints" / "paper_rehearsal"), help="work folder")
    p.add_argument("--json", default=None, help="results (default: bench/paper_rehearsal.json, or the work folder "
                                                "with --tiny)")
    a = p.parse_args()
    w = Path(a.work) / ("tiny" if a.tiny else "openllama3b")
    w.mkdir(parents=True, exist_ok=True)
    out_json = Path(a.json) if a.json else (w / "rehearsal.json" if a.tiny else ROOT / "bench" / "paper_rehearsal.json")
    t0 = time.perf_counter()
    model = build_model(w / "model", TINY if a.tiny else OPENLLAMA_3B)
    build_s = time.perf_counter() - t0
    from common.demo import ensure_demo_model
    corpus = ensure_demo_model() / "corpus.txt"
    result = json.loads(out_json.read_text()) if out_json.is_file() else {}
    result.update({"config": "tiny" if a.tiny else "OpenLLaMA-3B", "device": a.device, "dtype": a.dtype,
                   "train_tokens": a.train_tokens, "val_tokens": a.val_tokens, "steps": a.steps, "docs": a.docs})
    result.setdefault("build_seconds", build_s)
    stages = result.setdefault("stages", {})
    for name, argv, what in stage_commands(a, model, corpus, w):
        if a.stages and name not in a.stages:
            continue
        if name in stages and stages[name]["rc"] == 0 and not a.fresh:
            print(f"{name:12s} done before: {stages[name]['seconds']:7.1f} s  {stages[name]['peak_rss_mb']:8.0f} MB")
            continue
        row = stages[name] = {"what": what, **run_stage(argv, w / f"{name}.log", a.device.startswith("cuda"))}
        rc = row["rc"]
        if name in FULL_TRAIN:              # a lower bound: the wall time includes loading and evaluation
            row["train_tokens_per_s_lower_bound"] = a.steps * FULL_TRAIN[name][1] / row["seconds"]
        if rc == 0 and not a.tiny:
            row["extrapolated"] = extrapolate(name, row, a)
        print(f"{name:12s} {'ok' if rc == 0 else f'FAILED rc {rc}':>8s} {row['seconds']:7.1f} s  peak RSS "
              f"{row['peak_rss_mb']:8.0f} MB"
              + (f"  CUDA max allocated {row['cuda_max_allocated_mb']:8.0f} MB" if "cuda_max_allocated_mb" in row else "")
              + ("" if rc == 0 else f"  (log: {w / (name + '.log')})"), flush=True)
        out_json.write_text(json.dumps(result, indent=1) + "\n")
    result["total_seconds"] = sum(s["seconds"] for s in stages.values()) + result["build_seconds"]
    if not a.tiny:
        for name, row in stages.items():
            if row["rc"] == 0:
                row["extrapolated"] = extrapolate(name, row, a)
        print_table(stages)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out_json}")
    if any(s["rc"] != 0 for s in stages.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
