"""adamw_step_ (engine.ops.adamw) and engine.optim.AdamW against an fp64 AdamW and torch's AdamW.

Correctness rule (DESIGN §3) for the update p_new - p_old and the new moments:
    max|kernel - fp64 ref| <= 2 * max|torch.optim.AdamW same-dtype - fp64 ref| + atol,
the update compared rather than p_new so that the rule sees errors at the scale of the step
(lr), not of the parameter. The bf16 copy must equal the new parameter rounded to bf16. On CPU the
Triton kernel runs under the interpreter. Fresh random inputs each run (seed in every message).
"""

import copy
import importlib

import pytest
import torch

from engine.ops.adamw import adamw_ref, adamw_step_, low_precision, register_copy
from engine.optim import AdamW
from tests.ops.design_rule import assert_rule

adamw_op = importlib.import_module("engine.ops.adamw")
linear_op = importlib.import_module("engine.ops.linear")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_like_the_gpu")  # tests/ops/conftest.py
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.03)
# A tensor smaller than one program, one spanning several with a ragged end, a scalar-like one.
SHAPES = [(7, 5), (2 * adamw_op.BLOCK + 3,), (1,)]


def make_state(shapes, dtype, grad_dtype, device):
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(grad_dtype) for s in shapes]
    exp_avgs = [0.1 * torch.randn(s, device=device).to(dtype) for s in shapes]
    exp_avg_sqs = [0.01 * torch.rand(s, device=device).to(dtype) for s in shapes]
    return params, grads, exp_avgs, exp_avg_sqs


def torch_adamw(params, grads, exp_avgs, exp_avg_sqs, step):
    """torch.optim.AdamW's single-tensor path from the same state: the same-dtype baseline."""
    params = [p.clone() for p in params]
    opt = torch.optim.AdamW(params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], foreach=False)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p.grad = g.to(p.dtype)
        opt.state[p] = dict(step=torch.tensor(float(step - 1)), exp_avg=m.clone(), exp_avg_sq=v.clone())
    opt.step()
    return params, [opt.state[p]["exp_avg"] for p in params], [opt.state[p]["exp_avg_sq"] for p in params]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("step", [1, 9])
def test_update_matches_reference(device, backend, dtype, grad_dtype, step, _fresh_seed):
    params, grads, exp_avgs, exp_avg_sqs = make_state(SHAPES, dtype, grad_dtype, device)
    old = [p.clone() for p in params]
    copies = [torch.full(p.shape, float("nan"), dtype=torch.bfloat16, device=device) for p in params]
    copies[1] = None  # one parameter without a copy: its own launch group
    eager = torch_adamw(params, grads, exp_avgs, exp_avg_sqs, step)
    ref = [adamw_ref(p.double(), g.double(), m.double(), v.double(), step, **HYPER)
           for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)]
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, copies, step=step, backend=backend, **HYPER)
    for i in range(len(SHAPES)):
        # The update is new - old parameter: it carries the new parameter's rounding, which with
        # decay and step rounded apart (torch's order too) reaches one ulp of the parameter. One
        # eager element can be nearly exact by chance (seed 723695618: the (1,) tensor, eager 0.28
        # ulp, kernel 0.72), so the floor is that ulp, not a multiple of eager's error.
        param_ulp = torch.finfo(dtype).eps * params[i].abs().max().item()
        assert_rule([f"update[{i}]", f"exp_avg[{i}]", f"exp_avg_sq[{i}]"],
                    [params[i] - old[i], exp_avgs[i], exp_avg_sqs[i]],
                    [eager[0][i] - old[i], eager[1][i], eager[2][i]],
                    [ref[i][0] - old[i].double(), ref[i][1], ref[i][2]], _fresh_seed, floors=[param_ulp, 0.0, 0.0])
        if copies[i] is not None:
            assert torch.equal(copies[i], params[i].to(torch.bfloat16)), f"copy[{i}] (seed {_fresh_seed})"


@pytest.mark.parametrize("device", DEVICES)
def test_tensors_in_one_launch_stay_apart(device, _fresh_seed):
    """Many small tensors of one dtype share a launch through the address table: each must get
    its own gradient's update (a wrong table row would mix them)."""
    shapes = [(n,) for n in (1, 3, 64, 5, 130)]
    params, grads, exp_avgs, exp_avg_sqs = make_state(shapes, torch.float32, torch.float32, device)
    expected = [adamw_ref(p.double(), g.double(), m.double(), v.double(), 3, **HYPER)[0]
                for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)]
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, [None] * len(shapes), step=3, backend="triton", **HYPER)
    for i, (p, want) in enumerate(zip(params, expected)):
        torch.testing.assert_close(p.double(), want, rtol=0, atol=1e-6, msg=f"tensor {i} (seed {_fresh_seed})")


def test_errors():
    p, g = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match="one of each per param"):
        adamw_step_([p], [g], [], [p.clone()], [None], step=1, **HYPER)
    with pytest.raises(ValueError, match="step counts from 1"):
        adamw_step_([p], [g], [p.clone()], [p.clone()], [None], step=0, **HYPER)
    with pytest.raises(ValueError, match="tensor 0: grad"):
        adamw_step_([p], [torch.zeros(4)], [p.clone()], [p.clone()], [None], step=1, **HYPER)
    with pytest.raises(ValueError, match="contiguous"):
        q = torch.zeros(3, 2).t()
        adamw_step_([q], [torch.zeros(2, 3).t()], [q.clone()], [q.clone()], [None], step=1, **HYPER)
    with pytest.raises(TypeError, match="moments"):
        adamw_step_([p], [g], [p.double()], [p.clone()], [None], step=1, **HYPER)


# ---------------------------------------------------------------------------------------------
# engine.optim.AdamW
# ---------------------------------------------------------------------------------------------

def _model(device):
    torch.manual_seed(torch.initial_seed() % 1000)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_optimizer_follows_torch_adamw(device, backend, _fresh_seed):
    """Steps with a changing lr and a parameter left without a gradient for one step; the
    state dict loads into torch's AdamW, which then takes the same step."""
    ours, theirs = _model(device), _model(device)
    theirs.load_state_dict(ours.state_dict())
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = AdamW(ours.parameters(), copy_dtype=torch.bfloat16, backend=backend, **kwargs)
    ref = torch.optim.AdamW(theirs.parameters(), foreach=False, **kwargs)
    for step in range(4):
        x = torch.randn(8, 6, device=device)
        for model, optimizer in ((ours, opt), (theirs, ref)):
            optimizer.param_groups[0]["lr"] = 1e-2 * (step + 1)
            model(x).square().sum().backward()
            if step == 1:
                model[1].bias.grad = None  # skipped this step: its step count must lag by one
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} after step {step} (seed {_fresh_seed})")
            assert torch.equal(opt.copies[p], p.to(torch.bfloat16)), f"{name}'s copy after step {step}"
    assert opt.state[ours[1].bias]["step"].item() == 3 and opt.state[ours[1].weight]["step"].item() == 4
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # a live state dict shares its tensors
    x = torch.randn(8, 6, device=device)
    for model, optimizer in ((ours, opt), (theirs, ref)):
        model(x).square().sum().backward()
        optimizer.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"after loading our state into torch's (seed {_fresh_seed})")


def test_optimizer_loads_torch_state():
    model = _model("cpu")
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).sum().backward()
    ref.step()
    opt = AdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(ref.state_dict())
    opt.step()
    assert all(s["step"].item() == 2 and s["step"].device.type == "cpu" for s in opt.state.values())


def test_copies_are_read_while_valid():
    """The Linears' cast returns the optimizer's copy itself while the parameter is unchanged, and a
    fresh cast once it is changed outside the optimizer."""
    model = _model("cpu")
    opt = AdamW(model.parameters(), lr=1e-2, copy_dtype=torch.bfloat16)
    weight, bias = model[0].weight, model[0].bias
    x = torch.randn(4, 6)
    _, w_low, b_low = linear_op._cast_operands(x, weight, bias, torch.bfloat16)
    assert w_low is opt.copies[weight] and b_low is opt.copies[bias]
    model(x).sum().backward()
    opt.step()
    assert low_precision(weight, torch.bfloat16) is opt.copies[weight]
    assert torch.equal(opt.copies[weight], weight.to(torch.bfloat16))
    with torch.no_grad():
        weight.add_(1.0)  # outside the optimizer: the copy is stale
    fresh = low_precision(weight, torch.bfloat16)
    assert fresh is not opt.copies[weight] and torch.equal(fresh, weight.to(torch.bfloat16))
    assert low_precision(weight, torch.float16).dtype == torch.float16  # another dtype: a cast
    with pytest.raises(ValueError, match="register_copy"):
        register_copy(weight, torch.zeros(2, dtype=torch.bfloat16))


def test_optimizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="betas"):
        AdamW(_model("cpu").parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr, eps and weight_decay"):
        AdamW(_model("cpu").parameters(), lr=-1.0)
