"""engine.recompute: policies, their application (same gradients, parts run twice), the CPU
measure, and the auto choice against a given budget checked by brute force."""

from __future__ import annotations

import pytest
import torch

from engine import recompute
from engine.config import preset
from engine.model.pixart import PixArt
from engine.recompute import Recompute
from tests.model.test_pixart import pixart_inputs, randomize

CPU = torch.device("cpu")


def _model_and_step(batch: int = 16, depth: int = 4):
    cfg = preset("tiny", depth=depth)
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    model = randomize(PixArt(cfg).double())
    x, t, caption, lens, _ = pixart_inputs(cfg, batch=batch)

    def step(b: int) -> None:
        model(x[:b], t[:b], caption[:b], lens[:b]).square().mean().backward()
        for p in model.parameters():
            p.grad = None

    def grads():
        model(x, t, caption, lens).square().mean().backward()
        out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    return model, step, grads


@pytest.mark.parametrize("text,parts,every", [
    (0, (), 1), ("off", (), 1), (1, ("block",), 1), (3, ("block",), 3), ("mlp", ("mlp",), 1),
    ("mlp,attn/2", ("mlp", "attn"), 2), ("block/4", ("block",), 4),
])
def test_parse_and_name(text, parts, every):
    policy = Recompute.parse(text)
    assert (policy.parts, policy.every) == (parts, every)
    assert Recompute.parse(str(policy)) == policy


@pytest.mark.parametrize("bad", [-1, True, "mlp/0", "2x", "", "block,mlp", "mlp/"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError, match="recompute"):
        Recompute.parse(bad)


@pytest.mark.parametrize("policy", ["block", "mlp", "attn,cross_attn/2", "block/3"])
def test_apply_keeps_gradients_and_runs_parts_twice(policy):
    model, _, grads = _model_and_step(batch=3)
    reference = grads()
    keys = set(model.state_dict())
    policy = Recompute.parse(policy)
    calls = {}

    def counting(forward, key):
        def run(*args):
            calls[key] = calls.get(key, 0) + 1
            return forward(*args)
        return run

    for index, block in enumerate(model.blocks):  # the forward a recompute calls again
        for name in ("attn", "cross_attn", "mlp"):
            part = getattr(block, name)
            part.forward = counting(part.forward, (index, name))
    recompute.apply(model, policy)
    assert set(model.state_dict()) == keys and recompute.applied(model) == policy
    for name, g in grads().items():
        torch.testing.assert_close(g, reference[name], rtol=1e-12, atol=1e-14)
    for (index, name), count in calls.items():
        again = index in policy.chosen_blocks(len(model.blocks)) and (name in policy.parts or "block" in policy.parts)
        assert count == (2 if again else 1), (index, name, count)
    calls.clear()
    recompute.remove(model)  # the forwards in place before, the counting ones, come back
    grads()
    assert calls == {key: 1 for key in calls} and len(calls) == 3 * len(model.blocks)
    assert recompute.applied(model).off


def test_unknown_part_names_the_parts():
    model, _, _ = _model_and_step(batch=1)
    with pytest.raises(ValueError, match="ffn.*mlp"):
        recompute.apply(model, Recompute.parse("ffn"))


def test_cost_is_the_share_of_block_parameters():
    model, _, _ = _model_and_step(batch=1, depth=4)
    block = model.blocks[0]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    per_block = count(block)
    assert Recompute().cost(model) == 0 and Recompute.parse("block").cost(model) == 1
    assert Recompute.parse("mlp").cost(model) == pytest.approx(count(block.mlp) / per_block)
    # blocks 0 and 2 of 4
    assert Recompute.parse("attn,mlp/2").cost(model) == pytest.approx(
        (count(block.attn) + count(block.mlp)) / per_block / 2)


def test_cpu_measure_falls_with_recompute_and_grows_linearly():
    model, step, _ = _model_and_step()
    sizes = {}
    for name in ("off", "mlp", "block"):
        recompute.apply(model, Recompute.parse(name))
        sizes[name] = [recompute.measure(step, b, CPU) for b in (2, 4, 8)]
    assert sizes["off"][2] > sizes["mlp"][2] > sizes["block"][2] > 0
    for low, mid, high in sizes.values():  # saved activations per sample, weights once
        assert high - mid == pytest.approx(2 * (mid - low), rel=0.02)


def test_choose_picks_the_cheapest_policy_that_fits():
    model, step, _ = _model_and_step(batch=16, depth=4)
    run_batch = 16
    measured = {}
    for policy in recompute.candidates(model):  # brute force: every policy at the run's batch
        recompute.apply(model, policy)
        measured[policy] = recompute.measure(step, run_batch, CPU)
    recompute.remove(model)
    ordered = sorted(set(measured.values()))
    for budget in (ordered[-1], (ordered[0] + ordered[-1]) // 2, ordered[len(ordered) // 3] + 1, ordered[0]):
        choice = recompute.choose(model, step, run_batch, budget, CPU)
        assert choice.fits and recompute.applied(model) == choice.policy
        assert measured[choice.policy] <= budget * 1.01, (str(choice.policy), measured[choice.policy], budget)
        cheaper = [p for p in measured if p.cost(model) < choice.policy.cost(model) - 1e-12]
        assert all(measured[p] > budget * 0.99 for p in cheaper), [str(p) for p in cheaper if measured[p] <= budget]
    choice = recompute.choose(model, step, run_batch, ordered[0] // 2, CPU)
    assert not choice.fits and choice.policy == Recompute.parse("block") and "NOT fit" in choice.describe()


def test_microdit_blocks_offer_the_parts_they_call():
    """MicroDiT's blocks read their norms' weights in the fused ops and never call the norms:
    the parts offered are those whose forward runs, and recomputing them keeps the gradients."""
    from engine.model.microdit import MicroDiT
    from tests.model.test_microdit import inputs, tiny
    from tests.model.test_microdit import randomize as randomize_microdit

    config = tiny()
    model = randomize_microdit(MicroDiT(config)).double()
    assert recompute.block_parts(model) == ("attn", "cross_attn", "mlp")
    x, c_noise, caption = (t.double() for t in inputs(config, batch=2))

    def grads():
        model(x, c_noise, caption).square().mean().backward()
        out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    reference = grads()
    recompute.apply(model, Recompute.parse("attn,cross_attn,mlp"))
    for name, g in grads().items():
        torch.testing.assert_close(g, reference[name], rtol=1e-12, atol=1e-14)
