"""engine.step_graph: a training step replayed as a CUDA graph trains exactly as the eager step.

The reference is the same step run eagerly on an identical model, with the same inputs and the
same generator seeds: the graph must reproduce its losses and weights after several steps (new
inputs and new seeds every step, so a replay that kept the captured inputs or random numbers, or
wrote gradients the optimizer does not see, fails). With engine.optim.AdamW the graphed model
reads the optimizer's bf16 weight copies and the eager one casts its weights: a replay that read
stale copies fails too. The CPU checks cover the input checks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine.config import preset
from engine.diffusion.iddpm import GaussianDiffusion
from engine.model import build_model
from engine.ops.backend import graph_step
from engine.optim import AdamW
from engine.step_graph import StepGraph, check_same_inputs


def test_input_mismatch_names_the_input():
    captured = {"latent": torch.zeros(4, 4, 8, 8), "t": torch.zeros(4, dtype=torch.int64)}
    check_same_inputs({"latent": torch.ones(4, 4, 8, 8), "t": torch.ones(4, dtype=torch.int64)}, captured)
    with pytest.raises(ValueError, match=r"input 'latent' is \(2, 4, 8, 8\).*\(4, 4, 8, 8\)"):
        check_same_inputs({"latent": torch.zeros(2, 4, 8, 8), "t": captured["t"]}, captured)
    with pytest.raises(ValueError, match="input 't' is .*torch.float32"):
        check_same_inputs({"latent": captured["latent"], "t": torch.zeros(4)}, captured)
    with pytest.raises(ValueError, match=r"inputs are \['latent'\]"):
        check_same_inputs({"latent": captured["latent"]}, captured)


def test_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StepGraph(torch.device("cpu"), [])


def _step_inputs(config, step: int, batch: int, device) -> dict:
    g = torch.Generator(device).manual_seed(1000 + step)
    side = config.input_size
    return {
        "x0": torch.randn(batch, config.in_channels, side, side, generator=g, device=device),
        "caption": torch.randn(batch, config.text_len, config.caption_channels, generator=g, device=device),
        "lens": torch.randint(0, config.text_len + 1, (batch,), generator=g, device=device),
    }


def _trainer(model, device, generator, kind="torch", copies=False):
    """(optimizer, forward_backward): torch's fused AdamW (kind "torch") or engine.optim.AdamW
    ("engine"), the latter with bf16 copies of the weights for the model's Linears when ``copies``."""
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)
    if kind == "engine":
        optimizer = AdamW(model.parameters(), lr=1e-3)
        if copies:
            assert optimizer.attach_copies(model, torch.bfloat16) > 0
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def forward_backward(inputs):
        x0 = inputs["x0"]
        t = diffusion.sample_noise_level(x0.shape[0], generator, device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = diffusion.training_losses(model, x0, t, dict(caption=inputs["caption"], caption_lens=inputs["lens"]),
                                             noise=noise)["loss"].mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        return {"loss": loss.detach(), "norm": norm}

    return optimizer, forward_backward


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["torch", "engine"])
def test_graph_trains_as_eager(optimizer):
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = preset("tiny", 64)
    eager_model = build_model(config).to(device).train()
    graph_model = copy.deepcopy(eager_model)
    initial = [p.detach().clone() for p in eager_model.parameters()]
    eager_gen, graph_gen = torch.Generator(device), torch.Generator(device)
    eager_opt, eager_fb = _trainer(eager_model, device, eager_gen, optimizer)
    graph_opt, graph_fb = _trainer(graph_model, device, graph_gen, optimizer, copies=optimizer == "engine")
    graph = StepGraph(device, graph_model.parameters(), generators=[graph_gen], warmup_steps=2)
    steps = 6
    for step in range(steps):
        inputs = _step_inputs(config, step, 4, device)
        eager_gen.manual_seed(step)
        with graph_step():  # the kernels the graph's ops choose (linear: cuBLASLt where built)
            eager_out = eager_fb(inputs)
        eager_opt.step()
        eager_opt.zero_grad(set_to_none=True)
        graph_gen.manual_seed(step)
        graph_out = graph.run(graph_fb, inputs)
        graph_opt.step()
        assert graph.captured == (step >= 2)
        torch.testing.assert_close(graph_out["loss"], eager_out["loss"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(graph_out["norm"], eager_out["norm"], rtol=1e-4, atol=1e-6)
    moved = 0.0
    for p_graph, p_eager, p0 in zip(graph_model.parameters(), eager_model.parameters(), initial):
        torch.testing.assert_close(p_graph, p_eager, rtol=0, atol=2e-5)
        moved = max(moved, (p_eager - p0).abs().max().item())
    assert moved > 1e-3  # six Adam steps of lr 1e-3 moved the weights: the comparison has teeth


@pytest.mark.gpu
def test_replay_checks_inputs_and_gradients():
    device = torch.device("cuda")
    config = preset("tiny", 64)
    model = build_model(config).to(device).train()
    generator = torch.Generator(device)
    _, forward_backward = _trainer(model, device, generator)
    graph = StepGraph(device, model.parameters(), generators=[generator], warmup_steps=1)
    for step in range(2):
        graph.run(forward_backward, _step_inputs(config, step, 4, device))
    with pytest.raises(ValueError, match="input 'x0' is"):
        graph.run(forward_backward, _step_inputs(config, 2, 2, device))
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="gradient was replaced or released"):
        graph.run(forward_backward, _step_inputs(config, 3, 4, device))
