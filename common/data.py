"""Text sources, the document-level split, tokenisation, activation collection, activation files.

Text sources (`--dataset`):
  wikitext-103 / wikitext-2   `datasets.load_dataset("wikitext", "wikitext-10x-raw-v1")`, streamed; the
                              official train / validation splits (both split by article), rows grouped
                              back into articles at their " = Title = " headings.
  demo                        the embedded demo corpus (common/demo.py).
  PATH                        a .txt file or a folder of .txt files, read with the same `datasets` loader
                              (`load_dataset("text", sample_by="paragraph")`): documents are blank-line-
                              separated blocks, assigned to validation by a hash of their content, so the
                              split is by document, never by token, and stable across runs.
Each document is tokenised without special tokens and cut into sequences [BOS] + (seq_len - 1) tokens.
BOS and pad positions are excluded from the data unless --keep-bos.

Activation files: safetensors with one [n, d] tensor `activations` (float16 / bfloat16 / float32) and an
optional int64 [n] `doc_ids`. Collected activations are cached in this format.
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .checkpoint import atomic_save_tensors
from .cli import DEFAULT_TRAIN_TOKENS, DEFAULT_VAL_TOKENS, UserError

WIKITEXT = {"wikitext-103": "wikitext-103-raw-v1", "wikitext-2": "wikitext-2-raw-v1"}
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class DataSpec:
    """Everything that determines which activation vectors a stage sees (saved in each checkpoint)."""
    model: str
    layer: int
    dataset: str
    seq_len: int
    keep_bos: bool = False
    val_fraction: float = 0.1

    @classmethod
    def from_args(cls, a) -> "DataSpec":
        return cls(model=a.model, layer=a.layer, dataset=a.dataset, seq_len=a.seq_len,
                   keep_bos=a.keep_bos, val_fraction=a.val_fraction)

    @classmethod
    def from_description(cls, desc: dict) -> "DataSpec | None":
        """The spec a parent checkpoint was trained on (None if it was trained on an activation file)."""
        if desc.get("source") != "model":
            return None
        return cls(**{k: desc[k] for k in ("model", "layer", "dataset", "seq_len", "keep_bos", "val_fraction")})


# ----------------------------------------------------------------------------------------------- text

def _is_val_doc(text: str, val_fraction: float) -> bool:
    return (zlib.crc32(text.encode("utf-8")) % 100_000) < val_fraction * 100_000


def _wikitext_articles(rows: Iterator[str]) -> Iterator[str]:
    heading = re.compile(r"^ = [^=].* = $")
    buf: list[str] = []
    for line in rows:
        if heading.match(line.rstrip("\n")) and any(s.strip() for s in buf):
            yield "".join(buf).strip()
            buf = []
        buf.append(line)
    if any(s.strip() for s in buf):
        yield "".join(buf).strip()


def iter_documents(dataset: str, split: str, val_fraction: float) -> Iterator[str]:
    """Documents of one split ('train' or 'validation'), in a fixed order."""
    import datasets

    if split not in ("train", "validation"):
        raise ValueError(split)
    if dataset in WIKITEXT:
        try:
            ds = datasets.load_dataset("wikitext", WIKITEXT[dataset], split=split, streaming=True)
        except Exception as e:  # network / hub failures: one line, not a trace
            raise UserError(f"--dataset {dataset}: could not load from the HF hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); check the network or pass a local text path") from None
        yield from _wikitext_articles(row["text"] for row in ds)
        return
    if dataset == "demo":
        from .demo import ensure_demo_model
        path = ensure_demo_model() / "corpus.txt"
    else:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise UserError(f"unknown --dataset {dataset!r}: use wikitext-103, wikitext-2, demo, or a path to a "
                            f".txt file or folder of .txt files")
    files = sorted(str(f) for f in path.rglob("*.txt")) if path.is_dir() else [str(path)]
    if not files:
        raise UserError(f"--dataset {dataset}: the folder holds no .txt files")
    ds = datasets.load_dataset("text", data_files=files, sample_by="paragraph", split="train")
    want_val = split == "validation"
    n = 0
    for row in ds:
        text = row["text"].strip()
        if text and _is_val_doc(text, val_fraction) == want_val:
            n += 1
            yield text
    if n == 0:
        raise UserError(f"--dataset {dataset}: no non-empty {split} documents (documents are blank-line-"
                        f"separated blocks; {split} gets about {val_fraction if want_val else 1 - val_fraction:.0%})")


def iter_sequences(tokenizer, docs: Iterator[str], seq_len: int) -> Iterator[tuple[list[int], int]]:
    """(token ids, document index): [BOS] + up to seq_len-1 tokens per sequence, never crossing documents."""
    bos = tokenizer.bos_token_id
    body = seq_len - (1 if bos is not None else 0)
    if body < 1:
        raise UserError(f"--seq-len {seq_len} is too short")
    for di, doc in enumerate(docs):
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]  # long docs are chunked below
        for s in range(0, len(ids), body):
            piece = ids[s:s + body]
            if len(piece) < 2:
                continue
            yield ([bos] + piece if bos is not None else piece), di


def batch_sequences(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask, both [batch, pos]."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def keep_mask(tokenizer, attention_mask: torch.Tensor, keep_bos: bool) -> torch.Tensor:
    """Positions that enter the data: real tokens, minus position 0 (BOS) unless keep_bos. [batch, pos]."""
    keep = attention_mask.bool().clone()
    if tokenizer.bos_token_id is not None and not keep_bos:
        keep[:, 0] = False
    return keep


# ---------------------------------------------------------------------------------------- collection

@torch.no_grad()
def collect_activations(model, tokenizer, spec: DataSpec, split: str, max_tokens: int, lm_batch_size: int,
                        desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-`spec.layer` activations of up to max_tokens kept positions: ([n, d], doc_ids [n])."""
    from .hooks import collect

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    store_dtype = torch.float32 if next(model.parameters()).dtype == torch.float32 else next(model.parameters()).dtype
    chunks, doc_chunks, n = [], [], 0
    seqs = iter_sequences(tokenizer, iter_documents(spec.dataset, split, spec.val_fraction), spec.seq_len)
    bar = tqdm(total=max_tokens, desc=desc or f"collect {split} layer {spec.layer}", unit="tok", leave=False)
    done = False
    while not done:
        batch = []
        for s in seqs:
            batch.append(s)
            if len(batch) == lm_batch_size:
                break
        if not batch:
            break
        ids, mask = batch_sequences([b[0] for b in batch], pad)
        h = collect(model, spec.layer, ids.to(device), mask.to(device))  # [batch, pos, d_model]
        keep = keep_mask(tokenizer, mask, spec.keep_bos).to(device)
        docs = torch.tensor([b[1] for b in batch], device=device)[:, None].expand_as(keep)
        acts, dids = h[keep], docs[keep]
        if n + acts.shape[0] >= max_tokens:
            acts, dids, done = acts[:max_tokens - n], dids[:max_tokens - n], True
        chunks.append(acts.to("cpu", store_dtype))
        doc_chunks.append(dids.cpu())
        n += acts.shape[0]
        bar.update(acts.shape[0])
    bar.close()
    if n == 0:
        raise UserError(f"--dataset {spec.dataset}: the {split} split gave no tokens; use a larger text source")
    return torch.cat(chunks), torch.cat(doc_chunks)


def model_fingerprint(path: str) -> str:
    """Changes whenever the model folder's weights change (name, size, mtime), or the hub id."""
    p = Path(path)
    if not p.is_dir():
        return path
    parts = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir())
             if f.suffix in (".safetensors", ".bin", ".json")]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def cached_activations(spec: DataSpec, split: str, max_tokens: int, lm_batch_size: int, cache_dir: str,
                       dtype: str, device: str, lm: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Collect (or reuse from the cache) activations for one split. `lm` memoises the loaded model."""
    from .models import load_model, resolve_model_path

    path = resolve_model_path(spec.model)
    key = json.dumps({**asdict(spec), "model": model_fingerprint(path), "split": split, "n": max_tokens,
                      "dtype": dtype}, sort_keys=True)
    fname = Path(cache_dir) / f"acts-{hashlib.sha256(key.encode()).hexdigest()[:20]}-{split}.safetensors" if cache_dir else None
    if fname is not None and fname.is_file():
        acts, docs = load_activation_file(fname, "cache")
        return acts, docs
    if "model" not in lm:
        lm["model"], lm["tokenizer"], _ = load_model(spec.model, dtype, device)
        from .hooks import block_for_layer
        block_for_layer(lm["model"], spec.layer)  # range check before any work
    acts, docs = collect_activations(lm["model"], lm["tokenizer"], spec, split, max_tokens, lm_batch_size)
    if fname is not None:
        save_activation_file(fname, acts, docs, {"spec": key})
    return acts, docs


# ------------------------------------------------------------------------------------ activation files

def save_activation_file(path: Path, acts: torch.Tensor, doc_ids: torch.Tensor | None = None,
                         meta: dict | None = None) -> None:
    tensors = {"activations": acts}
    if doc_ids is not None:
        tensors["doc_ids"] = doc_ids.long()
    atomic_save_tensors(Path(path), tensors, metadata={k: str(v) for k, v in (meta or {}).items()})


def load_activation_file(path: str | Path, flag: str, width: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read and validate an activation file; every problem is a one-line UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {p}: no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = set(f.keys())
            if "activations" not in keys:
                raise UserError(f"{flag} {p}: no tensor named 'activations' (found: {', '.join(sorted(keys)) or 'none'}); "
                                f"save one [n, d] tensor under that name")
            acts = f.get_tensor("activations")
            docs = f.get_tensor("doc_ids") if "doc_ids" in keys else None
    except SafetensorError as e:
        raise UserError(f"{flag} {p}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if acts.ndim != 2:
        raise UserError(f"{flag} {p}: 'activations' has shape {tuple(acts.shape)}; expected 2-D [n_tokens, d_model]")
    if acts.dtype not in ACT_DTYPES:
        raise UserError(f"{flag} {p}: 'activations' has dtype {acts.dtype}; expected float16, bfloat16 or float32")
    if width is not None and acts.shape[1] != width:
        raise UserError(f"{flag} {p}: activations have width {acts.shape[1]}, but the model expects d={width}; "
                        f"pass activations from the same layer and model")
    if acts.shape[0] == 0:
        raise UserError(f"{flag} {p}: the file holds no rows")
    for s in range(0, acts.shape[0], 65536):
        if not torch.isfinite(acts[s:s + 65536]).all():
            raise UserError(f"{flag} {p}: 'activations' contains NaN or inf (first bad block at row {s}); clean the file")
    if docs is not None and (docs.ndim != 1 or docs.shape[0] != acts.shape[0]):
        raise UserError(f"{flag} {p}: 'doc_ids' must be 1-D with one entry per row")
    return acts, docs


def split_rows(acts: torch.Tensor, docs: torch.Tensor | None, val_fraction: float = 0.1):
    """Hold out the last rows of a single activation file: whole documents if doc_ids exist."""
    n = acts.shape[0]
    cut = int(round(n * (1 - val_fraction)))
    if docs is not None:
        cut_doc = docs[min(cut, n - 1)]
        first = int(torch.nonzero(docs == cut_doc)[0])
        cut = first if first > 0 else cut
    if cut <= 0 or cut >= n:
        raise UserError(f"--activations: {n} rows are too few to hold out a validation part; pass more rows or "
                        f"--val-activations")
    return (acts[:cut], None if docs is None else docs[:cut]), (acts[cut:], None if docs is None else docs[cut:])


@dataclass
class Activations:
    train: torch.Tensor  # [n_train, d]
    val: torch.Tensor    # [n_val, d]
    train_docs: torch.Tensor | None
    val_docs: torch.Tensor | None
    description: dict


def get_activations(args, spec: DataSpec | None, width: int | None = None, lm: dict | None = None,
                    parent: dict | None = None) -> Activations:
    """Train/val activations from --activations files, or collected through the LM (cached).

    `parent` is the data description of the checkpoint this stage builds on: if its LM has changed on
    disk since (e.g. the demo was rebuilt), the stage refuses to mix the two."""
    lm = {} if lm is None else lm
    if args.activations:
        acts, docs = load_activation_file(args.activations, "--activations", width)
        if args.val_activations:
            vacts, vdocs = load_activation_file(args.val_activations, "--val-activations", acts.shape[1])
            (tr, trd), (va, vad) = (acts, docs), (vacts, vdocs)
        else:
            (tr, trd), (va, vad) = split_rows(acts, docs)
        n_tr, n_va = args.train_tokens or tr.shape[0], args.val_tokens or va.shape[0]
        tr, va = tr[:n_tr], va[:n_va]
        trd = trd[:n_tr] if trd is not None else None
        vad = vad[:n_va] if vad is not None else None
        desc = {"source": "activation_file", "activations": str(Path(args.activations).resolve()),
                "val_activations": str(Path(args.val_activations).resolve()) if args.val_activations else None,
                "split": "file" if args.val_activations else ("last documents" if docs is not None else "last rows")}
        return Activations(tr, va, trd, vad, {**desc, "train_tokens": tr.shape[0], "val_tokens": va.shape[0]})
    if spec is None:
        raise UserError("this stage's parent was trained on an activation file; pass --activations FILE")
    from .models import resolve_model_path
    fingerprint = model_fingerprint(resolve_model_path(spec.model))
    if parent is not None and parent.get("model_fingerprint") not in (None, fingerprint):
        raise UserError(f"the model {spec.model} has changed on disk since the parent checkpoint was trained; "
                        f"retrain from part1 (or restore that model)")
    common = dict(lm_batch_size=args.lm_batch_size, cache_dir=args.cache_dir, dtype=args.dtype,
                  device=args.device, lm=lm)
    tr, trd = cached_activations(spec, "train", args.train_tokens or DEFAULT_TRAIN_TOKENS, **common)
    va, vad = cached_activations(spec, "validation", args.val_tokens or DEFAULT_VAL_TOKENS, **common)
    if width is not None and tr.shape[1] != width:
        raise UserError(f"layer {spec.layer} of {spec.model} has width {tr.shape[1]}, but the parent model expects {width}")
    desc = {"source": "model", **asdict(spec), "model_fingerprint": fingerprint, "split": "by document",
            "train_tokens": tr.shape[0], "val_tokens": va.shape[0]}
    return Activations(tr, va, trd, vad, desc)


@torch.no_grad()
def collect_sentences(model, tokenizer, sentences: list[str], layer: int, keep_bos: bool = False,
                      batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-L activations of every kept token of every sentence: ([n_tokens, d], sentence index [n_tokens]).
    Each sentence is one sequence [BOS] + tokens, as in training; BOS and pads are dropped unless keep_bos."""
    from .hooks import collect

    device = next(model.parameters()).device
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acts, owner = [], []
    for s in range(0, len(sentences), batch_size):
        seqs = [([bos] if bos is not None else []) + tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in sentences[s:s + batch_size]]
        ids, mask = batch_sequences(seqs, pad)
        h = collect(model, layer, ids.to(device), mask.to(device))                # [batch, pos, d_model]
        keep = keep_mask(tokenizer, mask, keep_bos).to(device)
        rows = torch.arange(s, s + len(seqs), device=device)[:, None].expand_as(keep)
        acts.append(h[keep].float().cpu())
        owner.append(rows[keep].cpu())
    return torch.cat(acts), torch.cat(owner)


def per_sentence(values: torch.Tensor, owner: torch.Tensor, n_sentences: int, how: str = "mean") -> torch.Tensor:
    """Aggregate token rows [n_tokens, m] into sentence rows [n_sentences, m] by mean or max."""
    out = torch.zeros(n_sentences, values.shape[1], dtype=torch.float64)
    if how == "mean":
        out.index_add_(0, owner, values.double())
        return (out / torch.bincount(owner, minlength=n_sentences).clamp_min(1)[:, None]).float()
    if how == "max":
        out.fill_(-float("inf"))
        out = out.scatter_reduce(0, owner[:, None].expand_as(values), values.double(), reduce="amax")
        return out.float()
    raise UserError(f"unknown --aggregate {how!r}; use mean or max")


def per_sentence_codes(idx: torch.Tensor, val: torch.Tensor, owner: torch.Tensor, n_sentences: int, n_latents: int,
                       how: str = "mean") -> torch.Tensor:
    """per_sentence for a sparse top-k code (idx, val) [n_tokens, k] without a dense [n_tokens, n_latents]
    table: [n_sentences, n_latents]. Inactive tokens count as 0 (codes are >= 0, so max starts at 0)."""
    flat = (owner[:, None] * n_latents + idx).reshape(-1)
    v = val.reshape(-1).double()
    out = torch.zeros(n_sentences * n_latents, dtype=torch.float64)
    if how == "mean":
        out.index_add_(0, flat, v)
        out = out.view(n_sentences, n_latents) / torch.bincount(owner, minlength=n_sentences).clamp_min(1)[:, None]
        return out.float()
    if how == "max":
        return out.scatter_reduce(0, flat, v, reduce="amax").view(n_sentences, n_latents).float()
    raise UserError(f"unknown --aggregate {how!r}; use mean or max")
