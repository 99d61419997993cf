"""SAELens interop for the primary TopK SAE: export to, and import from, SAELens 6.x's on-disk format.

A SAELens SAE folder holds
    cfg.json                  {"architecture": "topk", "d_in", "d_sae", "k", "dtype", "device",
                               "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
                               "rescale_acts_by_decoder_norm", "metadata": {"model_name", "hook_name", ...}}
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
and SAELens's TopK SAE (sae_lens/saes/topk_sae.py) computes, on RAW activations x:
    pre   = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc       (times ||W_dec rows|| if rescale_...)
    f     = ReLU of the top-k of pre, zero elsewhere
    x_hat = f @ W_dec + b_dec                                        (f / ||W_dec rows|| if rescale_...)
Ours (common/sae.py) computes the same on NORMALISED activations x_norm = (x - shift) / scale, with
W_enc [n, d] (one row per latent) and x_hat = x_hat_norm * scale + shift. Both maps are affine and
elementwise, so export folds the normalisation into the weights (as SAELens's own
`fold_activation_norm_scaling_factor` does for its scalar factor) and the SAELens SAE maps raw x to raw x_hat:
    W_enc_sl = (W_enc / scale).T      b_enc_sl = b_enc      W_dec_sl = W_dec * scale      b_dec_sl = b_dec * scale + shift
(x_norm - b_dec = (x - b_dec_sl) / scale, so the pre-activations, the top-k picks and the codes are unchanged.)

Import maps a SAELens TopK folder onto our TopKSAE in raw space with an identity normaliser ("none"), folding
exactly what SAELens does at run time: rescale_acts_by_decoder_norm (as SAELens's own `_fold_norm_topk`) and
apply_b_dec_to_input = false (ours always subtracts b_dec before the encoder: b_enc += W_enc_sl.T @ b_dec).
Anything else we cannot represent exactly is refused with a one-line UserError. `load_sae_checkpoint`
(common/sae.py) calls `load_saelens` for such a folder, so `--sae FOLDER` works in part2 and later stages.

    python -m common.saelens export --sae checkpoints/part1_sae --out checkpoints/part1_sae_saelens
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

from .cli import DEFAULT_TRAIN_TOKENS, UserError

SL_CFG = "cfg.json"
SL_WEIGHTS = "sae_weights.safetensors"
OUR_CFG = "config.json"
# SAELens reads a cfg without a version (or below 6.0) as a pre-6 config and rebuilds it from top-level keys,
# which would drop our metadata block; this is the format version we write (checked against sae-lens 6.54.12).
SAELENS_FORMAT_VERSION = "6.0.0"
# metadata keys SAELens < 6 kept at the top level of cfg.json (sae_lens/loading/pretrained_sae_loaders.py)
_LEGACY_METADATA = ("model_name", "hook_name", "hook_point", "hook_head_index", "context_size", "prepend_bos",
                    "dataset_path", "model_class_name", "sae_lens_version", "sae_lens_training_version")
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_OUR_DATASETS = ("wikitext-103", "wikitext-2", "demo")


# ------------------------------------------------------------------------------------------------ export

def export_saelens(sae_dir: str | Path, out_dir: str | Path) -> Path:
    """Write our part1-style SAE at `sae_dir` as a SAELens TopK folder (cfg.json + sae_weights.safetensors)."""
    from .checkpoint import atomic_save_tensors, atomic_write_bytes, file_hash
    from .hooks import hook_name
    from .sae import load_topk_sae

    out = Path(out_dir)
    if out.resolve() == Path(sae_dir).resolve():
        raise UserError(f"--out {out} is the --sae folder itself; pass a new folder for the SAELens copy")
    if (out / OUR_CFG).exists():   # a folder with both configs would no longer be recognised as SAELens
        raise UserError(f"--out {out} holds one of our checkpoints ({OUR_CFG}); pass a new folder")
    sae, norm, cfg = load_topk_sae(sae_dir, "--sae")

    # fold in float64 so the only rounding is the final cast to float32
    scale, shift = norm.scale.double(), norm.shift.double()
    W_enc, b_enc = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    W_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    weights = {"W_enc": (W_enc / scale).T, "b_enc": b_enc,                   # [d, n], [n]
               "W_dec": W_dec * scale[None, :], "b_dec": b_dec * scale + shift}  # [n, d], [d]
    weights = {k: v.float().contiguous() for k, v in weights.items()}

    data = cfg.get("data") or {}
    from_model = data.get("source") == "model"
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,              # trained by this project, not by SAELens
        # an HF id or local folder loaded with transformers' AutoModelForCausalLM (not a TransformerLens alias)
        "model_name": data.get("model") if from_model else None,
        "model_class_name": "AutoModelForCausalLM" if from_model else None,
        # our layer L = hidden_states[L] = output of block L-1 (common/hooks.py)
        "hook_name": hook_name(data["layer"]) if from_model else None,
        "hook_head_index": None,
        "context_size": data.get("seq_len") if from_model else None,
        "prepend_bos": True,                            # every sequence is [BOS] + tokens (common/data.py)
        # the BOS position is left out of the data unless --keep-bos: SAELens's seqpos_slice says the same
        "seqpos_slice": [None] if data.get("keep_bos") else [1, None],
        "disable_concat_sequences": True,               # sequences never cross documents
        "dataset_path": data.get("dataset") if from_model else None,
        # our own provenance, read back by load_saelens so a round trip keeps every DataSpec field
        "feature_integration": {"data": data, "normalize": cfg.get("normalize"),
                                "source_content_hash": cfg["content_hash"]},
    }
    sl_cfg = {"architecture": "topk", "d_in": sae.cfg.d, "d_sae": sae.cfg.n_latents, "k": sae.cfg.k,
              "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
              "normalize_activations": "none",          # folded into the weights above
              "reshape_activations": "none", "rescale_acts_by_decoder_norm": False, "metadata": metadata}
    # weights first, cfg.json last: a folder with a cfg.json is complete (as common.checkpoint.save)
    atomic_save_tensors(out / SL_WEIGHTS, weights)
    atomic_write_bytes(out / SL_CFG, (json.dumps(sl_cfg, indent=2) + "\n").encode())
    print(f"SAELens TopK SAE (d_in={sae.cfg.d}, d_sae={sae.cfg.n_latents}, k={sae.cfg.k}, normalisation "
          f"'{cfg.get('normalize')}' folded in; sha256 {file_hash(out / SL_WEIGHTS)[:12]}):\n"
          f"  {out / SL_CFG}\n  {out / SL_WEIGHTS}")
    if not from_model:
        print("note: the SAE was trained on an activation file, so model_name / hook_name are left empty")
    return out


# ------------------------------------------------------------------------------------------------ import

def is_saelens_dir(path) -> bool:
    """A SAELens folder: cfg.json and none of our config.json. (A missing sae_weights.safetensors is then
    reported by load_saelens, naming the SAELens file, rather than as a missing config.json.)"""
    p = Path(path)
    return p.is_dir() and (p / SL_CFG).is_file() and not (p / OUR_CFG).exists()


def load_saelens(path, flag: str = "--sae"):
    """(TopKSAE, Normalizer "none", cfg) from a SAELens TopK folder: what load_sae_checkpoint returns."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checkpoint import file_hash
    from .normalize import Normalizer
    from .sae import SAEConfig, TopKSAE

    d = Path(path)
    for name in (SL_CFG, SL_WEIGHTS):
        if not (d / name).is_file():
            raise UserError(f"{flag} {d}: no {name} there; a SAELens SAE folder holds {SL_CFG} + {SL_WEIGHTS} "
                            f"(SAE.save_model writes both)")
    try:
        raw = json.loads((d / SL_CFG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {d}: {SL_CFG} is not valid JSON ({e}); re-save the SAE with SAELens") from None
    if not isinstance(raw, dict):
        raise UserError(f"{flag} {d}: {SL_CFG} is not a JSON object; re-save the SAE with SAELens")
    meta = _metadata(raw)
    arch, k = _architecture(raw)
    if arch != "topk":
        raise UserError(f"{flag} {d}: SAELens architecture {arch!r} is not supported; only 'topk' SAEs map onto "
                        f"this pipeline's TopK SAE (train one with part1 or with SAELens's TopK)")
    norm_mode = raw.get("normalize_activations", "none")
    norm_mode = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm_mode, norm_mode)
    if norm_mode != "none":
        raise UserError(f"{flag} {d}: normalize_activations is {norm_mode!r}; fold it into the weights in SAELens "
                        f"first (e.g. sae.fold_activation_norm_scaling_factor(factor), then save_model) so the "
                        f"SAE reads raw activations")
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise UserError(f"{flag} {d}: reshape_activations {raw['reshape_activations']!r} (attention-head SAEs) is "
                        f"not supported; only residual-stream SAEs map onto this pipeline")
    try:
        d_in, d_sae, k = int(raw["d_in"]), int(raw["d_sae"]), int(k)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{flag} {d}: {SL_CFG} needs integer d_in, d_sae and k; re-save the SAE with SAELens") from None
    if min(d_in, d_sae, k) <= 0 or k > d_sae:
        raise UserError(f"{flag} {d}: {SL_CFG} has d_in={d_in}, d_sae={d_sae}, k={k}; need positive sizes and k <= d_sae")

    try:
        t = load_file(str(d / SL_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{flag} {d}: {SL_WEIGHTS} cannot be read ({str(e).splitlines()[0]}); re-save the SAE") from None
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in want.items():
        if name not in t:
            raise UserError(f"{flag} {d}: {SL_WEIGHTS} has no {name!r} (found {', '.join(sorted(t))}); a SAELens "
                            f"TopK SAE has W_enc, b_enc, W_dec, b_dec")
        if tuple(t[name].shape) != shape:
            raise UserError(f"{flag} {d}: {name} has shape {list(t[name].shape)}, but {SL_CFG} (d_in={d_in}, "
                            f"d_sae={d_sae}) implies {list(shape)}; the folder mixes two SAEs")
    extra = sorted(set(t) - set(want))
    # a finetuning scaling factor of all ones is a no-op SAELens itself drops on load; anything else changes the map
    if extra and not (extra == ["scaling_factor"] and bool((t["scaling_factor"] == 1).all())):
        raise UserError(f"{flag} {d}: {SL_WEIGHTS} holds extra tensors {extra} this TopK mapping cannot represent; "
                        f"fold them in SAELens first")
    W_enc, b_enc, W_dec, b_dec = (t[n].double() for n in want)
    for name, v in zip(want, (W_enc, b_enc, W_dec, b_dec)):
        if not torch.isfinite(v).all():
            raise UserError(f"{flag} {d}: {name} contains NaN or inf; the SAE is corrupt")

    if raw.get("rescale_acts_by_decoder_norm", False):
        # SAELens: pre * ||W_dec_j||, then f / ||W_dec_j|| before the decoder. Scaling encoder column j and
        # b_enc_j by the norm and dividing decoder row j by it gives the same picks, codes and output.
        n = W_dec.norm(dim=1)
        if not bool((n > 0).all()):
            raise UserError(f"{flag} {d}: rescale_acts_by_decoder_norm is true but some W_dec rows are zero; "
                            f"the SAE cannot be folded")
        W_enc, b_enc, W_dec = W_enc * n[None, :], b_enc * n, W_dec / n[:, None]
    if not raw.get("apply_b_dec_to_input", True):
        # SAELens: pre = x W_enc + b_enc. Ours: W (x - b_dec) + b_enc' with W = W_enc.T, so b_enc' = b_enc + W b_dec.
        b_enc = b_enc + b_dec @ W_enc

    cfg = SAEConfig(d=d_in, n_latents=d_sae, k=k)
    sae = TopKSAE.from_tensors({"W_enc": W_enc.T.float().contiguous(), "b_enc": b_enc.float(),
                                "W_dec": W_dec.float().contiguous(), "b_dec": b_dec.float(),
                                "since_fired": torch.zeros(d_sae, dtype=torch.long)}, asdict(cfg))
    norm = Normalizer(torch.zeros(d_in), torch.ones(d_in), "none")
    out_cfg = {"kind": "sae", "hparams": asdict(cfg), "normalize": "none", "data": _data_description(meta, flag, d),
               "parents": {}, "content_hash": file_hash(d / SL_WEIGHTS), "path": str(d.resolve()),
               "format": "saelens",
               "saelens": {k_: raw.get(k_) for k_ in ("architecture", "apply_b_dec_to_input",
                                                       "rescale_acts_by_decoder_norm", "dtype")}}
    return sae, norm, out_cfg


def _metadata(raw: dict) -> dict:
    """SAELens 6 keeps run metadata under "metadata"; older versions at the top level (hook_point = hook_name)."""
    meta = {k: raw[k] for k in _LEGACY_METADATA if k in raw}
    if "hook_point" in meta:
        meta.setdefault("hook_name", meta.pop("hook_point"))
    meta.update(raw.get("metadata") or {})
    return meta


def _architecture(raw: dict) -> tuple[str, object]:
    """(architecture, k). SAELens < 6 wrote no architecture for TopK, but activation_fn(_str) "topk" with k in
    activation_fn_kwargs, and defaulted to "standard" otherwise (handle_pre_6_0_config)."""
    kwargs = raw.get("activation_fn_kwargs") or {}
    act = raw.get("activation_fn", raw.get("activation_fn_str"))
    arch = raw.get("architecture") or ("topk" if act == "topk" else "standard")
    return arch, raw.get("k", kwargs.get("k"))


def _layer(hook: str, flag: str, d: Path) -> int:
    """Our layer L (= hidden_states[L]) for a TransformerLens residual hook name."""
    m = _RESID.match(hook)
    if not m:
        raise UserError(f"{flag} {d}: hook_name {hook!r} is not a residual-stream hook; only blocks.N.hook_resid_post "
                        f"(layer N+1) and blocks.N.hook_resid_pre (layer N) map to a layer here")
    layer = int(m.group(1)) + (1 if m.group(2) == "post" else 0)
    if layer < 1:
        raise UserError(f"{flag} {d}: hook_name {hook!r} is the embedding output (layer 0); this pipeline reads the "
                        f"residual stream after at least one block (blocks.N.hook_resid_post, N >= 0)")
    return layer


def _data_description(meta: dict, flag: str, d: Path) -> dict:
    """What later stages read as cfg["data"] (common.data.DataSpec.from_description and part6's train_tokens).

    A "model" source needs a model, a residual hook, a text source our loader knows and a context size; without
    them the description is not a model source, so a stage that collects activations asks for --activations
    (common.data.get_activations) instead of guessing."""
    hook = meta.get("hook_name")
    layer = _layer(hook, flag, d) if hook else None          # an unsupported hook is refused even then
    model, dataset, ctx = meta.get("model_name"), meta.get("dataset_path"), meta.get("context_size")
    usable = dataset in _OUR_DATASETS or (isinstance(dataset, str) and Path(dataset).expanduser().exists())
    if not (model and layer and usable and ctx):
        missing = [n for n, ok in (("model_name", model), ("hook_name", layer), ("context_size", ctx),
                                   ("a dataset_path this pipeline can read", usable)) if not ok]
        return {"source": "saelens", "model": model, "hook_name": hook, "dataset_path": dataset,
                "note": f"{SL_CFG} lacks {', '.join(missing)}: pass --activations FILE to stages that read activations"}
    derived = {"source": "model", "model": model, "layer": layer, "dataset": dataset, "seq_len": int(ctx),
               # our pipeline always prepends BOS and leaves its position out unless --keep-bos
               "keep_bos": False, "val_fraction": 0.1,
               # part6 re-collects this many training tokens for its covariance baseline; SAELens does not record
               # how many the SAE saw, so the pipeline's default budget stands in
               "train_tokens": DEFAULT_TRAIN_TOKENS, "split": "by document"}
    # our own export carries our description; keep it (val_fraction, keep_bos, model fingerprint, token counts)
    # when the SAELens fields still agree with it
    ours = (meta.get("feature_integration") or {}).get("data") or {}
    if ours.get("source") == "model" and all(ours.get(k) == derived[k] for k in ("model", "layer", "dataset", "seq_len")):
        return ours
    return derived


# ------------------------------------------------------------------------------------------------ CLI

def main(argv=None) -> None:
    from . import cli

    p = cli.parser(__doc__)
    p.prog = "python -m common.saelens"
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a part1 SAE folder as a SAELens TopK folder (cfg.json + sae_weights.safetensors)")
    e.add_argument("--sae", required=True, help="our SAE folder (part1's --out: config.json + model.safetensors)")
    e.add_argument("--out", required=True, help="new folder for the SAELens copy; load it with "
                                                "sae_lens.SAE.load_from_disk(OUT) or pass it as --sae to part2 and later")
    args = p.parse_args(argv)
    if args.command == "export":
        export_saelens(args.sae, args.out)


if __name__ == "__main__":
    from .cli import run_main
    run_main(main)
