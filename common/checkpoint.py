"""Checkpoints: safetensors weights plus a JSON config, written atomically, never unpickled.

A stage's `--out DIR` holds
    model.safetensors   the weights (and the normalisation tensors `norm.shift`, `norm.scale`)
    config.json         {"kind", "hparams", "data", "parents", "content_hash", ...}
    metrics.json, *.png

`content_hash` is the SHA-256 of model.safetensors. A child checkpoint records the content hash of each
parent it was trained on, so a later stage can refuse a mismatched pair (an NFM given another SAE).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """save_file into a temporary sibling, then rename: a crash never leaves a truncated file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(out_dir: Path, kind: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    """Write weights then config (config last: a folder with a config.json is complete). Returns the hash."""
    out_dir = Path(out_dir)
    atomic_save_tensors(out_dir / WEIGHTS, tensors)
    digest = file_hash(out_dir / WEIGHTS)
    cfg = {"kind": kind, **config, "content_hash": digest}
    atomic_write_bytes(out_dir / CONFIG, (json.dumps(cfg, indent=2) + "\n").encode())
    return digest


def load(ckpt_dir: str | Path, kind: str, flag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint folder of the given kind; every failure is a one-line UserError naming `flag`."""
    d = Path(ckpt_dir)
    if not d.exists():
        raise UserError(f"{flag} {d}: no such directory; pass the --out folder of the stage that trained it")
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise UserError(f"{flag} {d}: no {CONFIG} + {WEIGHTS} there; pass the --out folder of a finished run")
    try:
        cfg = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} {d}: {CONFIG} is not valid JSON ({e.msg}); the checkpoint is corrupt, retrain it") from None
    if cfg.get("kind") != kind:
        raise UserError(f"{flag} {d} holds a {cfg.get('kind')!r} checkpoint, not a {kind!r}; pass the right folder")
    try:
        tensors = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{flag} {d}: {WEIGHTS} cannot be read ({str(e).splitlines()[0]}); the checkpoint is corrupt, retrain it") from None
    digest = file_hash(d / WEIGHTS)
    if cfg.get("content_hash") != digest:
        raise UserError(f"{flag} {d}: {WEIGHTS} does not match the hash in {CONFIG}; the folder mixes two runs, retrain it")
    cfg["path"] = str(d.resolve())
    return tensors, cfg


def parent_ref(cfg: dict) -> dict:
    """What a child records about a parent checkpoint."""
    return {"path": cfg["path"], "content_hash": cfg["content_hash"], "kind": cfg["kind"]}


def check_parent(child_cfg: dict, role: str, given_cfg: dict, child_flag: str, given_flag: str) -> None:
    """Refuse a parent other than the one the child was trained on."""
    want = child_cfg["parents"][role]
    if want["content_hash"] != given_cfg["content_hash"]:
        raise UserError(
            f"{child_flag} {child_cfg['path']} was trained on the {role} at {want['path']} "
            f"(hash {want['content_hash'][:12]}), but {given_flag} {given_cfg['path']} has hash "
            f"{given_cfg['content_hash'][:12]}; pass the {role} it was trained on")
