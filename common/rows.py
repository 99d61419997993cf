"""Training rows that stay on disk: what lets the training stages stream their tokens.

A training stage sees its training activations as a `Rows` object, never as one [n_train, d] tensor:
  TensorRows   rows already in memory (tests, synthetic data, a collection run with the cache off)
  FileRows     rows of one or more safetensors files (an activation file, or the shards of an activation-cache
               entry), read a block at a time with plain file reads (no mmap, so nothing of the file stays
               mapped into the process), with an LRU of decoded blocks
  MappedRows   rows with a function applied per gathered batch (normalise, then the frozen SAE's code, ...), so
               codes, residuals and hidden layers are computed per batch on the device, never for all tokens
`gather(idx)` returns the rows `idx` (a batch), `chunks()` walks them in order (statistics, path means).

The shuffle (`epoch_order`) keeps a block cache small: an epoch visits the blocks in a random order, `mix` at a
time (a *window*), and shuffles rows across the blocks of each window. So a batch touches the blocks of at most
two windows, and host memory is bounded by mix * block_rows rows, whatever the number of training tokens (a
batch uses the blocks it finds cached before it reads any, so a batch straddling two windows evicts only blocks
of the window that ended, and each block is read once per epoch).
When every row fits in one window the order is exactly `torch.randperm(n)`, the order of an in-memory run.

Why blocks from random places rather than consecutive rows: consecutive rows are consecutive tokens of the same
few documents; `mix` blocks from anywhere in the file give each batch tokens from as many documents as a window
of a global shuffle would (the window's rows are shuffled together).
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import UserError

DEFAULT_BLOCK_ROWS = 32_768          # rows read from disk at once
DEFAULT_MIX = 8                      # blocks shuffled together: a window of 262,144 rows
FN_BATCH = 4096                      # rows per call of a MappedRows' function when walking the rows in chunks
ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32}


def epoch_order(n: int, gen: torch.Generator, shuffle: tuple[int, int] | None) -> torch.Tensor:
    """One epoch's row order [n] (int64). shuffle = (block_rows, mix): blocks in a random order, `mix` blocks
    per window, rows shuffled within each window; None (or n within one window): torch.randperm(n)."""
    if shuffle is None or n <= shuffle[0] * shuffle[1]:
        return torch.randperm(n, generator=gen)
    block, mix = shuffle
    n_blocks = math.ceil(n / block)
    blocks = torch.randperm(n_blocks, generator=gen)
    parts = []
    for w in range(0, n_blocks, mix):
        rows = torch.cat([torch.arange(b * block, min(n, (b + 1) * block)) for b in blocks[w:w + mix].tolist()])
        parts.append(rows[torch.randperm(rows.shape[0], generator=gen)])
    return torch.cat(parts)


class Rows(ABC):
    """n rows of width d (or of whatever a MappedRows' function returns). Subclasses define `n`, `gather`."""
    n: int
    d: int
    shuffle: tuple[int, int] | None = None      # (block_rows, mix) for epoch_order; None: rows are in memory

    @abstractmethod
    def gather(self, idx: torch.Tensor):
        """The rows idx [b] (a tensor, or a tuple of them)."""

    def take(self, idx: torch.Tensor):
        """gather() for a few scattered rows read once (an init batch): on disk, row by row, the block cache
        left alone (a random batch touches every block)."""
        return self.gather(idx)

    def map(self, fn: Callable) -> "MappedRows":
        return MappedRows(self, fn)

    def docs(self, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        return None

    def release(self) -> None:
        """Drop cached blocks (after a model's training: the next model or the evaluation does not need them)."""

    def with_blocks(self, block_rows: int, mix: int) -> "Rows":
        """These rows, shuffled by epoch_order with (block_rows, mix) (and, on disk, read in such blocks)."""
        if block_rows < 1 or mix < 1:
            raise UserError(f"--block-rows and --shuffle-blocks must be positive (got {block_rows}, {mix})")
        self.shuffle = (block_rows, mix)
        return self

    def chunks(self, batch: int = 8192, stride: int = 1) -> Iterator:
        """gather() of rows 0, stride, 2*stride, ... in slices of `batch` of them."""
        idx = torch.arange(0, self.n, stride)
        for s in range(0, idx.shape[0], batch):
            yield self.gather(idx[s:s + batch])

    def load(self):
        """Every row at once: only for small sets (held-out rows, tests)."""
        return self.gather(torch.arange(self.n))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.d)


class TensorRows(Rows):
    def __init__(self, t: torch.Tensor, doc_ids: torch.Tensor | None = None):
        self.t, self.n, self.d = t, t.shape[0], t.shape[1]
        self.dtype, self.doc_ids = t.dtype, doc_ids

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        return self.t[idx]

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.t[start:stop]

    def view(self, start: int, n: int) -> "TensorRows":
        return TensorRows(self.t[start:start + n], None if self.doc_ids is None else self.doc_ids[start:start + n])

    def docs(self, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        return None if self.doc_ids is None else self.doc_ids[start:stop]

    def load(self) -> torch.Tensor:
        return self.t


class TupleRows(Rows):
    """Several in-memory tensors with the same rows; gather returns a tuple."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors, self.n = tuple(tensors), tensors[0].shape[0]
        self.d = tensors[0].shape[1] if tensors[0].ndim > 1 else 1

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[idx] for t in self.tensors)

    def load(self) -> tuple[torch.Tensor, ...]:
        return self.tensors


def as_rows(x) -> Rows:
    """A Rows for x: a Rows itself, a tensor [n, ...] (TensorRows) or a tuple of them (TupleRows)."""
    if isinstance(x, Rows):
        return x
    if isinstance(x, (tuple, list)):
        return TupleRows(tuple(x))
    return TensorRows(x)


class MappedRows(Rows):
    """fn(base.gather(idx)): a function of each gathered batch (it may return a tuple)."""

    def __init__(self, base: Rows, fn: Callable):
        self.base, self.fn = base, fn
        self.n, self.d, self.shuffle = base.n, base.d, base.shuffle

    def gather(self, idx: torch.Tensor):
        return self.fn(self.base.gather(idx))

    def chunks(self, batch: int = 8192, stride: int = 1) -> Iterator:
        """fn of the base's chunks, at most FN_BATCH rows per call: fn may be large per row (the SAE's
        [rows, n_latents] pre-activations are 13 GB for 65,536 rows at the paper's 50,000 latents), and every
        consumer of chunks only sums over them."""
        for c in self.base.chunks(batch, stride):
            n = (c[0] if isinstance(c, tuple) else c).shape[0]
            for s in range(0, n, FN_BATCH):
                yield self.fn(tuple(t[s:s + FN_BATCH] for t in c) if isinstance(c, tuple) else c[s:s + FN_BATCH])

    def take(self, idx: torch.Tensor):
        return self.fn(self.base.take(idx))

    def release(self) -> None:
        self.base.release()

    def materialized(self, max_mb: float, batch: int = 4096) -> Rows:
        """fn of every row, computed once (in slices of `batch`) and kept on the CPU, if that takes at most
        max_mb megabytes; else these rows, computed per gathered batch. Small runs (the demo) then pay for
        the derived tensors once, not once per epoch; large ones stream. Same values either way."""
        first = self.fn(self.base.read(0, min(batch, self.n)))
        parts = first if isinstance(first, tuple) else (first,)
        per_row = sum(t.element_size() * t[0].numel() for t in parts)
        if max_mb <= 0 or per_row * self.n > max_mb * 2 ** 20:
            return self
        out = [torch.empty((self.n, *t.shape[1:]), dtype=t.dtype) for t in parts]
        for s in range(0, self.n, batch):
            got = first if s == 0 else self.fn(self.base.read(s, min(self.n, s + batch)))
            for o, t in zip(out, got if isinstance(got, tuple) else (got,)):
                o[s:s + t.shape[0]] = t.cpu()
        rows = TupleRows(tuple(out)) if isinstance(first, tuple) else TensorRows(out[0])
        rows.shuffle = self.shuffle
        return rows

    def load(self):
        raise TypeError("MappedRows.load: map the loaded base rows instead (keeps the whole set out of memory)")


class SubsetRows(Rows):
    """base's rows at `index` [m], in that order (sorted, so a windowed batch still touches few blocks on disk):
    the training rows left after the reference's token-level split (--defects token-split, common/data.py)."""

    def __init__(self, base: Rows, index: torch.Tensor):
        self.base, self.index = base, index
        self.n, self.d, self.shuffle = int(index.numel()), base.d, base.shuffle

    def gather(self, idx: torch.Tensor):
        return self.base.gather(self.index[idx])

    def take(self, idx: torch.Tensor):
        return self.base.take(self.index[idx])

    def read(self, start: int, stop: int):
        return self.gather(torch.arange(start, stop))

    def docs(self, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        d = self.base.docs()
        return None if d is None else d[self.index[start:stop]]

    def with_blocks(self, block_rows: int, mix: int) -> "SubsetRows":
        self.base.with_blocks(block_rows, mix)
        return super().with_blocks(block_rows, mix)

    def release(self) -> None:
        self.base.release()


# ---------------------------------------------------------------------------------------- safetensors files

def read_header(path: str | Path) -> tuple[dict, int]:
    """(the safetensors JSON header, the byte offset where tensor data starts); ValueError if malformed."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ValueError("header size out of range")
        head = json.loads(f.read(size))
    if not isinstance(head, dict):
        raise ValueError("header is not a JSON object")
    return head, 8 + size


class Segment:
    """One safetensors file's [rows, d] tensor `name` (and optional [rows] `doc_ids`), by byte offset."""

    def __init__(self, path: str | Path, name: str = "activations"):
        self.path = str(path)
        head, base = read_header(path)
        if name not in head:
            raise KeyError(name)
        meta = head[name]
        if meta["dtype"] not in ST_DTYPES:
            raise ValueError(f"dtype {meta['dtype']}")
        self.dtype = ST_DTYPES[meta["dtype"]]
        self.shape = tuple(meta["shape"])
        self.offset = base + meta["data_offsets"][0]
        doc = head.get("doc_ids")
        self.doc_offset = base + doc["data_offsets"][0] if doc and doc["dtype"] == "I64" else None
        self.doc_shape = tuple(doc["shape"]) if doc else None
        self.rows = self.shape[0] if self.shape else 0
        item = torch.empty((), dtype=self.dtype).element_size()
        end = meta["data_offsets"][1]
        if end - meta["data_offsets"][0] != math.prod(self.shape) * item or Path(path).stat().st_size < base + end:
            raise ValueError(f"tensor '{name}' does not fit the file (truncated?)")

    def read(self, start: int, stop: int, docs: bool = False) -> torch.Tensor:
        """Rows [start, stop) of the tensor (or of doc_ids), read from disk."""
        if docs:
            width, dtype, offset = 1, torch.int64, self.doc_offset
        else:
            width, dtype, offset = (self.shape[1] if len(self.shape) > 1 else 1), self.dtype, self.offset
        item = torch.empty((), dtype=dtype).element_size()
        out = torch.empty((stop - start) * width, dtype=dtype)
        buf = out.view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(offset + start * width * item)
            if f.readinto(buf) != buf.nbytes:
                raise OSError(f"{self.path}: truncated")
        return out if docs else out.view(stop - start, width)


class FileRows(Rows):
    """Rows [start, start + n) of the concatenated segments, read in blocks of `block_rows` through an LRU of
    `mix` blocks: one window of a windowed epoch order (see the module docstring for why that suffices)."""

    def __init__(self, segments: list[Segment], start: int = 0, n: int | None = None,
                 block_rows: int = DEFAULT_BLOCK_ROWS, mix: int = DEFAULT_MIX,
                 check: Callable[[torch.Tensor, int], None] | None = None):
        self.segments = segments
        self.bounds = [0]
        for s in segments:
            self.bounds.append(self.bounds[-1] + s.rows)
        total = self.bounds[-1]
        self.start = start
        self.n = total - start if n is None else min(n, total - start)
        self.d = segments[0].shape[1] if len(segments[0].shape) == 2 else 0   # (a 1-D file is refused by its caller)
        self.dtype = segments[0].dtype
        self.block_rows, self.mix = block_rows, mix
        self.shuffle = (block_rows, mix)
        self.check = check                               # check(rows, first_row) on every block read
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.has_docs = all(s.doc_offset is not None and s.doc_shape == (s.rows,) for s in segments)

    def view(self, start: int, n: int) -> "FileRows":
        """Rows [start, start + n) of these rows, as their own FileRows (same files, same block size)."""
        return FileRows(self.segments, self.start + start, min(n, self.n - start), self.block_rows, self.mix,
                        self.check)

    def with_blocks(self, block_rows: int, mix: int) -> "FileRows":
        super().with_blocks(block_rows, mix)
        self.block_rows, self.mix = block_rows, mix
        self._cache.clear()
        return self

    def read(self, start: int, stop: int, docs: bool = False) -> torch.Tensor:
        """Rows [start, stop) (relative to this view), straight from disk: [stop - start, d] (or doc_ids)."""
        a, b = self.start + start, self.start + min(stop, self.n)
        parts = []
        for i, seg in enumerate(self.segments):
            lo, hi = max(a, self.bounds[i]), min(b, self.bounds[i + 1])
            if lo < hi:
                parts.append(seg.read(lo - self.bounds[i], hi - self.bounds[i], docs))
        if not parts:
            return torch.empty((0,) if docs else (0, self.d), dtype=torch.int64 if docs else self.dtype)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.check is not None and not docs:
            self.check(out, a)                           # a: the row's index in the files
        return out

    def docs(self, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """The doc_ids of rows [start, stop), or None when the files carry none."""
        if not self.has_docs:
            return None
        return self.read(start, self.n if stop is None else stop, docs=True)

    def _block(self, b: int) -> torch.Tensor:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        t = self.read(b * self.block_rows, min(self.n, (b + 1) * self.block_rows))
        self._cache[b] = t
        while len(self._cache) > self.mix:
            self._cache.popitem(last=False)
        return t

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.long()
        blocks = idx // self.block_rows
        out = torch.empty(idx.shape[0], self.d, dtype=self.dtype)
        wanted = torch.unique(blocks).tolist()
        # cached blocks first: the blocks read below then evict only blocks this batch no longer needs
        for b in sorted(wanted, key=lambda b: b not in self._cache):
            m = blocks == b
            out[m] = self._block(b)[idx[m] - b * self.block_rows]
        return out

    def release(self) -> None:
        self._cache.clear()

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.read(i, i + 1) for i in idx.tolist()]) if idx.numel() else self.read(0, 0)

    def chunks(self, batch: int = 8192, stride: int = 1) -> Iterator[torch.Tensor]:
        """Rows 0, stride, 2*stride, ... in order, read straight from disk (the LRU left alone, so a pass for
        statistics does not fill it), in slices of at most max(batch, stride) rows read at once."""
        span = max(batch, stride) // stride * stride        # a multiple of the stride: the phase stays 0
        for s in range(0, self.n, span):
            yield self.read(s, min(self.n, s + span))[::stride]

    def load(self) -> torch.Tensor:
        return self.read(0, self.n)


def file_rows(paths: list[str | Path], flag: str, block_rows: int = DEFAULT_BLOCK_ROWS, mix: int = DEFAULT_MIX,
              check=None) -> FileRows:
    """FileRows over safetensors files that each hold an [rows, d] 'activations' tensor (one-line UserError
    if one does not)."""
    segs = []
    for p in paths:
        try:
            segs.append(Segment(p))
        except KeyError:
            raise UserError(f"{flag} {p}: no tensor named 'activations'; save one [n, d] tensor under that name") from None
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"{flag} {p}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return FileRows(segs, block_rows=block_rows, mix=mix, check=check)
