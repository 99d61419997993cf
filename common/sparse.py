"""Sparse-code kernels shared by the SAE, the NFM, the controls and the KL adapter: a code (idx, val) [batch, k]
as a CSR matrix (`TransposedCode`), weighted embedding-bag sums with CSR backwards (`_WeightedBag`,
`_PairBag`), and the reused gradient buffers of their tables. Below sae.py and nfm.py (imports only dist)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge
from torch.utils.weak import WeakIdKeyDictionary

from . import dist


class TransposedCode:
    """F^T: the code (idx, val) as a CSR matrix [n_features, batch] (nonzeros grouped by feature).

    Every table gradient of a sparse code is F^T @ (something [batch, width]) (or (F^2)^T @ ...): the SAE
    encoder's, the NFM's W_lin and V. As a CSR product that costs O(batch k width) memory and time, where
    the obvious index_add_ of [batch * k, width] outer products needs batch * k * width memory (54 GB at the
    paper's batch 4096, K 1024, d 3200) and was 2-6x slower on CPU, and embedding_bag's own backward sorts
    the indices again for every table (bench/RESULTS.md). The sort is the fixed cost, so it is done once
    per code, lazily (never in evaluation), and shared by every backward that reads that code."""

    def __init__(self, idx: torch.Tensor, val: torch.Tensor, n_features: int):
        self.idx, self.val, self.n_features = idx, val.detach(), n_features
        self._crow = self._rows = self._vals = self._order = None

    def _build(self) -> None:
        # int32 indices where they fit: the sort and the CSR product are ~1.7x faster than with int64; the
        # sort keys in int16 where features fit (the radix sort's passes scale with the key width)
        small = max(self.n_features, self.idx.numel()) < 2**31
        flat = self.idx.reshape(-1).to(torch.int32 if small else torch.long)
        keys = flat.to(torch.int16) if self.n_features <= 2**15 else flat
        order = keys.argsort()                                          # [batch * k] nonzeros by feature
        self._order = order.to(flat.dtype)
        self._rows = self._order // self.idx.shape[1]                   # their batch row: F^T's column
        self._crow = torch.zeros(self.n_features + 1, dtype=flat.dtype, device=flat.device)
        self._crow[1:] = torch.bincount(flat, minlength=self.n_features).cumsum(0)

    def csr(self, power: int = 1) -> torch.Tensor:
        """F^T, or (F^2)^T (values squared) with power=2: CSR [n_features, batch]."""
        if self._crow is None:
            self._build()
        if self._vals is None:
            self._vals = self.val.reshape(-1)[self._order]              # the nonzeros' values, by feature
        return self._csr(self._rows, self._vals if power == 1 else self._vals ** power, self.idx.shape[0])

    def csr_with(self, values: torch.Tensor, split: int | None = None) -> torch.Tensor:
        """The same nonzeros with other values [batch, k] (the sort reused): CSR [n_features, batch].
        split: the entries at positions >= split of each row are a second code, stacked row-interleaved:
        CSR [n_features, 2 batch] with row b's first `split` entries in column 2b and the rest in 2b + 1, for a
        right-hand side whose rows 2b and 2b + 1 are row b of each code's gradient (interleaved, not
        [first; second], so the columns within a feature stay in ascending order)."""
        if self._crow is None:
            self._build()
        cols, width = self._rows, self.idx.shape[0]
        if split is not None:
            cols, width = 2 * cols + (self._order % self.idx.shape[1] >= split).to(cols.dtype), 2 * width
        return self._csr(cols, values.reshape(-1)[self._order], width)

    def _csr(self, cols: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(self._crow, cols, values, (self.n_features, width), check_invariants=False)


def _bag_dots(grad: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """<grad[b], table[idx[b, j]]> for every nonzero: [batch, k].

    The per_sample_weights gradient of F.embedding_bag(mode="sum"), by the ATen kernel its own backward
    calls; it never builds the [batch, k, width] gathered rows (3 GB at the paper's d=3200, k=1024)."""
    batch, k = idx.shape
    flat = idx.reshape(-1)
    offsets = torch.arange(0, batch * k, k, device=idx.device)
    bag_of = torch.arange(batch, device=idx.device).repeat_interleave(k)  # offset2bag
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad.contiguous(), table, flat, offsets, bag_of, 0).view(batch, k)  # mode 0 = sum


# Per-table work buffers ([n_features, width], one set per Parameter), kept while the NFM trains. A fresh
# [n_features, width] tensor every step costs mostly page faults, not arithmetic: at the paper's
# 50k x 3200 W_lin, writing the step's CSR product into a fresh 640 MB tensor took 200 ms, into a reused
# one 50 ms (2-core CPU, torch 2.13). Released when common.train.fit ends (release_table_buffers) and by
# NFM.train(False).
_TABLE_BUFFERS = WeakIdKeyDictionary()


def _reused(table: torch.Tensor, name: str) -> torch.Tensor:
    """An uninitialised tensor like `table`, the same one at every call with the same (table, name)."""
    bufs = _TABLE_BUFFERS.setdefault(table, {})
    buf = bufs.get(name)
    if buf is None or buf.shape != table.shape or buf.dtype != table.dtype or buf.device != table.device:
        buf = bufs[name] = torch.empty_like(table, memory_format=torch.contiguous_format)
    return buf


def _engine_accumulates_into(table: torch.Tensor) -> bool:
    """Whether the running backward is a plain .backward() that accumulates into table.grad, rather
    than autograd.grad() or .backward(inputs=...), which return or select gradients instead (and for
    which the engine refuses to answer about a leaf)."""
    try:
        return torch._C._will_engine_execute_node(get_gradient_edge(table).node)
    except RuntimeError:
        return False


# Writing a table's gradient in place skips its AccumulateGrad node, so anything hooked on that node from
# C++ (DistributedDataParallel's allreduce hooks) would not see it: never under torchrun (dist.initialized()),
# and never when this switch is off.
REUSE_GRAD_BUFFERS = True


def _table_grad_out(table: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor for the backward to overwrite with table's gradient; see `_return_grad`.

    When nothing has written table.grad yet this step (None, e.g. after zero_grad(set_to_none=True)) and
    no hook observes the table's gradient, the reused buffer is installed as table.grad right away: the
    backward writes the gradient where AccumulateGrad would have put it and returns None. Otherwise
    (non-leaf table, hooks, create_graph, a gradient already accumulated) it is a fresh tensor that
    autograd accumulates as usual. Consequence: table.grad is the same tensor every step, overwritten by
    the next backward, as with zero_grad(set_to_none=False); copy it if you keep it."""
    reusable = (REUSE_GRAD_BUFFERS and not dist.initialized() and table.is_leaf and table.grad is None and not torch.is_grad_enabled()
                and not table._backward_hooks and not getattr(table, "_post_accumulate_grad_hooks", None)
                and _engine_accumulates_into(table))
    if not reusable:
        return torch.empty_like(table, memory_format=torch.contiguous_format)
    table.grad = _reused(table, "grad")
    return table.grad


def release_table_buffers(module: torch.nn.Module) -> None:
    """Drop the reused work buffers of every table of `module` (after training: at the paper's shapes each is
    a parameter-sized tensor, 640 MB for a 50,000 x 3,200 table, that would otherwise live as long as the model)."""
    for p in module.parameters():
        _TABLE_BUFFERS.pop(p, None)


def _return_grad(table: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
    """What backward returns for table: None when `grad` already is table.grad (written in place)."""
    return None if grad is table.grad else grad


class _WeightedBag(torch.autograd.Function):
    """out[b] = sum_j val[b, j] * table[idx[b, j]] (F @ table), i.e. F.embedding_bag(mode="sum").

    Backward: grad_table = F^T @ grad_out as a CSR product into the reused gradient buffer, and the
    gradient of val (the joint model trains the encoder through it) only when val requires it."""

    @staticmethod
    def forward(ctx, idx, val, table, code_t: TransposedCode):
        ctx.save_for_backward(idx, val, table)
        ctx.code_t = code_t
        # detached: embedding_bag then takes its forward-only kernel (no bookkeeping for its own backward)
        return F.embedding_bag(idx, table.detach(), per_sample_weights=val.detach(), mode="sum")  # [batch, width]

    @staticmethod
    def backward(ctx, grad_out):                                                       # [batch, width]
        idx, val, table = ctx.saved_tensors
        grad_val = grad_table = None
        if ctx.needs_input_grad[1]:
            grad_val = _bag_dots(grad_out, table, idx)                                 # [batch, k]
        if ctx.needs_input_grad[2]:
            # beta=0: the CSR product overwrites every row (zeros where no feature fired): no memset pass
            grad_table = _table_grad_out(table)                                        # [n_features, width]
            grad_table.addmm_(ctx.code_t.csr(), grad_out, beta=0)
            grad_table = _return_grad(table, grad_table)
        return None, grad_val, grad_table, None


class _PairBag(torch.autograd.Function):
    """Two codes over one table at once: (F_a @ table, F_b @ table) for (idx, val) [batch, k] and (aidx, aval)
    [batch, k_aux], the SAE's decode and AuxK's. Backward: the table's gradient is one CSR product,
    [F_a | F_b]^T @ [g_a; g_b] (rows interleaved), on the sort of `code`, the TransposedCode of [idx | aidx] with
    values [val | aval] that the encoder's backward also reads (two embedding_bag backwards sorted twice)."""

    @staticmethod
    def forward(ctx, idx, val, aidx, aval, table, code: TransposedCode):
        ctx.save_for_backward(idx, aidx, table)
        ctx.code = code
        t = table.detach()          # detached: embedding_bag's forward-only kernel
        return (F.embedding_bag(idx, t, per_sample_weights=val.detach(), mode="sum"),      # [batch, width]
                F.embedding_bag(aidx, t, per_sample_weights=aval.detach(), mode="sum"))

    @staticmethod
    def backward(ctx, grad_a, grad_b):                                                  # [batch, width] each
        idx, aidx, table = ctx.saved_tensors
        grad_val = grad_aval = grad_table = None
        if ctx.needs_input_grad[1]:
            grad_val = _bag_dots(grad_a, table, idx)                                    # [batch, k]
        if ctx.needs_input_grad[3]:
            grad_aval = _bag_dots(grad_b, table, aidx)                                  # [batch, k_aux]
        if ctx.needs_input_grad[4]:
            rhs = torch.stack([grad_a, grad_b], 1).reshape(-1, grad_a.shape[1])        # [2 batch, width]
            grad_table = _table_grad_out(table)
            grad_table.addmm_(ctx.code.csr_with(ctx.code.val, split=idx.shape[1]), rhs, beta=0)
            grad_table = _return_grad(table, grad_table)
        return None, grad_val, None, grad_aval, grad_table, None
