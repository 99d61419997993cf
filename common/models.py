"""Loading the language model and tokenizer: an HF id, a local folder, or 'demo'.

Every path goes through `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, so the
embedded demo model is loaded exactly like OpenLLaMA-3B.
"""
from __future__ import annotations

from pathlib import Path

from .cli import UserError, env_device, lm_dtype


def resolve_model_path(spec: str) -> str:
    """'demo' -> the embedded demo folder (built on first use); a local folder; or an HF hub id."""
    if spec == "demo":
        from .demo import ensure_demo_model
        return str(ensure_demo_model())
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"--model {spec}: the folder has no config.json; pass a Hugging Face model folder")
        return str(p)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_like_path:
        raise UserError(f"--model {spec}: no such folder; pass a local model folder, an HF id like "
                        f"openlm-research/open_llama_3b, or 'demo'")
    return spec  # an HF hub id


def _load_tokenizer(auto, path: str):
    # OpenLLaMA's model card: "avoid the HF fast tokenizer ... the auto-converted fast tokenizer sometimes
    # gives incorrect tokenizations". Use its sentencepiece (slow) tokenizer where it can be built.
    if "open_llama" in path.lower():
        try:
            return auto.from_pretrained(path, use_fast=False)
        except (ImportError, ValueError, OSError) as e:
            print(f"warning: OpenLLaMA's slow tokenizer could not be loaded ({type(e).__name__}); using the fast one")
    return auto.from_pretrained(path)


def load_model(spec: str, dtype: str = "auto", device: str = "auto"):
    """Returns (model in eval mode with grads off, tokenizer, resolved path/id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    dev = env_device(device)
    dt = lm_dtype(dtype, dev)
    try:
        tok = _load_tokenizer(AutoTokenizer, path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {spec}: could not load ({first}); check the id or download it first "
                        f"(setup-windows/download_openllama3b.ps1, or huggingface-cli download)") from None
    model.to(dev).eval()
    model.requires_grad_(False)
    return model, tok, path
