"""Streaming training rows (common/rows.py): block reads equal the whole file, the windowed shuffle is a
permutation that touches few blocks, the block cache stays bounded, and training from disk is bitwise the
training from memory given the same order."""
from __future__ import annotations

import pytest
import torch

from common.data import get_activations, open_activation_file, save_activation_file
from common.rows import FileRows, MappedRows, TensorRows, as_rows, epoch_order
from common.sae import SAEConfig, TopKSAE, batch_codes, codes_and_residuals, train_sae


def _file(tmp_path, n=1000, d=6, docs=True, dtype=torch.float32, name="a.safetensors"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dtype)
    save_activation_file(tmp_path / name, x, torch.arange(n) // 7 if docs else None)
    return tmp_path / name, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_reads_and_gathers_equal_the_whole_file(tmp_path, dtype):
    path, x = _file(tmp_path, dtype=dtype)
    rows = open_activation_file(path, "--activations").with_blocks(64, 3)
    assert rows.n == 1000 and rows.d == 6 and rows.dtype == dtype
    assert torch.equal(rows.load(), x)
    assert torch.equal(rows.read(130, 517), x[130:517])
    idx = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:300]
    assert torch.equal(rows.gather(idx), x[idx])
    rows._cache.clear()
    assert torch.equal(rows.take(idx), x[idx]) and not rows._cache       # read row by row, nothing cached
    assert torch.equal(rows.docs(5, 40), torch.arange(5, 40) // 7)
    view = rows.view(100, 500)
    assert torch.equal(view.gather(torch.tensor([0, 499, 250])), x[[100, 599, 350]])
    assert torch.equal(torch.cat(list(view.chunks(77))), x[100:600])
    assert torch.equal(torch.cat(list(rows.chunks(50, stride=9))), x[::9])


def test_rows_spanning_several_files_read_as_one(tmp_path):
    from common.rows import Segment
    a, xa = _file(tmp_path, n=300, name="a.safetensors")
    b, _ = _file(tmp_path, n=500, name="b.safetensors")
    xb = torch.randn(500, 6, generator=torch.Generator().manual_seed(5))
    save_activation_file(b, xb, torch.arange(500))
    rows = FileRows([Segment(a), Segment(b)], block_rows=64, mix=2)
    full = torch.cat([xa, xb])
    assert rows.n == 800 and torch.equal(rows.read(250, 420), full[250:420])
    idx = torch.randperm(800, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rows.gather(idx), full[idx])


def test_epoch_order_is_plain_randperm_within_one_window_and_windowed_beyond():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(epoch_order(500, g1, (100, 5)), torch.randperm(500, generator=g2))   # 500 rows fit one window
    assert torch.equal(epoch_order(500, torch.Generator().manual_seed(3), None),
                       torch.randperm(500, generator=torch.Generator().manual_seed(3)))
    n, block, mix = 1050, 50, 4
    order = epoch_order(n, torch.Generator().manual_seed(4), (block, mix))
    assert torch.equal(order.sort().values, torch.arange(n))                  # a permutation of every row
    # each window (mix blocks' worth of positions) draws its rows from exactly mix blocks
    pos = 0
    while pos < n:
        blocks = torch.unique(order[pos:pos + mix * block] // block)
        size = sum(min(n, (b + 1) * block) - b * block for b in blocks.tolist())
        assert len(blocks) <= mix and size >= min(mix * block, n - pos)
        pos += size
    # shuffled across the window, not block by block
    assert len(torch.unique(order[:block] // block)) > 1
    again = epoch_order(n, torch.Generator().manual_seed(4), (block, mix))
    assert torch.equal(order, again)                                           # reproducible from the generator


def test_a_windowed_epoch_reads_each_block_once_and_caches_at_most_one_window(tmp_path):
    path, x = _file(tmp_path, n=2000)
    rows = open_activation_file(path, "--activations").with_blocks(100, 3)
    reads, most = [], [0]
    plain_read = rows.read

    def counted(start, stop, docs=False):
        if not docs:
            reads.append(start)
        return plain_read(start, stop, docs)
    rows.read = counted
    order = epoch_order(rows.n, torch.Generator().manual_seed(0), rows.shuffle)
    for s in range(0, rows.n - 63, 64):                         # batches of 64, the remainder dropped
        b = order[s:s + 64]
        assert torch.equal(rows.gather(b), x[b])
        most[0] = max(most[0], len(rows._cache))
    assert most[0] <= 3
    assert len(reads) == len(set(reads)) == 20                  # every block read once in the epoch


def _sae(seed=0):
    torch.manual_seed(seed)
    return TopKSAE(SAEConfig(d=6, n_latents=24, k=3, dead_tokens=500))


def test_training_from_disk_equals_training_from_memory(tmp_path):
    """The fast path (blocks read from disk, windowed order) against the plain reference (every row in memory,
    the same order): bitwise the same weights, in a single window and across windows."""
    path, x = _file(tmp_path, n=3000)
    for blocks in ((4096, 8), (256, 3)):
        disk = open_activation_file(path, "--activations").with_blocks(*blocks)
        mem = TensorRows(x).with_blocks(*blocks)
        a, b = _sae(), _sae()
        ra = train_sae(a, disk, x[:200], 120, 64, 1e-3, 40, 0, "disk")
        rb = train_sae(b, mem, x[:200], 120, 64, 1e-3, 40, 0, "memory")
        assert ra.history == rb.history
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), (blocks, k)


def test_codes_per_batch_equal_codes_of_every_row():
    """part2 codes each batch on the fly: the same (idx, val, r) as coding all rows at once."""
    x = torch.randn(700, 6, generator=torch.Generator().manual_seed(0))
    sae = _sae()
    idx, val, r = codes_and_residuals(sae, x)
    sel = torch.tensor([5, 699, 0, 333])
    bi, bv, br = batch_codes(sae, x[sel])
    assert torch.equal(bi, idx[sel]) and torch.allclose(bv, val[sel], atol=1e-6) and torch.allclose(br, r[sel], atol=1e-5)
    mapped = as_rows(x).map(lambda t: batch_codes(sae, t))
    assert isinstance(mapped, MappedRows) and mapped.n == 700
    with pytest.raises(TypeError):
        mapped.load()


def test_normalizer_from_rows_equals_normalizer_from_the_tensor(tmp_path):
    from common.normalize import Normalizer
    path, x = _file(tmp_path, n=5000)
    rows = open_activation_file(path, "--activations").with_blocks(128, 2)
    for mode in ("scalar", "zscore"):
        a, b = Normalizer.fit(rows, mode, max_rows=900), Normalizer.fit(x, mode, max_rows=900)
        assert torch.equal(a.scale, b.scale) and torch.equal(a.shift, b.shift)
        ref = x[::5].double()                                        # the stride the fit uses: 5000 // 900
        want = ref.std(0) if mode == "zscore" else ref.pow(2).sum(1).mean().div(6).sqrt().expand(6)
        assert torch.allclose(a.scale.double(), want, rtol=1e-6)


def test_a_nan_deep_in_the_file_fails_before_training_and_names_its_row(tmp_path):
    from argparse import Namespace

    from common.errors import UserError
    x = torch.randn(3000, 6)
    x[2222, 4] = float("nan")
    save_activation_file(tmp_path / "bad.safetensors", x)
    args = Namespace(activations=str(tmp_path / "bad.safetensors"), val_activations=None, train_tokens=None,
                     val_tokens=None, block_rows=256, shuffle_blocks=2)
    with pytest.raises(UserError, match="nan at row 2222, column 4"):
        get_activations(args, None)


def test_held_out_rows_are_capped_and_training_rows_stay_on_disk(tmp_path):
    from argparse import Namespace
    path, x = _file(tmp_path, n=2000)
    args = Namespace(activations=str(path), val_activations=None, train_tokens=None, val_tokens=None,
                     block_rows=256, shuffle_blocks=2)
    acts = get_activations(args, None)
    assert isinstance(acts.train, FileRows) and acts.train.shuffle == (256, 2)
    assert acts.train.n + acts.val.shape[0] == 2000 and torch.equal(acts.val, x[acts.train.n:])
    args.val_tokens, args.train_tokens = 50, 700
    acts = get_activations(args, None)
    assert acts.val.shape[0] == 50 and acts.train.n == 700 and acts.description["val_tokens"] == 50


def test_materialized_rows_are_the_mapped_rows_within_the_budget_and_stream_beyond(tmp_path):
    path, x = _file(tmp_path, n=900)
    rows = open_activation_file(path, "--activations").with_blocks(128, 2)
    sae = _sae()
    mapped = rows.map(lambda raw: batch_codes(sae, raw))
    per_row = 3 * 8 + 3 * 4 + 6 * 4                                 # idx int64 [3], val fp32 [3], r fp32 [6]
    kept = mapped.materialized(max_mb=per_row * 900 / 2 ** 20, batch=100)
    assert not isinstance(kept, MappedRows) and kept.shuffle == (128, 2) and kept.n == 900
    idx = torch.randperm(900, generator=torch.Generator().manual_seed(0))[:200]
    for a, b in zip(kept.gather(idx), mapped.gather(idx)):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert torch.equal(kept.gather(idx)[0], mapped.gather(idx)[0])  # the same latents
    assert mapped.materialized(max_mb=(per_row * 900 - 1) / 2 ** 20) is mapped   # one byte over: streams
    assert mapped.materialized(max_mb=0) is mapped


def test_mapped_chunks_call_the_function_on_bounded_slices_of_any_base():
    from common.rows import FN_BATCH, TupleRows
    x = torch.arange(3 * FN_BATCH + 5, dtype=torch.float32)[:, None]
    sizes = []
    for base in (TensorRows(x), TupleRows((x, 2 * x))):
        mapped = base.map(lambda t: sizes.append((t[0] if isinstance(t, tuple) else t).shape[0]) or t)
        got = list(mapped.chunks(2 * FN_BATCH + 1))
        first = torch.cat([g[0] if isinstance(g, tuple) else g for g in got])
        assert torch.equal(first, x) and max(sizes) <= FN_BATCH
        sizes.clear()
