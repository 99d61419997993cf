"""THE hook-site resolver: one definition of "layer L", used both to collect and to splice.

    layer L  =  hidden_states[L]  =  the residual stream after L decoder blocks  =  output of block L-1
             =  TransformerLens blocks.{L-1}.hook_resid_post  =  blocks.{L}.hook_resid_pre

L ranges over 1..N for a model with N decoder blocks. (For L = N this is the last block's output *before*
the final norm; `output_hidden_states=True` returns the post-norm tensor as hidden_states[N], so the two
differ only there.) The published reference code trained on hidden_states[16] but spliced into the output
of block 16 (= hidden_states[17]); here collection and splicing share `block_for_layer`, and tests check
collection == hidden_states[L] and identity splice == unhooked logits.

Decoder blocks in transformers 4.x return a tuple (hidden, ...); in 5.x Llama returns a plain tensor.
Both are handled by `_get_hidden` / `_set_hidden`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .errors import UserError

_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    for path in _BLOCK_PATHS:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise UserError(f"cannot find the decoder blocks of {type(model).__name__} (looked for {', '.join(_BLOCK_PATHS)})")


def n_layers(model: nn.Module) -> int:
    return len(decoder_blocks(model))


def block_for_layer(model: nn.Module, layer: int) -> nn.Module:
    """The module whose *output* is the layer-L residual stream (block L-1)."""
    n = n_layers(model)
    if not 1 <= layer <= n:
        raise UserError(f"--layer {layer} is out of range: the model has {n} decoder blocks, "
                        f"so layer must be in 1..{n} (layer L = residual after L blocks)")
    return decoder_blocks(model)[layer - 1]


def hook_name(layer: int) -> str:
    return f"blocks.{layer - 1}.hook_resid_post"


def _get_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _set_hidden(output, hidden: torch.Tensor):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


class _StopForward(Exception):
    """Raised from the hook so collection spends no compute on later blocks."""


@torch.no_grad()
def collect(model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Layer-L residual stream for a batch: [batch, pos, d_model]. The forward stops after block L-1."""
    box: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        box.append(_get_hidden(output))
        raise _StopForward

    handle = block_for_layer(model, layer).register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError("the layer hook never fired; the model's forward did not reach the hooked block")
    return box[0]


@contextmanager
def splice(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the context, the layer-L residual stream h [batch, pos, d_model] is replaced by fn(h)."""

    def hook(_module, _inputs, output):
        h = _get_hidden(output)
        new = fn(h)
        if new.shape != h.shape:
            raise RuntimeError(f"splice function changed the shape {tuple(h.shape)} -> {tuple(new.shape)}")
        return _set_hidden(output, new.to(h.dtype))

    handle = block_for_layer(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
