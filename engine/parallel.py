"""Transformations applied to a model from the outside: activation checkpointing and compilation.

The model code stays single-device and flag-free; the training driver and benchmarks call these.
Both work on any module with a ``blocks`` ModuleList (PixArt, DiT) and leave parameter names
unchanged, so checkpoints load the same with or without them.
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `blocks` ModuleList to transform")
    return blocks


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> nn.Module:
    """Recompute every ``every``-th block's activations in the backward pass instead of storing them.

    Only the block inputs are kept; the block runs again during backward (non-reentrant
    checkpointing, so it composes with torch.compile and FSDP2). ``every=1`` checkpoints all blocks.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    for index, block in enumerate(_blocks(model)):
        if index % every == 0 and not getattr(block, "_engine_checkpointed", False):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            block._engine_checkpointed = True
    return model


def apply_compile(model: nn.Module, per_block: bool = True, **compile_kwargs) -> nn.Module:
    """torch.compile the model: each block separately (one graph reused by all blocks, short compile
    times, as torchtitan does), or the whole forward when ``per_block`` is False."""
    if per_block:
        for block in _blocks(model):
            block.compile(**compile_kwargs)
    else:
        model.compile(**compile_kwargs)
    return model
