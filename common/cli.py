"""Command-line conventions shared by every stage script.

Every script takes `--out DIR`, `--seed`, `--device`, `--dtype`; inputs from earlier stages by flag
(`--sae DIR`, `--nfm DIR`) pointing at that stage's `--out`; `--activations FILE` wherever activations
are read; sizes and budgets as flags with demo-scale defaults; and `--preset paper` for the paper setup.

Bad input raises `UserError`; `run_main` prints it as one line (`error: ...`) and exits with status 2,
so a researcher never sees a stack trace from deep inside torch for a wrong flag.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np

from .errors import Interrupted, UserError  # noqa: F401  (scripts raise cli.UserError)

DEFAULT_TRAIN_TOKENS = 100_000   # demo-scale budgets when collecting from an LM
DEFAULT_VAL_TOKENS = 20_000
DEFAULT_FILE_VAL_TOKENS = 100_000  # held-out rows read from an activation file (they are held in memory)


def run_main(main) -> None:
    """Run `main()`; turn UserError (and a few well-known input failures) into a one-line error."""
    try:
        main()
        from .dist import shutdown
        shutdown()                      # under torchrun: every rank ends together (common/dist.py)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# The paper setup (Claflin 2025): OpenLLaMA-3B, residual stream after 16 decoder blocks, WikiText-103,
# a 50k-latent TopK SAE with K = 1024 on 1M tokens, an NFM with embedding dimension 300 on 5M tokens, and a
# secondary SAE with 25x expansion (300 -> 7,500 latents, K = 2% = 150). Per stage, since flags share names.
PAPER_COMMON = dict(model="openlm-research/open_llama_3b", layer=16, dataset="wikitext-103", seq_len=128,
                    dtype="float16", lm_batch_size=8, val_tokens=100_000)
PRESETS = {
    "paper": {
        "part1": {**PAPER_COMMON, "n_latents": 50_000, "k": 1024, "train_tokens": 1_000_000, "batch_size": 4096},
        "part2": {**PAPER_COMMON, "nfm_dim": 300, "train_tokens": 5_000_000, "batch_size": 1024},
        "part3": {**PAPER_COMMON, "expansion": 25, "k": 150, "train_tokens": 1_000_000, "batch_size": 4096},
        "part5": {**PAPER_COMMON, "n_latents": 50_000, "k": 1024, "nfm_dim": 300, "train_tokens": 5_000_000,
                  "batch_size": 4096},
        "part4": PAPER_COMMON, "detect": PAPER_COMMON, "part6": {**PAPER_COMMON, "docs": 2000, "kl_adapter_steps": 2000}, "part7": PAPER_COMMON,
        "part9": {**PAPER_COMMON, "buckets": str(Path(__file__).resolve().parent.parent / "stimuli" / "word_buckets_en.json"),
                  "prompts": str(Path(__file__).resolve().parent.parent / "stimuli" / "formality_emotion_en.json")},
        "interpret": {**PAPER_COMMON, "docs": 2000}, "browse": PAPER_COMMON,
        "part8": {**PAPER_COMMON, "stimuli": str(Path(__file__).resolve().parent.parent / "stimuli" / "formality_emotion_en.json")},
    },
}


def parser(doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the script's docstring, with defaults shown."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_common_args(p: argparse.ArgumentParser, out_default: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default=out_default,
                   help=f"output directory for the checkpoint, metrics.json and PNGs (default: {out_default})")
    g.add_argument("--seed", type=int, default=0, help="random seed for init, shuffling and dropout (default: 0)")
    g.add_argument("--device", default="auto",
                   help="torch device for the LM and the trained models: auto, cpu, cuda, cuda:1, mps (default: auto)")
    g.add_argument("--dtype", default="auto",
                   help="dtype the LM runs in: auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16. "
                        "SAEs and NFMs always train in float32 (default: auto)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="set the defaults of the paper setup (OpenLLaMA-3B, layer 16, WikiText-103, 50k latents, "
                        "K=1024); explicit flags still override it")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (default: refuse, so good results are never "
                        "overwritten by a rerun with new flags)")


def add_resume_args(p: argparse.ArgumentParser) -> None:
    """--resume / --force / --checkpoint-every, for the stages that train (common/train.py TrainCheckpoints)."""
    g = p.add_argument_group("resume")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last training state (model, optimizer, "
                        "LR-schedule position, RNG states, data position, AuxK counters, best-so-far metrics); "
                        "it ends exactly where an uninterrupted run would")
    g.add_argument("--force", action="store_true",
                   help="with --resume: continue even though flags differ from the interrupted run's; the changed "
                        "flags are recorded in metrics.json (default: refuse)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="save the training state every N steps (atomically, the last two kept, in --out/train_state/), "
                        "and always at SIGINT/SIGTERM and at the end of training (default: a tenth of the steps)")


def add_data_args(p: argparse.ArgumentParser, with_model_source: bool = True) -> None:
    """Flags that say where activations come from: an LM + text, or a precomputed activation file.

    Later stages (with_model_source=False) take the model, layer and text source from their parent SAE's
    checkpoint, so they cannot be pointed at a different layer by mistake."""
    g = p.add_argument_group("activations")
    if with_model_source:
        g.add_argument("--model", default="demo",
                       help="HF model id (e.g. openlm-research/open_llama_3b), a local model folder, or 'demo' for the "
                            "embedded tiny Llama, built on first use (default: demo)")
        g.add_argument("--layer", type=int, default=2,
                       help="layer L: the residual stream after L decoder blocks = hidden_states[L] = output of "
                            "block L-1 (default: 2, the middle of the 4-block demo model)")
        g.add_argument("--dataset", default="demo",
                       help="'wikitext-103', 'wikitext-2', 'demo' (the demo corpus) or a path to a .txt file / folder "
                            "of .txt files whose documents are separated by blank lines (default: demo)")
        g.add_argument("--seq-len", type=int, default=64,
                       help="tokens per LM input sequence, BOS included (default: 64)")
        g.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of documents held out for validation when the text source has no official "
                            "validation split; the split is by document content hash (default: 0.1)")
        g.add_argument("--keep-bos", action="store_true",
                       help="keep BOS positions in the data (default: excluded; their activations are outliers)")
    g.add_argument("--lm-batch-size", type=int, default=32, help="sequences per LM forward pass (default: 32)")
    g.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent.parent / "checkpoints" / "activation_cache"),
                   help="where collected activations are cached as safetensors shards, keyed by model/layer/data "
                        "settings; '' disables the cache (default: checkpoints/activation_cache)")
    g.add_argument("--cache-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype collected activations are stored in, on disk and in memory (cache on or off): "
                        "bfloat16 has float32's range, so the massive activations of LLM residual streams fit; "
                        "float16 is more precise but stops at 65504 (an overflow is an error) (default: bfloat16)")
    g.add_argument("--cache-shard-tokens", type=int, default=262_144,
                   help="rows per activation-cache shard; the cache is written shard by shard, so an interrupted "
                        "collection resumes from the last shard (default: 262144)")
    g.add_argument("--activations", default=None, metavar="FILE",
                   help="train on a safetensors file holding one [n, d] tensor named 'activations' "
                        "(float16/bfloat16/float32) instead of running an LM; an optional int64 'doc_ids' [n] tensor "
                        "lets the held-out split be by document")
    g.add_argument("--val-activations", default=None, metavar="FILE",
                   help="held-out activations in the same format; without it, the last tenth of the rows "
                        "of --activations (whole documents if 'doc_ids' is present) are held out")
    g.add_argument("--train-tokens", type=int, default=None,
                   help=f"training tokens (activation vectors) to use (default: {DEFAULT_TRAIN_TOKENS} collected "
                        f"from the LM, or every training row of --activations)")
    g.add_argument("--block-rows", type=int, default=32_768,
                   help="training rows read from disk at once; training holds at most --shuffle-blocks such "
                        "blocks in memory, whatever the number of training tokens (default: 32768)")
    g.add_argument("--shuffle-blocks", type=int, default=8,
                   help="blocks, drawn in a random order, whose rows are shuffled together; when all training rows "
                        "fit in one such window the order is a plain shuffle of every row (default: 8)")
    g.add_argument("--val-tokens", type=int, default=None,
                   help=f"held-out tokens for every reported metric (default: {DEFAULT_VAL_TOKENS} collected from "
                        f"the LM, or up to {DEFAULT_FILE_VAL_TOKENS} held-out rows of the activation files; held-out rows are "
                        f"kept in memory, training rows are read from disk a block at a time)")


def add_training_args(p: argparse.ArgumentParser, lr_default: float | None, lr_help: str) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=1024, help="tokens per step (default: 1024)")
    t.add_argument("--epochs", type=float, default=6.0, help="passes over the training tokens (default: 6)")
    t.add_argument("--steps", type=int, default=None, help="total steps; overrides --epochs")
    t.add_argument("--lr", type=float, default=lr_default, help=f"learning rate (default: {lr_help})")
    t.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations on the held-out selection half (default: steps/20)")


def add_recipe_args(p: argparse.ArgumentParser, parent: bool = True) -> None:
    """--recipe, for the stages that train (common/recipe.py), and --allow-recipe-mix for those with a parent."""
    from .recipe import DEFAULT, RECIPES
    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", choices=RECIPES, default=DEFAULT,
                   help="default: this tool's recipe; reference: the original study's, as its code ran (z-score, "
                        "SAE without b_dec or decoder-norm constraint and with its init, Adam 1e-4 eps 1e-5, "
                        "clip 1.0, LinearLR 1.0 -> 0.1 over 80%% of the steps, its batch sizes, no AuxK, the NFM's "
                        "inits; common/recipe.py). It sets those flags' defaults; explicit flags still win "
                        "(default: %(default)s)")
    if parent:
        g.add_argument("--allow-recipe-mix", action="store_true",
                       help="accept a parent checkpoint trained with another --recipe (default: refuse)")


def add_defect_args(p: argparse.ArgumentParser, stage: str) -> None:
    """--defects: the original study's evaluation defects that apply to this stage, as switches (common/recipe.py)."""
    from .recipe import DEFECTS
    ok = [n for n, (_, stages) in DEFECTS.items() if stage in stages]
    p.add_argument("--defects", default="",
                   help="reproduce the original study's evaluation defects, comma-separated, for its ladder "
                        f"(reproduce_reference.py): {', '.join(ok)}; every figure is then flagged as such "
                        "(default: none)")


_ANNOUNCED: list[str] = []


def announce_defects(names) -> None:
    """Print the switches that are on, loudly, now and again beside the results (`report`)."""
    from .recipe import DEFECTS
    _ANNOUNCED[:] = list(names)
    if names:
        print(_defect_banner(DEFECTS), flush=True)


def _defect_banner(defects: dict) -> str:
    bar = "!" * 100
    lines = [f"!!! REFERENCE DEFECT ON: {n}: {defects[n][0]}" for n in _ANNOUNCED]
    return "\n".join([bar, *lines, "!!! the figures of this run reproduce the original study's defect(s); they are not "
                      "this tool's", bar])


def add_precompute_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precompute-mb", type=float, default=1024,
                   help="what this stage derives from each training row (codes, residuals, hidden layers) is computed "
                        "once and kept in memory when it takes at most this many MB, else recomputed per batch on "
                        "the device, so memory stays bounded at any --train-tokens; same values either way; 0 always "
                        "streams (default: 1024)")


def total_steps(args, n_train: int) -> int:
    """--steps, or --epochs passes over n_train rows."""
    return args.steps or max(1, int(args.epochs * n_train / args.batch_size))


def eval_every(args, steps: int) -> int:
    return args.eval_every or max(1, steps // 20)


def parse(p: argparse.ArgumentParser, argv=None, stage: str = "part1") -> argparse.Namespace:
    """Parse with presets: `--preset NAME` (and `--recipe reference`) change this stage's defaults, explicit
    flags still win."""
    pre, _ = p.parse_known_args(argv)
    preset = getattr(pre, "preset", None)
    known = {a.dest for a in p._actions}
    if preset:
        p.set_defaults(**{k: v for k, v in PRESETS[preset][stage].items() if k in known})
    if getattr(pre, "recipe", None) == "reference":           # after the preset: the reference's batch sizes win
        from .recipe import FLAG_DEFAULTS
        p.set_defaults(**{k: v for k, v in FLAG_DEFAULTS.get(stage, {}).items() if k in known})
    args = p.parse_args(argv)
    if hasattr(args, "defects"):
        from .recipe import parse_defects
        args.defects = list(parse_defects(args.defects, stage))
        announce_defects(args.defects)          # every stage with switches announces them here, before any work
    for name in ("train_tokens", "val_tokens", "seq_len", "lm_batch_size", "batch_size", "steps", "checkpoint_every",
                 "n_latents", "k", "nfm_dim", "nfm_hidden", "expansion", "docs", "top", "n_prompts", "n_examples",
                 "n_score"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")
    k, n = getattr(args, "k", None), getattr(args, "n_latents", None)
    if k is not None and n is not None and k > n:      # before any collection (SAEConfig checks it again)
        raise UserError(f"--k {k} exceeds --n-latents {n}; choose k <= n_latents")
    if getattr(args, "device", None) not in (None, "auto"):
        env_device(args.device)      # an unavailable device fails here, before any collection or output
    return args


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# files whose presence means a folder holds a run (a stage's results or an interrupted run's training state)
RUN_MARKERS = ("config.json", "metrics.json", "results.json", "train_state")
STATE_DIR = "train_state"
# flags that may change between an interrupted run and its --resume without changing what is computed
RESUME_FREE = {"resume", "force", "overwrite", "checkpoint_every", "device", "lm_batch_size", "cache_dir",
               "cache_shard_tokens"}


def prepare_out(out: str | Path, args: argparse.Namespace | None = None) -> Path:
    """Check --out before any work: refuse a folder holding another run unless --overwrite (or --resume, which
    must match the interrupted run's flags unless --force). Creates the folder; writes and deletes nothing."""
    from . import dist
    if dist.env_world() > 1 and not dist.initialized():
        raise UserError("this stage does not train under torchrun (only part1, part2 and part5 do); run it with python")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    held = [m for m in RUN_MARKERS if (out / m).exists()]
    if getattr(args, "force", False) and not getattr(args, "resume", False):
        raise UserError("--force only applies with --resume; drop it, or add --resume")
    if getattr(args, "resume", False):
        run_file = out / STATE_DIR / "run.json"
        if not run_file.is_file():
            what = "a finished run" if (out / "config.json").exists() else "no interrupted run"
            raise UserError(f"--resume: {out} holds {what} (no {STATE_DIR}/run.json); drop --resume to start a new run"
                            + (" (with --overwrite)" if held else ""))
        try:
            saved = json.loads(run_file.read_text())["args"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"--resume: {run_file} is corrupt; start a new run with --overwrite") from None
        changed = {k: [saved.get(k), v] for k, v in run_args(args).items() if saved.get(k) != v}
        changed.update({k: [v, None] for k, v in saved.items() if k not in run_args(args)})
        if changed and not args.force:
            diff = ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in sorted(changed.items()))
            raise UserError(f"--resume with flags that differ from the interrupted run's ({diff}); rerun with the "
                            f"original flags, or add --force to continue anyway (recorded in metrics.json)")
        args.resume_changed = changed
    elif held and not getattr(args, "overwrite", False):
        raise UserError(f"--out {out} already holds a run ({held[0]}); pass --overwrite to replace it"
                        + (", --resume to continue it" if hasattr(args, "resume") else "") + ", or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror}; choose another --out") from None
    dist.barrier()          # under torchrun: every rank has checked --out before rank 0 writes anything there
    return out


def resume_record(args: argparse.Namespace) -> dict:
    """What metrics.json records about a resumed run (the flags changed under --force), or nothing."""
    if not getattr(args, "resume", False):
        return {}
    return {"resumed": True, "resumed_with_changed_flags": getattr(args, "resume_changed", {})}


def run_args(args: argparse.Namespace) -> dict:
    """The flags that define what a run computes (compared on --resume)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_FREE and k != "resume_changed"}


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    from .checkpoint import atomic_write_bytes
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def report(out: Path, metrics_file: Path, pngs: list[Path]) -> None:
    """Tell the user where the results are (and, loudly, which reference defects were on)."""
    if _ANNOUNCED:
        from .recipe import DEFECTS
        print("\n" + _defect_banner(DEFECTS))
    print(f"\nresults in {out}/")
    print(f"  metrics: {metrics_file}")
    for p in pngs:
        print(f"  {'plot:' if str(p).endswith('.png') else 'file:':8s} {p}")


def env_device(name: str) -> str:
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no CUDA GPU; use --device cpu or install a CUDA build of torch")
    return name


def lm_dtype(name: str, device: str):
    import torch
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in table:
        raise UserError(f"unknown --dtype {name!r}; use auto, float32, float16 or bfloat16")
    return table[name]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
