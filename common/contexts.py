"""Where a feature fires in held-out text: the tokens of the activation cache's held-out rows, each feature's
firing statistics, its top activating contexts and samples from its activation quantiles (delphi's scheme), for
the feature browser (browse_features.py) and interpret_features.py, so both show the same examples.

The activation cache stores rows, not tokens. Its row order is fixed (common/data.py `_collected_batches`):
sequence by sequence of the held-out stream, each sequence's kept positions in order (all but the BOS unless
--keep-bos), cut at the token budget. `heldout_row_tokens` replays that order with the tokenizer alone, so row r
of the cache is token `tokens[r]` at position `pos[r]` of sequence `seq[r]`; tests/test_contexts.py checks it
against the LM.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import iter_documents, iter_sequences


@dataclass
class RowTokens:
    """The held-out rows' tokens: row r is token tokens[r] at position pos[r] of sequence seq[r] (sequences[s] its
    ids, docs[r] its held-out document index, the cache's doc_ids)."""
    sequences: list[list[int]]
    seq: np.ndarray               # [n_rows] int64
    pos: np.ndarray               # [n_rows] int64
    tokens: np.ndarray            # [n_rows] int64
    docs: np.ndarray              # [n_rows] int64
    first_row: np.ndarray         # [n_sequences] the row of each sequence's first kept position

    def row_at(self, s: int, p: int) -> int | None:
        """The row of position p of sequence s, or None if that position is not a row (BOS, past the budget)."""
        r = int(self.first_row[s]) + p - int(self.pos[self.first_row[s]]) if self.first_row[s] >= 0 else -1
        return r if 0 <= r < len(self.seq) and self.seq[r] == s and self.pos[r] == p else None


def heldout_row_tokens(tokenizer, spec, n_rows: int) -> RowTokens:
    """Replay the held-out stream's first n_rows kept positions (the cache's 'validation' rows) with the tokenizer."""
    start = 0 if spec.keep_bos or tokenizer.bos_token_id is None else 1
    seqs, seq, pos, docs, first = [], [], [], [], []
    n = 0
    for ids, di in iter_sequences(tokenizer, iter_documents(spec.dataset, "validation", spec.val_fraction), spec.seq_len):
        if n >= n_rows:
            break
        take = min(len(ids) - start, n_rows - n)
        s = len(seqs)
        seqs.append(ids)
        first.append(n if take > 0 else -1)
        seq += [s] * take
        pos += range(start, start + take)
        docs += [di] * take
        n += take
    seq, pos = np.array(seq, dtype=np.int64), np.array(pos, dtype=np.int64)
    tokens = np.array([seqs[s][p] for s, p in zip(seq, pos)], dtype=np.int64)
    return RowTokens(seqs, seq, pos, tokens, np.array(docs, dtype=np.int64), np.array(first, dtype=np.int64))


class FiringStats:
    """Per latent of one feature space, over every row fed: how many rows it fires on (value > 0), the sum and the
    max of its values. Fed sparse codes (idx, val) [n, k] a batch at a time; memory O(n_latents)."""

    def __init__(self, n_latents: int):
        self.n_rows = 0
        self.count = torch.zeros(n_latents, dtype=torch.float64)
        self.total = torch.zeros(n_latents, dtype=torch.float64)
        self.max = torch.zeros(n_latents, dtype=torch.float64)

    def add(self, idx: torch.Tensor, val: torch.Tensor) -> None:
        self.n_rows += idx.shape[0]
        idx, val = idx.reshape(-1).long().cpu(), val.reshape(-1).double().cpu()
        on = val > 0
        idx, val = idx[on], val[on]
        self.count.index_add_(0, idx, torch.ones_like(val))
        self.total.index_add_(0, idx, val)
        self.max.scatter_reduce_(0, idx, val, reduce="amax")

    def summary(self, i: int) -> dict:
        c = float(self.count[i])
        return {"frequency": c / max(self.n_rows, 1), "n_firing": int(c),
                "mean_activation": float(self.total[i]) / c if c else 0.0, "max_activation": float(self.max[i])}


def dense_columns(idx: torch.Tensor, val: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The values of `features` [m] in sparse codes (idx, val) [n, k]: [n, m] (0 where a feature is inactive)."""
    if idx.numel() == 0 or len(features) == 0:
        return torch.zeros(idx.shape[0], len(features))
    col = torch.full((int(max(idx.max(), features.max())) + 1,), -1, dtype=torch.long)
    col[features.long()] = torch.arange(len(features))
    c = col[idx.long()]                                                     # [n, k]: column of each entry, or -1
    out = torch.zeros(idx.shape[0], len(features))
    on = c >= 0                                     # no [n, k, m] comparison: at K 1,024 that is GBs per batch
    out[torch.nonzero(on)[:, 0], c[on]] = val[on].float()
    return out


def top_rows(acts: np.ndarray, n: int) -> np.ndarray:
    """The rows of the n largest positive values of acts [n_rows], largest first (ties: the earlier row)."""
    on = np.flatnonzero(acts > 0)
    order = np.lexsort((on, -acts[on]))
    return on[order[:n]]


def quantile_rows(acts: np.ndarray, n_bins: int, per_bin: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """delphi's quantile sampling, as interpret_features shows Claude: the firing rows sorted by value (largest
    first) split into n_bins equal bins; per_bin rows drawn from each, without replacement, by a generator seeded
    with `seed`. Returns [(bin 1 = strongest, rows in row order)]."""
    on = np.flatnonzero(acts > 0)
    order = on[np.lexsort((on, -acts[on]))]
    rng = np.random.default_rng(seed)
    out = []
    for b, chunk in enumerate(np.array_split(order, n_bins) if len(order) else []):
        if len(chunk):
            out.append((b + 1, np.sort(rng.choice(chunk, size=min(per_bin, len(chunk)), replace=False))))
    return out


def context_window(rt: RowTokens, row: int, acts: np.ndarray, window: int) -> list[tuple[int, float, bool]]:
    """The tokens around `row` in its sequence: [(token id, the feature's value there (0 off the rows), is the
    row itself)], `window` positions each side."""
    s, p = int(rt.seq[row]), int(rt.pos[row])
    ids = rt.sequences[s]
    out = []
    for q in range(max(0, p - window), min(len(ids), p + window + 1)):
        r = rt.row_at(s, q)
        out.append((int(ids[q]), float(acts[r]) if r is not None else 0.0, q == p))
    return out


def histogram(acts: np.ndarray, bins: int = 30) -> dict:
    """The firing values' histogram (zeros left out): bin edges and counts."""
    on = acts[acts > 0]
    if not len(on):
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(on, bins=bins)
    return {"edges": edges.tolist(), "counts": counts.tolist()}
