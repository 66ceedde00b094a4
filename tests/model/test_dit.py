import pytest
import torch
import torch.nn as nn

from engine.config import preset
from engine.model import DiT
from engine.model.layers import Mlp
from tests.model.helpers import randomize


def _inputs(cfg, batch=3, height=None, width=None):
    x = torch.randn(batch, cfg.in_channels, height or cfg.input_size, width or cfg.input_size, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,)).double()
    labels = torch.randint(0, cfg.num_classes + 1, (batch,))
    return x, t, labels


def test_forward_shape_and_label_dependence():
    cfg = preset("tiny-dit")
    model = randomize(DiT(cfg).double())
    x, t, labels = _inputs(cfg, height=6, width=10)
    out = model(x, t, labels)
    assert out.shape == (3, cfg.out_channels, 6, 10)
    other = (labels + 1) % (cfg.num_classes + 1)
    assert not torch.allclose(model(x, t, other), out)
    assert model.null_class == cfg.num_classes


def test_zero_init_is_identity_blocks_and_zero_output():
    # DiT's init: zero adaLN makes every block the identity and the zero head outputs zeros
    cfg = preset("tiny-dit")
    model = DiT(cfg).double()
    x, t, labels = _inputs(cfg)
    assert torch.count_nonzero(model(x, t, labels)) == 0


def test_flops_per_sample_matches_counted_macs():
    cfg = preset("tiny-dit")
    model = DiT(cfg).double()
    x, t, labels = _inputs(cfg, batch=2)
    macs = [0]

    def linear_hook(module, inputs, output):
        macs[0] += inputs[0].numel() * module.out_features

    def mlp_hook(module, inputs, output):  # an Mlp runs its two Linears as one op: their hooks do not fire
        tokens = inputs[0].numel() // module.fc1.in_features
        macs[0] += tokens * (module.fc1.in_features * module.fc1.out_features
                             + module.fc2.in_features * module.fc2.out_features)

    hooks = [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    hooks += [m.register_forward_hook(mlp_hook) for m in model.modules() if isinstance(m, Mlp)]
    model(x, t, labels)
    for h in hooks:
        h.remove()
    N = (cfg.input_size // cfg.patch_size) ** 2
    attention = cfg.depth * 2 * N * N * cfg.hidden_size * 2  # per batch of 2
    expected = 3 * 2 * (macs[0] + attention) / 2
    assert model.flops_per_sample(cfg.input_size * 8, cfg.input_size * 8) == pytest.approx(expected, rel=1e-12)
