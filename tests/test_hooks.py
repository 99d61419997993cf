"""The one hook-site resolver: collection == hidden_states[L], identity splice == unhooked logits."""
import pytest
import torch
from torch import nn

from common.cli import UserError
from common.hooks import block_for_layer, collect, decoder_blocks, n_layers, splice


def _batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_collect_equals_hidden_states(tiny_lm):
    model, tok = tiny_lm
    ids, mask = _batch(tok, ["the weather is nice today and we walk", "dear sir, I write to you"])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    N = n_layers(model)
    for L in range(1, N):
        h = collect(model, L, ids, mask)
        assert h.shape == ref[L].shape
        assert torch.equal(h, ref[L]), f"layer {L}"
    # layer N is the last block's output *before* the final norm; hidden_states[N] is after it
    assert not torch.allclose(collect(model, N, ids, mask), ref[N])


def test_identity_splice_gives_unhooked_logits(tiny_lm):
    model, tok = tiny_lm
    ids, mask = _batch(tok, ["the weather is nice today", "omg this food is so good"])
    n_hooks = [len(b._forward_hooks) for b in decoder_blocks(model)]
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        for L in range(1, n_layers(model) + 1):
            with splice(model, L, lambda h: h.clone()):
                spliced = model(input_ids=ids, attention_mask=mask).logits
            kl = torch.nn.functional.kl_div(spliced.log_softmax(-1), base.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1)
            assert kl.max().item() < 1e-6
    # our hook is removed after the context (transformers 5.x keeps output-capturing hooks of its own)
    assert [len(b._forward_hooks) for b in decoder_blocks(model)] == n_hooks


def test_splice_really_changes_the_stream(tiny_lm):
    model, tok = tiny_lm
    ids, mask = _batch(tok, ["the weather is nice today"])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with splice(model, 1, lambda h: h * 0):
            zeroed = model(input_ids=ids, attention_mask=mask).logits
    assert (base - zeroed).abs().max() > 1e-3


def test_collection_stops_after_the_hooked_block(tiny_lm):
    model, tok = tiny_lm
    ids, mask = _batch(tok, ["the weather is nice"])
    calls = []
    handles = [b.register_forward_hook(lambda m, i, o, j=j: calls.append(j)) for j, b in enumerate(decoder_blocks(model))]
    try:
        collect(model, 1, ids, mask)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]


def test_layer_out_of_range(tiny_lm):
    model, _ = tiny_lm
    N = n_layers(model)
    for bad in (0, N + 1, -1):
        with pytest.raises(UserError, match="out of range"):
            block_for_layer(model, bad)


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, h):
        return (self.lin(h) + h, "extra")


class _TupleModel(nn.Module):
    """Blocks that return tuples, as transformers 4.x decoder layers do."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_TupleBlock() for _ in range(3)])

    def forward(self, input_ids, attention_mask=None, use_cache=False, output_hidden_states=False):
        h, hs = input_ids, [input_ids]
        for b in self.model.layers:
            h = b(h)[0]
            hs.append(h)
        return h, hs


def test_tuple_returning_blocks():
    torch.manual_seed(0)
    m = _TupleModel()
    x = torch.randn(2, 5, 4)
    _, hs = m(x)
    assert torch.equal(collect(m, 2, x), hs[2])
    with splice(m, 2, lambda h: h * 0):
        out, _ = m(x)
    expected = m.model.layers[2](torch.zeros(2, 5, 4))[0]
    assert torch.allclose(out, expected)
