"""engine.parallel's units: the blocks each transformation acts on, in forward order, and FSDP2
making each of them a communication unit of its own (one rank, gloo, on the CPU)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from engine.config import preset
from engine.model import MicroDiT, build_model
from engine.parallel import apply_fsdp2, blocks_in_order


def _microdit() -> MicroDiT:
    return build_model(preset("microdit-tiny", 16))


def test_microdit_units_are_its_mixer_blocks_then_its_backbone_blocks():
    model = _microdit()
    units = blocks_in_order(model)
    assert len(model.mixer) > 0 and len(model.blocks) > 0
    assert [id(b) for b in units] == [id(b) for b in [*model.mixer, *model.blocks]]


def test_pixart_units_are_its_blocks():
    model = build_model(preset("tiny", 16))
    assert [id(b) for b in blocks_in_order(model)] == [id(b) for b in model.blocks]


def test_block_lists_naming_no_module_list_is_an_error():
    class Odd(nn.Module):
        block_lists = ("mixer", "blocks")

        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(2, 2)
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(TypeError, match="block_lists names \\('mixer', 'blocks'\\)"):
        blocks_in_order(Odd())


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_every_microdit_block_as_its_own_unit(one_rank_group):
    from torch.distributed.fsdp import FSDPModule

    model = apply_fsdp2(_microdit(), mixed_precision=False)
    assert all(isinstance(block, FSDPModule) for block in blocks_in_order(model))
    assert isinstance(model, FSDPModule)
    config = preset("microdit-tiny", 16)
    x = torch.randn(2, config.in_channels, config.input_size, config.input_size)
    caption = torch.randn(2, config.text_len, config.caption_channels)
    out = model(x, torch.randn(2) / 4, caption)
    out.square().mean().backward()  # forward and backward through the units' all-gathers
    assert all(p.grad is not None for p in model.mixer.parameters())
