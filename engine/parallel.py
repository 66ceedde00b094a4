"""Transformations applied to a model from the outside: compilation and data parallelism (DDP,
FSDP2); activation recompute is engine.recompute.

The model code stays single-device and flag-free; the training driver and benchmarks call these.
They work on any module with a ``blocks`` ModuleList (PixArt, DiT), and on every block list a
model names in ``block_lists`` (MicroDiT: its patch-mixer's and its backbone's); compile leaves
parameter names unchanged, so checkpoints load the same with or without it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's ``blocks`` ModuleList, what these transformations and engine.recompute act on."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f"{type(model).__name__} has no non-empty `blocks` ModuleList to transform")
    return blocks


def blocks_in_order(model: nn.Module) -> list[nn.Module]:
    """Every block the model runs, in forward order: those of the ModuleLists its ``block_lists``
    attribute names (MicroDiT: the patch-mixer's, then the backbone's), else its ``blocks``. The
    units of FSDP2 and of per-block compilation; recompute acts on ``blocks`` alone."""
    names = getattr(model, "block_lists", ("blocks",))
    found = [getattr(model, name, None) for name in names]
    if not all(isinstance(blocks, nn.ModuleList) for blocks in found):
        raise TypeError(f"{type(model).__name__}.block_lists names {names}, not all of them ModuleLists")
    blocks_of(model)  # every model has its non-empty ``blocks`` too (recompute's)
    return [block for blocks in found for block in blocks]


def apply_compile(model: nn.Module, per_block: bool = True, **compile_kwargs) -> nn.Module:
    """torch.compile the model: each block separately (one graph reused by all blocks, short compile
    times, as torchtitan does), or the whole forward when ``per_block`` is False."""
    if per_block:
        for block in blocks_in_order(model):
            block.compile(**compile_kwargs)
    else:
        model.compile(**compile_kwargs)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel (the process group must exist): gradients are averaged
    over ranks during backward, bucket by bucket, overlapping with the remaining backward."""
    from torch.nn.parallel import DistributedDataParallel

    # gradient_as_bucket_view: gradients live inside the communication buckets (no extra copy)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def apply_fsdp2(model: nn.Module, mixed_precision: bool = True) -> nn.Module:
    """Shard parameters, gradients and optimizer state over all ranks with FSDP2 (``fully_shard``),
    in place: each block (``blocks_in_order``: MicroDiT's mixer blocks too) is one communication
    unit, the root holds the remaining parameters (embedders, final layer). With
    ``mixed_precision`` the gathered parameters compute in bf16 and gradients are reduced in fp32
    (MixedPrecisionPolicy); the fp32 shards stay the optimizer's master weights. Without it
    everything stays in the parameters' own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
              else MixedPrecisionPolicy())
    blocks = blocks_in_order(model)
    for index, block in enumerate(blocks):
        # the last block is the first one backward needs: keeping it gathered saves one all-gather
        fully_shard(block, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    fully_shard(model, mp_policy=policy)
    return model
