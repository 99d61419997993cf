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
from safetensors.torch import load_file

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


ST_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                  torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                  torch.bool: "BOOL"}
# safetensors orders tensors by its Dtype enum, descending, then by name: this is that enum's order
_ST_ORDER = {name: i for i, name in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"))}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """The safetensors format, written tensor by tensor straight from each tensor's memory. safetensors' own
    save_file first copies every tensor into a Python bytes object, so saving a training state (model, Adam
    moments, best state: 2.8 GB for part2's NFM at the paper preset) needed as much again in host memory.
    Layout as save_file: tensors by safetensors' dtype order then name, contiguous offsets, header padded to 8."""
    items = [(k, v.detach()) for k, v in tensors.items()]
    if any(t.dtype not in ST_DTYPE_NAMES for _, t in items):
        raise ValueError(f"dtypes not stored: {sorted({str(t.dtype) for _, t in items} - set(map(str, ST_DTYPE_NAMES)))}")
    items.sort(key=lambda kv: (-_ST_ORDER[ST_DTYPE_NAMES[kv[1].dtype]], kv[0]))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in items:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """save_file into a temporary sibling, then rename: a crash never leaves a truncated file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_safetensors(tmp, tensors, metadata)
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
    return save_config(out_dir, kind, config, save_weights(out_dir, tensors))


def save_weights(out_dir: Path, tensors: dict[str, torch.Tensor]) -> str:
    """The first half of `save`: the weights alone (the folder is not complete yet). Returns their hash, for
    `save_config`. Lets a stage write a model and free it before its other work is done."""
    atomic_save_tensors(Path(out_dir) / WEIGHTS, tensors)
    return file_hash(Path(out_dir) / WEIGHTS)


def save_config(out_dir: Path, kind: str, config: dict, digest: str) -> str:
    """The second half of `save`: the config.json that marks the folder complete."""
    cfg = {"kind": kind, **config, "content_hash": digest}
    atomic_write_bytes(Path(out_dir) / CONFIG, (json.dumps(cfg, indent=2) + "\n").encode())
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
