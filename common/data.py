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
optional int64 [n] `doc_ids`. Collected activations are cached in this format as resumable shards
(`--cache-dtype`, default bfloat16; see "activation cache" below); `load_activation_file` also reads a cache
entry's folder, so `--activations CACHE_DIR/acts-...-train` works.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_save_tensors
from .cli import DEFAULT_FILE_VAL_TOKENS, DEFAULT_TRAIN_TOKENS, DEFAULT_VAL_TOKENS, UserError
from .rows import DEFAULT_BLOCK_ROWS, DEFAULT_MIX, FileRows, Segment, TensorRows, file_rows

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
        """The spec of --model/--layer/--dataset/...; a missing or empty text source fails here, before the LM loads."""
        check_text_source(a.dataset)
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


def _has_text(path: str) -> bool:
    """Whether the file holds any non-whitespace character (reads only until the first one)."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            if block.strip():
                return True
    return False


def _text_files(dataset: str) -> list[str]:
    """The .txt files of a local text source; a missing path, no .txt file or only blank text is a UserError."""
    path = Path(dataset).expanduser()
    if not path.exists():
        raise UserError(f"unknown --dataset {dataset!r}: use wikitext-103, wikitext-2, demo, or a path to a "
                        f".txt file or folder of .txt files")
    files = sorted(str(f) for f in path.rglob("*.txt")) if path.is_dir() else [str(path)]
    if not files:
        raise UserError(f"--dataset {dataset}: the folder holds no .txt files; pass a .txt file or a folder of them")
    if not any(_has_text(f) for f in files):
        raise UserError(f"--dataset {dataset}: the text is empty ({len(files)} .txt file{'s' if len(files) > 1 else ''}, "
                        f"blank lines only); pass a text source whose documents are separated by blank lines")
    return files


def check_text_source(dataset: str) -> None:
    """Fail early (before any model loads) on a --dataset that iter_documents would refuse."""
    if dataset not in WIKITEXT and dataset != "demo":
        _text_files(dataset)


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
        files = [str(ensure_demo_model() / "corpus.txt")]
    else:
        files = _text_files(dataset)
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


def iter_test_half_sequences(tokenizer, spec: "DataSpec", n_docs: int) -> Iterator[tuple[list[int], int, int]]:
    """(token ids, slot, document index) for the sequences of the first n_docs *test-half* held-out documents
    (`heldout_half`): slot counts those documents 0..n_docs-1, the document index is its place in the
    held-out stream (the doc_ids of the activation cache). What part6 and interpret_features evaluate."""
    return iter_heldout_half_sequences(tokenizer, spec, n_docs, "test")


def iter_heldout_half_sequences(tokenizer, spec: "DataSpec", n_docs: int, half: str
                                ) -> Iterator[tuple[list[int], int, int]]:
    """As iter_test_half_sequences, for either half ("selection" picks a best step, "test" reports)."""
    slot = 0
    for di, doc in enumerate(iter_documents(spec.dataset, "validation", spec.val_fraction)):
        if slot == n_docs:
            return
        if heldout_half(di) != half:
            continue
        for ids, _ in iter_sequences(tokenizer, [doc], spec.seq_len):
            yield ids, slot, di
        slot += 1


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

def _collected_batches(model, tokenizer, spec: DataSpec, split: str, max_tokens: int, lm_batch_size: int,
                       skip_sequences: int = 0, rows_before: int = 0):
    """Per LM batch: (acts [b, d] on the LM's device and dtype, doc_ids [b], sequences consumed so far).

    The sequence stream is deterministic, so a collection resumed with `skip_sequences` (and the rows it
    already holds, `rows_before`) continues exactly where the interrupted one stopped."""
    from .hooks import collect

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = iter_sequences(tokenizer, iter_documents(spec.dataset, split, spec.val_fraction), spec.seq_len)
    seqs = itertools.islice(seqs, skip_sequences, None)
    consumed, n = skip_sequences, rows_before
    while n < max_tokens:
        batch = list(itertools.islice(seqs, lm_batch_size))
        if not batch:
            return
        consumed += len(batch)
        ids, mask = batch_sequences([b[0] for b in batch], pad)
        h = collect(model, spec.layer, ids.to(device), mask.to(device))  # [batch, pos, d_model]
        keep = keep_mask(tokenizer, mask, spec.keep_bos).to(device)
        docs = torch.tensor([b[1] for b in batch], device=device)[:, None].expand_as(keep)
        acts, dids = h[keep], docs[keep]
        if n + acts.shape[0] > max_tokens:
            acts, dids = acts[:max_tokens - n], dids[:max_tokens - n]
        n += acts.shape[0]
        yield acts, dids, consumed


def _to_store(acts: torch.Tensor, dtype: torch.dtype, layer: int) -> torch.Tensor:
    """acts on the CPU in the storage dtype; a value the dtype cannot hold is a one-line UserError."""
    out = acts.to("cpu", dtype)
    if not torch.isfinite(out).all():
        if not torch.isfinite(acts).all():
            raise UserError(f"layer {layer} activations contain NaN or inf: the LM overflowed in its --dtype; "
                            f"run it in bfloat16 or float32")
        big = float(acts.abs().max())
        raise UserError(f"layer {layer} activations reach |x| = {big:.4g}, beyond the float16 range (65504); "
                        f"use --cache-dtype bfloat16 (the default, same range as float32)")
    return out


@torch.no_grad()
def collect_activations(model, tokenizer, spec: DataSpec, split: str, max_tokens: int, lm_batch_size: int,
                        desc: str = "", store_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-`spec.layer` activations of up to max_tokens kept positions: ([n, d], doc_ids [n]), in store_dtype
    (default: the LM's dtype)."""
    store_dtype = store_dtype or next(model.parameters()).dtype
    chunks, doc_chunks = [], []
    bar = tqdm(total=max_tokens, desc=desc or f"collect {split} layer {spec.layer}", unit="tok", leave=False)
    for acts, dids, _ in _collected_batches(model, tokenizer, spec, split, max_tokens, lm_batch_size):
        chunks.append(_to_store(acts, store_dtype, spec.layer))
        doc_chunks.append(dids.cpu())
        bar.update(acts.shape[0])
    bar.close()
    if not chunks:
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


# ------------------------------------------------------------------------------------ activation cache
#
# One cache entry = one folder  CACHE_DIR/acts-<sha256(key)[:20]>-<split>/  holding
#     shard-00000.safetensors, shard-00001.safetensors, ...   'activations' [rows, d] (--cache-dtype) and
#                                                              'doc_ids' int64 [rows], in collection order
#     manifest.json   {"format", "key", "dtype", "d", "lm_batch_size", "rows", "sequences", "complete",
#                      "shards": [{"file", "rows", "sequences"}]}   ("sequences": LM sequences consumed so far)
# The key is the model fingerprint, the DataSpec, the split, the token budget, the LM dtype and the cache
# dtype. A shard is written (atomically) once at least --cache-shard-tokens rows are buffered, always at an
# LM-batch boundary, and the manifest is rewritten (atomically) after it, so an interrupted collection leaves
# a consistent prefix: the next run skips the sequences already consumed and continues. With the same
# --lm-batch-size the result is identical to an uninterrupted collection. A manifest whose shards are missing
# or unreadable is cut back to the readable prefix; an unreadable manifest starts the entry afresh.

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CACHE_FORMAT = "activation-cache/1"
MANIFEST = "manifest.json"
DEFAULT_CACHE_DTYPE = "bfloat16"
DEFAULT_CACHE_SHARD_TOKENS = 262_144


def cache_entry(cache_dir: str | Path, key: str, split: str) -> Path:
    return Path(cache_dir) / f"acts-{hashlib.sha256(key.encode()).hexdigest()[:20]}-{split}"


def _read_manifest(folder: Path, key: str | None) -> dict | None:
    """The entry's manifest (None if missing, unreadable or for another key), cut to the shards on disk."""
    try:
        man = json.loads((folder / MANIFEST).read_text())
        if man.get("format") != CACHE_FORMAT or (key is not None and man.get("key") != key):
            return None
        if man["dtype"] not in CACHE_DTYPES:
            return None
        n_ok = 0
        for sh in man["shards"]:                            # keep the prefix of shards that are still there
            if not ((folder / sh["file"]).is_file() and sh["rows"] > 0 and sh["sequences"] >= 0):
                break
            n_ok += 1
        if n_ok < len(man["shards"]) or man["rows"] != sum(s["rows"] for s in man["shards"]):
            man = _truncated(man, n_ok)
        return man
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _truncated(man: dict, k: int) -> dict:
    shards = man["shards"][:k]
    return {**man, "shards": shards, "rows": sum(s["rows"] for s in shards),
            "sequences": shards[-1]["sequences"] if shards else 0, "complete": False}


def _write_manifest(folder: Path, man: dict) -> None:
    from .checkpoint import atomic_write_bytes
    atomic_write_bytes(folder / MANIFEST, (json.dumps(man, indent=1) + "\n").encode())


def _entry_rows(folder: Path, man: dict) -> FileRows | int:
    """The entry's rows on disk (read lazily, in the stored dtype); or the index of the first unreadable shard."""
    dtype = CACHE_DTYPES[man["dtype"]]
    segs = []
    for i, sh in enumerate(man["shards"]):
        try:
            seg = Segment(folder / sh["file"])
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            return i
        if seg.shape != (sh["rows"], man["d"]) or seg.dtype != dtype or seg.doc_shape != (sh["rows"],):
            return i
        segs.append(seg)
    return FileRows(segs)


def _load_entry(folder: Path, man: dict) -> tuple[torch.Tensor, torch.Tensor] | int:
    """The entry's rows, concatenated in the stored dtype; or the index of the first unreadable shard."""
    rows = _entry_rows(folder, man)
    if isinstance(rows, int):
        return rows
    try:
        return rows.load(), rows.docs()
    except OSError:
        return 0


def cached_activations(spec: DataSpec, split: str, max_tokens: int, lm_batch_size: int, cache_dir: str,
                       dtype: str, device: str, lm: dict, cache_dtype: str = DEFAULT_CACHE_DTYPE,
                       shard_tokens: int = DEFAULT_CACHE_SHARD_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """cached_rows, loaded: (activations [n, d], doc_ids [n]) in memory (small sets and tests)."""
    rows = cached_rows(spec, split, max_tokens, lm_batch_size, cache_dir, dtype, device, lm, cache_dtype, shard_tokens)
    return rows.load(), rows.docs()


@torch.no_grad()
def cached_rows(spec: DataSpec, split: str, max_tokens: int, lm_batch_size: int, cache_dir: str,
                dtype: str, device: str, lm: dict, cache_dtype: str = DEFAULT_CACHE_DTYPE,
                shard_tokens: int = DEFAULT_CACHE_SHARD_TOKENS) -> FileRows | TensorRows:
    """Collect (or reuse / resume from the cache) activations for one split, in `cache_dtype` (also when the
    cache is off, so cached and uncached runs see the same values). `lm` memoises the loaded model.
    The rows stay on disk (FileRows over the entry's shards); with the cache off ('') they are collected into
    memory (TensorRows), so a long collection should keep the cache on."""
    from .models import load_model, resolve_model_path

    if cache_dtype not in CACHE_DTYPES:
        raise UserError(f"unknown --cache-dtype {cache_dtype!r}; use {', '.join(CACHE_DTYPES)}")
    if shard_tokens <= 0:
        raise UserError(f"--cache-shard-tokens must be positive, got {shard_tokens}")
    store = CACHE_DTYPES[cache_dtype]

    def ensure_lm():
        if "model" not in lm:
            lm["model"], lm["tokenizer"], _ = load_model(spec.model, dtype, device)
            from .hooks import block_for_layer
            block_for_layer(lm["model"], spec.layer)  # range check before any work
        return lm["model"], lm["tokenizer"]

    if not cache_dir:
        return TensorRows(*collect_activations(*ensure_lm(), spec, split, max_tokens, lm_batch_size, store_dtype=store))

    path = resolve_model_path(spec.model)
    key = json.dumps({**asdict(spec), "model": model_fingerprint(path), "split": split, "n": max_tokens,
                      "dtype": dtype, "cache_dtype": cache_dtype}, sort_keys=True)
    folder = cache_entry(cache_dir, key, split)
    man = _read_manifest(folder, key)
    if man is not None and man["complete"]:
        got = _entry_rows(folder, man)
        if not isinstance(got, int):
            return got
        man = _truncated(man, got)                          # a damaged shard: collect again from there
    if man is None:
        man = {"format": CACHE_FORMAT, "key": key, "dtype": cache_dtype, "d": None, "lm_batch_size": lm_batch_size,
               "rows": 0, "sequences": 0, "complete": False, "shards": []}
    model, tok = ensure_lm()
    man["lm_batch_size"] = lm_batch_size
    buf_a: list[torch.Tensor] = []
    buf_d: list[torch.Tensor] = []

    def flush(consumed: int) -> None:
        a, d = torch.cat(buf_a), torch.cat(buf_d)
        buf_a.clear(), buf_d.clear()
        name = f"shard-{len(man['shards']):05d}.safetensors"
        atomic_save_tensors(folder / name, {"activations": a, "doc_ids": d}, metadata={"key": key})
        man["shards"].append({"file": name, "rows": a.shape[0], "sequences": consumed})
        man["rows"] += a.shape[0]
        man["sequences"] = consumed
        man["d"] = a.shape[1]
        _write_manifest(folder, man)

    bar = tqdm(total=max_tokens, initial=man["rows"], unit="tok", leave=False,
               desc=f"collect {split} layer {spec.layer}" + (" (resumed)" if man["rows"] else ""))
    buffered, consumed = 0, man["sequences"]
    for acts, dids, consumed in _collected_batches(model, tok, spec, split, max_tokens, lm_batch_size,
                                                   skip_sequences=man["sequences"], rows_before=man["rows"]):
        buf_a.append(_to_store(acts, store, spec.layer))
        buf_d.append(dids.cpu())
        buffered += acts.shape[0]
        bar.update(acts.shape[0])
        if buffered >= shard_tokens:
            flush(consumed)
            buffered = 0
    bar.close()
    if buf_a:
        flush(consumed)
    if man["rows"] == 0:
        raise UserError(f"--dataset {spec.dataset}: the {split} split gave no tokens; use a larger text source")
    man["complete"] = True
    _write_manifest(folder, man)
    got = _entry_rows(folder, man)
    if isinstance(got, int):
        raise UserError(f"activation cache {folder}: shard {man['shards'][got]['file']} became unreadable while "
                        f"collecting; delete the folder and run again")
    return got


# ------------------------------------------------------------------------------------ activation files

def save_activation_file(path: Path, acts: torch.Tensor, doc_ids: torch.Tensor | None = None,
                         meta: dict | None = None) -> None:
    tensors = {"activations": acts}
    if doc_ids is not None:
        tensors["doc_ids"] = doc_ids.long()
    atomic_save_tensors(Path(path), tensors, metadata={k: str(v) for k, v in (meta or {}).items()})


def load_activation_file(path: str | Path, flag: str, width: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read and validate a whole activation file (or an activation-cache entry's folder) into memory; every
    problem is a one-line UserError. Training stages use open_activation_file, which reads it in blocks."""
    rows = open_activation_file(path, flag, width)
    return rows.load(), rows.docs()


def open_activation_file(path: str | Path, flag: str, width: int | None = None) -> FileRows:
    """An activation file (or an activation-cache entry's folder) as FileRows, its headers validated; every
    problem is a one-line UserError. Each block read checks its values (a NaN or inf names its row)."""
    p = Path(path)
    if p.is_dir() and (p / MANIFEST).is_file():             # an activation-cache entry
        man = _read_manifest(p, None)
        if man is None or not man["complete"]:
            raise UserError(f"{flag} {p}: an incomplete or damaged activation-cache entry; rerun the stage that "
                            f"collects it (it resumes) or pass a safetensors file")
        rows = _entry_rows(p, man)
        if isinstance(rows, int):
            raise UserError(f"{flag} {p}: cache shard {man['shards'][rows]['file']} is unreadable; delete the folder")
    elif not p.is_file():
        raise UserError(f"{flag} {p}: no such file")
    else:
        rows = file_rows([p], flag)
    seg = rows.segments[0]
    if len(seg.shape) != 2:
        raise UserError(f"{flag} {p}: 'activations' has shape {seg.shape}; expected 2-D [n_tokens, d_model]")
    if seg.dtype not in ACT_DTYPES:
        raise UserError(f"{flag} {p}: 'activations' has dtype {str(seg.dtype).removeprefix('torch.')}; save it as "
                        f"float16, bfloat16 or float32")
    if width is not None and seg.shape[1] != width:
        raise UserError(f"{flag} {p}: activations have width {seg.shape[1]}, but the model expects d={width}; "
                        f"pass activations from the same layer and model")
    if rows.n == 0:
        raise UserError(f"{flag} {p}: the file holds no rows")
    if seg.doc_shape is not None and not rows.has_docs:
        raise UserError(f"{flag} {p}: 'doc_ids' must be 1-D int64 with one entry per row")
    rows.check = _finite_check(p, flag)
    return rows


def _finite_check(p: Path, flag: str):
    def check(block: torch.Tensor, first_row: int) -> None:
        bad = ~torch.isfinite(block)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise UserError(f"{flag} {p}: 'activations' contains {float(block[row, col])} at row {first_row + row}, "
                            f"column {col} (the first non-finite value); remove or fix the rows with NaN or inf")
    return check


def scan_rows(rows: FileRows | TensorRows, desc: str) -> None:
    """Read every row once, block by block, so a bad value fails the stage before it trains (FileRows check
    their values as they read); memory stays one block."""
    if isinstance(rows, FileRows):
        for _ in tqdm(rows.chunks(rows.block_rows), total=-(-rows.n // rows.block_rows), desc=desc, unit="block",
                      leave=False):
            pass


# ----------------------------------------------------------------------- the two held-out halves
#
# Held-out documents are halved once, by document: the *selection* half picks every best step (and nothing
# else); the *test* half gives every reported figure. A document's half is a hash of its index in the held-out
# stream, so it does not depend on how many tokens a stage collects: part6 and interpret_features, which read
# held-out text themselves, read exactly the test-half documents the training stages report on, at any --docs.

def heldout_half(doc_id: int) -> str:
    """'selection' or 'test' for the held-out document with this index (stable, about half each)."""
    return "test" if zlib.crc32(f"heldout-doc-{int(doc_id)}".encode()) & 1 else "selection"


def in_test_half(docs: torch.Tensor) -> torch.Tensor:
    """Which rows [n] belong to test-half documents, for per-row document indices docs [n]."""
    ids = torch.unique(docs)
    is_test = torch.tensor([heldout_half(int(i)) == "test" for i in ids], dtype=torch.bool)
    return is_test[torch.searchsorted(ids, docs)]


def split_selection_test(x: torch.Tensor, docs: torch.Tensor | None, *more: torch.Tensor):
    """Split held-out rows into a selection half and a test half: ((x, *more) of selection-half documents,
    (x, *more) of test-half documents) by `heldout_half`. Without document indices (an activation file with
    no doc_ids), or when the documents all fall in one half, the first and second half of the rows."""
    n = x.shape[0]
    test = in_test_half(docs) if docs is not None and n > 1 else None
    if test is None or bool(test.all()) or not bool(test.any()):
        test = torch.arange(n) >= (n // 2 if n > 1 else 0)
    sel = ~test
    return (x[sel],) + tuple(m[sel] for m in more), (x[test],) + tuple(m[test] for m in more)


def heldout_documents(docs: torch.Tensor | None) -> dict:
    """The held-out document indices of each half, as recorded in metrics.json (provenance of every figure)."""
    if docs is None:
        return {"split": "first / second half of the held-out rows (no document indices)"}
    ids = torch.unique(docs).tolist()
    return {"split": "by document: common/data.py heldout_half", "selection": [i for i in ids if heldout_half(i) == "selection"],
            "test": [i for i in ids if heldout_half(i) == "test"]}


def split_cut(n: int, docs: torch.Tensor | None, val_fraction: float = 0.1) -> int:
    """Where the held-out part of a single activation file starts: the last rows, whole documents if doc_ids
    exist."""
    cut = int(round(n * (1 - val_fraction)))
    if docs is not None:
        cut_doc = docs[min(cut, n - 1)]
        first = int(torch.nonzero(docs == cut_doc)[0])
        cut = first if first > 0 else cut
    if cut <= 0 or cut >= n:
        raise UserError(f"--activations: {n} rows are too few to hold out a validation part; pass more rows or "
                        f"--val-activations")
    return cut


def split_rows(acts: torch.Tensor, docs: torch.Tensor | None, val_fraction: float = 0.1):
    """Hold out the last rows of a single activation file (in memory): whole documents if doc_ids exist."""
    cut = split_cut(acts.shape[0], docs, val_fraction)
    return (acts[:cut], None if docs is None else docs[:cut]), (acts[cut:], None if docs is None else docs[cut:])


@dataclass
class Activations:
    train: FileRows | TensorRows | None   # [n_train, d], read a block at a time (common/rows.py); None: not needed
    val: torch.Tensor              # [n_val, d], in memory (capped by --val-tokens)
    val_docs: torch.Tensor | None
    description: dict

    def normalized_halves(self, encode) -> tuple[torch.Tensor, torch.Tensor]:
        """(selection half, test half) of the held-out rows, each through `encode` (a normaliser's), with the
        stored rows released: split first, then normalise half by half, so that the float32 copy of every row and
        its two halves never coexist (at 100k held-out rows of d 3,200: 3.2 GB at once before, 1.6 GB now)."""
        (sel,), (test,) = split_selection_test(self.val, self.val_docs)
        self.val = None
        sel = encode(sel)
        return sel, encode(test)


def get_activations(args, spec: DataSpec | None, width: int | None = None, lm: dict | None = None,
                    parent: dict | None = None, need_train: bool = True) -> Activations:
    """Train rows (on disk) and held-out rows (in memory): `_get_activations`; under --defects token-split the
    held-out rows are instead a random tenth of the training tokens (`token_split`)."""
    acts = _get_activations(args, spec, width, lm, parent, need_train)
    if need_train and "token-split" in getattr(args, "defects", ()):
        tr, va = token_split(acts.train, args.val_tokens or DEFAULT_VAL_TOKENS, getattr(args, "seed", 0))
        acts = Activations(tr, va, None, {**acts.description, "train_tokens": tr.n, "val_tokens": va.shape[0],
                                          "split": "token-level: a random 10% of the training tokens held out "
                                                   "(--defects token-split)"})
    return acts


def _get_activations(args, spec: DataSpec | None, width: int | None = None, lm: dict | None = None,
                     parent: dict | None = None, need_train: bool = True) -> Activations:
    """Train rows (on disk) and held-out rows (in memory) from --activations files, or collected through the
    LM (cached). Training rows are never loaded whole: stages gather them per batch (common/rows.py).

    `parent` is the data description of the checkpoint this stage builds on: if its LM has changed on
    disk since (e.g. the demo was rebuilt), the stage refuses to mix the two. need_train=False: a stage that
    only evaluates (train is None; nothing of the training split is collected)."""
    lm = {} if lm is None else lm
    if args.activations:
        rows = open_activation_file(args.activations, "--activations", width)
        if args.val_activations:
            tr, held = rows, open_activation_file(args.val_activations, "--val-activations", rows.d)
        else:
            cut = split_cut(rows.n, rows.docs())
            tr, held = rows.view(0, cut), rows.view(cut, rows.n - cut)
        tr = tr.view(0, args.train_tokens or tr.n).with_blocks(*_blocks(args))
        n_va = min(held.n, args.val_tokens or DEFAULT_FILE_VAL_TOKENS)
        if need_train:
            scan_rows(tr, "check --activations")
        va, vad = held.read(0, n_va), held.docs(0, n_va)
        desc = {"source": "activation_file", "activations": str(Path(args.activations).resolve()),
                "val_activations": str(Path(args.val_activations).resolve()) if args.val_activations else None,
                "split": "file" if args.val_activations else ("last documents" if rows.has_docs else "last rows")}
        return Activations(tr if need_train else None, va, vad,
                           {**desc, "train_tokens": tr.n if need_train else None, "val_tokens": va.shape[0]})
    if spec is None:
        raise UserError("this stage's parent was trained on an activation file; pass --activations FILE")
    from .models import resolve_model_path
    fingerprint = model_fingerprint(resolve_model_path(spec.model))
    if parent is not None and parent.get("model_fingerprint") not in (None, fingerprint):
        raise UserError(f"the model {spec.model} has changed on disk since the parent checkpoint was trained; "
                        f"retrain from part1 (or restore that model)")
    common = dict(lm_batch_size=args.lm_batch_size, cache_dir=args.cache_dir, dtype=args.dtype,
                  device=args.device, lm=lm, cache_dtype=getattr(args, "cache_dtype", DEFAULT_CACHE_DTYPE),
                  shard_tokens=getattr(args, "cache_shard_tokens", DEFAULT_CACHE_SHARD_TOKENS))
    tr = (cached_rows(spec, "train", args.train_tokens or DEFAULT_TRAIN_TOKENS, **common).with_blocks(*_blocks(args))
          if need_train else None)
    va, vad = cached_activations(spec, "validation", args.val_tokens or DEFAULT_VAL_TOKENS, **common)
    if width is not None and va.shape[1] != width:
        raise UserError(f"layer {spec.layer} of {spec.model} has width {va.shape[1]}, but the parent model expects {width}")
    desc = {"source": "model", **asdict(spec), "model_fingerprint": fingerprint, "split": "by document",
            "train_tokens": tr.n if need_train else None, "val_tokens": va.shape[0],
            "activation_dtype": str(va.dtype).removeprefix("torch.")}
    return Activations(tr, va, vad, desc)


def token_split(rows, n_val: int, seed: int):
    """The reference's split (--defects token-split, original_study.md §2.3, §14.8): a random 10% of the training
    tokens (at most n_val) held out, the rest trained on, so held-out tokens share documents and 128-token chunks
    with training ones. (training Rows, held-out rows [m, d]); the held-out rows carry no document ids, so their
    selection / test halves are the first and second half of them."""
    from .rows import SubsetRows
    held = torch.zeros(rows.n, dtype=torch.bool)
    pick = torch.randperm(rows.n, generator=torch.Generator().manual_seed(seed))[:min(n_val, max(2, rows.n // 10))]
    held[pick] = True
    return SubsetRows(rows, (~held).nonzero()[:, 0]), rows.take(held.nonzero()[:, 0])


def _blocks(args) -> tuple[int, int]:
    """(--block-rows, --shuffle-blocks): how training rows are read and shuffled (common/rows.py)."""
    return getattr(args, "block_rows", DEFAULT_BLOCK_ROWS), getattr(args, "shuffle_blocks", DEFAULT_MIX)


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
