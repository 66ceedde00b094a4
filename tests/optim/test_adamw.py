"""adamw_step_ (engine.optim.adamw_kernel) and engine.optim.AdamW against an fp64 AdamW and
torch's AdamW; the low-precision copies the optimizer keeps for the engine's Linears; the folded
gradient clipping (bitwise clip_grad_norm_ then the step) and the fused EMA (bitwise
torch._foreach_lerp_ after the step).

Correctness rule (docs/design.md §3) for the update p_new - p_old and the new moments:
    max|kernel - fp64 ref| <= 2 * max|torch.optim.AdamW same-dtype - fp64 ref| + atol,
the update compared rather than p_new so that the rule sees errors at the scale of the step
(lr), not of the parameter. The bf16 copy must equal the new parameter rounded to bf16. On CPU the
Triton kernel runs under the interpreter. Fresh random inputs each run (seed in every message).
"""

import copy

import pytest
import torch

import engine.optim.adamw_kernel as kernel_module
from engine.model.layers import Linear, Mlp
from engine.ops.backend import extension
from engine.optim import AdamW, ParameterCopy, clip_coefficient
from engine.optim.adamw_kernel import adamw_ref, adamw_step_
from tests.ops.design_rule import assert_rule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_like_the_gpu",  # tests/optim/conftest.py
                                      "interpreter_fuses_fma_like_the_gpu")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.03)
# A tensor smaller than one program, one spanning several with a ragged end, a scalar-like one.
SHAPES = [(7, 5), (2 * kernel_module.BLOCK + 3,), (1,)]


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("where", ["none", "first", "ragged_end", "middle_block", "nan_grad"])
def test_nonfinite_flag(device, backend, where, _fresh_seed):
    """The flag turns 1 exactly when an updated parameter is inf or NaN, wherever it sits (a
    masked last block, a full block in the middle, a whole small tensor), and stays 1."""
    params, grads, exp_avgs, exp_avg_sqs = make_state(SHAPES, torch.float32, torch.float32, device)
    big = SHAPES[1][0]
    index = {"first": (0, 3), "ragged_end": (1, big - 1), "middle_block": (1, kernel_module.BLOCK + 17),
             "nan_grad": (2, 0)}.get(where)
    if where == "nan_grad":
        grads[2][0] = float("nan")
    elif index is not None:
        params[index[0]].view(-1)[index[1]] = float("inf")
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, [None] * len(SHAPES), step=1, backend=backend,
                nonfinite=flag, **HYPER)
    bad = any(not torch.isfinite(p).all() for p in params)
    assert bad == (where != "none"), f"the test's setup did not (or did) make a parameter non-finite: {where}"
    assert flag.item() == int(bad), f"{where}: flag {flag.item()}, parameters non-finite: {bad} (seed {_fresh_seed})"
    if bad:  # sticky: a later finite step leaves it set
        params, grads, exp_avgs, exp_avg_sqs = make_state(SHAPES, torch.float32, torch.float32, device)
        adamw_step_(params, grads, exp_avgs, exp_avg_sqs, [None] * len(SHAPES), step=2, backend=backend,
                    nonfinite=flag, **HYPER)
        assert flag.item() == 1


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
    with pytest.raises(TypeError, match="float32 shadow"):
        adamw_step_([p], [g], [p.clone()], [p.clone()], [None], step=1, shadows=[p.double()], **HYPER)
    with pytest.raises(ValueError, match="tensor 0: shadow"):
        adamw_step_([p], [g], [p.clone()], [p.clone()], [None], step=1, shadows=[torch.zeros(4)], **HYPER)
    with pytest.raises(ValueError, match="one of each per param"):
        adamw_step_([p], [g], [p.clone()], [p.clone()], [None], step=1, shadows=[], **HYPER)
    with pytest.raises(ValueError, match="grad_scale must be a one-element torch.float32"):
        adamw_step_([p], [g], [p.clone()], [p.clone()], [None], step=1, grad_scale=torch.ones(2), **HYPER)
    with pytest.raises(ValueError, match="grad_scale must be a one-element torch.float32"):
        adamw_step_([p], [g], [p.clone()], [p.clone()], [None], step=1, grad_scale=torch.ones(1).double(), **HYPER)
    with pytest.raises(ValueError, match="nonfinite must be a one-element torch.int32"):
        adamw_step_([p], [g], [p.clone()], [p.clone()], [None], step=1, nonfinite=torch.zeros(1), **HYPER)


# ---------------------------------------------------------------------------------------------
# Folded gradient clipping and the fused EMA in adamw_step_
# ---------------------------------------------------------------------------------------------

def _clone_all(*lists):
    return [[t.clone() if t is not None else None for t in ts] for ts in lists]


def _assert_bitwise(names, got, want, seed, ulps: int = 0):
    """Equal element by element (NaN equal to NaN); ``ulps`` > 0 allows that many fp32 ulps of
    the tensor's largest magnitude instead (see _FOLD_ULPS)."""
    if ulps:
        for name, a, b in zip(names, got, want):
            for i, (x, y) in enumerate(zip(a, b)):
                if x is not None:
                    tolerance = ulps * 2.0**-23 * y.float().abs().max().item()
                    torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=tolerance,
                                               msg=lambda m, n=name, j=i: f"{n}[{j}] (seed {seed}): {m}")
        return
    for name, a, b in zip(names, got, want):
        for i, (x, y) in enumerate(zip(a, b)):
            if x is None:
                assert y is None
                continue
            differ = (x != y) & ~(x.isnan() & y.isnan())
            assert not differ.any(), (f"{name}[{i}]: {int(differ.sum())} of {x.numel()} elements differ, "
                                      f"max |diff| {(x.double() - y.double()).abs().max().item():.3g} (seed {seed})")


# On an H100 the Triton pass compiled with a grad scale is not bitwise the one without it, even at
# scale 1: the compiler fuses its multiply-adds differently, and a term's last-bit difference
# survives where the update nearly cancels the old value, which makes a small result many of its
# own ulps apart (1.2e-6 relative; bench/results/h100_pytest_gpu_session_b3d184e.txt), so the
# tolerance is in ulps of the tensor's largest magnitude. On the CPU (eager, and Triton's
# interpreter) it is bitwise.
_FOLD_ULPS = {"cpu": 0, "cuda": 2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_is_scaling_the_gradients_first(device, backend, dtype, _fresh_seed):
    """grad_scale multiplies every fp32 gradient element inside the pass: parameters, moments and
    copies are those of multiplying the gradients in place first (clip_grad_norm_'s
    _foreach_mul_ by a 0-dim coefficient) and stepping without it; bitwise on the CPU, within
    _FOLD_ULPS on CUDA."""
    params, grads, exp_avgs, exp_avg_sqs = make_state(SHAPES, dtype, torch.float32, device)
    copies = [torch.zeros(p.shape, dtype=torch.bfloat16, device=device) for p in params]
    copies[2] = None
    scale = torch.rand((), device=device) * 0.9 + 0.05  # (0.05, 0.95): rounds most products
    clipped = _clone_all(params, grads, exp_avgs, exp_avg_sqs, copies)
    torch._foreach_mul_(clipped[1], scale)
    adamw_step_(*clipped, step=4, backend=backend, **HYPER)
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, copies, step=4, backend=backend, grad_scale=scale.reshape(1),
                **HYPER)
    _assert_bitwise(["param", "exp_avg", "exp_avg_sq", "copy"], [params, exp_avgs, exp_avg_sqs, copies],
                    [clipped[0], clipped[2], clipped[3], clipped[4]], _fresh_seed, ulps=_FOLD_ULPS[device])
    assert not torch.equal(grads[1], clipped[1][1]), "the gradients themselves must stay unscaled"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.9999, 0.3])  # lerp weight 1e-4 (< 0.5) and 0.7 (torch's other formula)
def test_ema_is_foreach_lerp_after_the_step(device, backend, dtype, decay, _fresh_seed):
    """Shadows move as torch._foreach_lerp_(shadows, [p.float() ...], 1 - decay) moves them after
    the same step, bitwise; a parameter without a shadow (None) is updated as before, in its own
    launch group; with a copy and a grad_scale in the same pass."""
    params, grads, exp_avgs, exp_avg_sqs = make_state(SHAPES, dtype, torch.float32, device)
    copies = [torch.zeros(p.shape, dtype=torch.bfloat16, device=device) for p in params]
    # shadows near the parameters, as an EMA is: the lerp's rounding shows at the parameters' scale
    shadows = [p.float() + 0.01 * torch.randn(p.shape, device=device) for p in params]
    shadows[0] = None
    scale = torch.full((1,), 0.5, device=device)
    separate = _clone_all(params, grads, exp_avgs, exp_avg_sqs, copies, shadows)
    adamw_step_(*separate[:5], step=2, backend=backend, grad_scale=scale, **HYPER)
    with_shadow = [i for i, s in enumerate(shadows) if s is not None]
    torch._foreach_lerp_([separate[5][i] for i in with_shadow], [separate[0][i].float() for i in with_shadow],
                         1.0 - decay)
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, copies, step=2, backend=backend, grad_scale=scale,
                shadows=shadows, ema_weight=1.0 - decay, **HYPER)
    _assert_bitwise(["param", "exp_avg", "exp_avg_sq", "copy", "shadow"],
                    [params, exp_avgs, exp_avg_sqs, copies, shadows],
                    [separate[0], separate[2], separate[3], separate[4], separate[5]], _fresh_seed)


@pytest.mark.parametrize("device", DEVICES)
def test_flag_off_skips_the_check_only(device, _fresh_seed):
    """nonfinite=None compiles the check out of the kernel; the update is the same."""
    params, grads, exp_avgs, exp_avg_sqs = make_state(SHAPES, torch.float32, torch.float32, device)
    flagged = _clone_all(params, grads, exp_avgs, exp_avg_sqs)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    adamw_step_(*flagged, [None] * len(SHAPES), step=1, backend="triton", nonfinite=flag, **HYPER)
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, [None] * len(SHAPES), step=1, backend="triton", **HYPER)
    _assert_bitwise(["param", "exp_avg", "exp_avg_sq"], [params, exp_avgs, exp_avg_sqs],
                    [flagged[0], flagged[2], flagged[3]], _fresh_seed)
    assert flag.item() == 0


# ---------------------------------------------------------------------------------------------
# engine.optim.AdamW
# ---------------------------------------------------------------------------------------------

class _Net(torch.nn.Module):
    """Two engine Linears (which read copies) and a torch Linear (which does not)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = Linear(6, 5), Linear(5, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.fc2(torch.nn.functional.silu(self.fc1(x))))


def _model(device):
    torch.manual_seed(torch.initial_seed() % 1000)
    return _Net().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_optimizer_follows_torch_adamw(device, backend, _fresh_seed):
    """Steps with a changing lr and a parameter left without a gradient for one step; the
    state dict loads into torch's AdamW, which then takes the same step. Every copy equals its
    parameter rounded to bf16 after each step, written in place."""
    ours, theirs = _model(device), _model(device)
    theirs.load_state_dict(ours.state_dict())
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = AdamW(ours.parameters(), backend=backend, **kwargs)
    assert opt.attach_copies(ours, torch.bfloat16) == 4  # fc1 and fc2's weights and biases, not head's
    storage = {p: c.tensor.data_ptr() for p, c in opt.copies.items()}
    ref = torch.optim.AdamW(theirs.parameters(), foreach=False, **kwargs)
    for step in range(4):
        x = torch.randn(8, 6, device=device)
        for model, optimizer in ((ours, opt), (theirs, ref)):
            optimizer.param_groups[0]["lr"] = 1e-2 * (step + 1)
            model(x).square().sum().backward()
            if step == 1:
                model.fc2.bias.grad = None  # skipped this step: its step count must lag by one
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} after step {step} (seed {_fresh_seed})")
        for p, c in opt.copies.items():
            assert c.current() is c.tensor and c.tensor.data_ptr() == storage[p], f"copy moved at step {step}"
            assert torch.equal(c.tensor, p.to(torch.bfloat16)), f"copy after step {step} (seed {_fresh_seed})"
    assert opt.state[ours.fc2.bias]["step"].item() == 3 and opt.state[ours.fc2.weight]["step"].item() == 4
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # a live state dict shares its tensors
    x = torch.randn(8, 6, device=device)
    for model, optimizer in ((ours, opt), (theirs, ref)):
        model(x).square().sum().backward()
        optimizer.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6,
                                   msg=f"after loading our state into torch's (seed {_fresh_seed})")


def test_optimizer_loads_torch_state():
    model = _model("cpu")
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).sum().backward()
    ref.step()
    opt = AdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(ref.state_dict())
    opt.step()
    assert all(s["step"].item() == 2 and s["step"].device.type == "cpu" for s in opt.state.values())


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_copy_is_current_until_the_parameter_changes_elsewhere(backend):
    """A copy is current after attachment and after every step (the Triton pass moves no version
    counter, the eager one does: both are recorded); an in-place change outside the optimizer, a
    state-dict load or a move to new storage makes it stale until the next step."""
    model = _model("cpu")
    opt = AdamW(model.parameters(), lr=1e-2, backend=backend)
    opt.attach_copies(model, torch.bfloat16)
    weight = model.fc1.weight
    copy_ = model.fc1.weight_copy
    assert isinstance(copy_, ParameterCopy) and copy_ is opt.copies[weight] and copy_.current() is copy_.tensor

    def step():
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert copy_.current() is copy_.tensor and torch.equal(copy_.tensor, weight.to(torch.bfloat16))

    step()
    with torch.no_grad():
        weight.add_(1.0)
    assert copy_.current() is None
    step()
    model.load_state_dict(_model("cpu").state_dict())
    assert copy_.current() is None
    step()
    weight.data = weight.data.clone()  # new storage, same version counter
    assert copy_.current() is None


def test_attach_copies():
    """Only parameters of this optimizer that a submodule asks for (``<name>_copy``) get one; a
    deep copy of the module carries none; a second attachment in another dtype is an error."""
    model = _model("cpu")
    opt = AdamW([p for name, p in model.named_parameters() if name != "fc2.bias"], lr=1e-2)
    assert opt.attach_copies(model, torch.bfloat16) == 3
    assert model.fc2.bias_copy is None and not hasattr(model.head, "weight_copy")
    assert {id(p) for p in opt.copies} == {id(model.fc1.weight), id(model.fc1.bias), id(model.fc2.weight)}
    assert all(c.tensor.dtype == torch.bfloat16 for c in opt.copies.values())
    clone = copy.deepcopy(model)
    assert clone.fc1.weight_copy is None and clone.fc1.bias_copy is None
    assert opt.attach_copies(model, torch.bfloat16) == 3  # again: the same copies
    with pytest.raises(ValueError, match="already has a torch.bfloat16 copy"):
        opt.attach_copies(model, torch.float16)


# The engine's Linear and Mlp hand the copies to their ops (on CPU: triton = the Triton passes
# under the interpreter, cuda = engine._C's C++ reference of the cuBLASLt GEMMs).
OP_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(extension() is None,
                                                                      reason="engine._C is not built"))]


def _layers():
    torch.manual_seed(torch.initial_seed() % 1000)
    return torch.nn.ModuleDict(dict(linear=Linear(24, 40, activation="gelu_tanh"), chunks=Linear(24, 48, chunks=3),
                                    mlp=Mlp(24, 64, 16)))


def _outputs_and_grads(layers, x, name):
    """Outputs and parameter gradients of one layer under CPU bf16 autocast."""
    layers.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layers[name](x)
        out = torch.cat(out, dim=-1) if isinstance(out, tuple) else out
    out.float().square().sum().backward()
    return [out.detach()] + [p.grad.clone() for p in layers[name].parameters()]


def _copies_of(layers, name):
    return [c for c in (getattr(m, f"{n}_copy", None) for m in layers[name].modules()
                        for n, _ in m.named_parameters(recurse=False)) if c is not None]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("name", ["linear", "chunks", "mlp"])
def test_layers_read_the_copy_while_it_is_current(name, backend, monkeypatch):
    """Under autocast the layer's op reads the optimizer's bf16 copies instead of casting: the
    result is bit-identical to casting; a copy made visibly wrong (zeroed in place, which moves no
    version counter of the parameter) changes the output, so it is what the op reads; once the
    parameters change outside the optimizer the layer casts again."""
    monkeypatch.setenv("ENGINE_BACKEND", backend)
    layers = _layers()
    x = torch.randn(3, 7, 24)
    cast = _outputs_and_grads(layers, x, name)  # no copies attached: the op casts
    opt = AdamW(layers.parameters(), lr=1e-2)
    opt.attach_copies(layers, torch.bfloat16)
    copies = _copies_of(layers, name)
    assert len(copies) == (4 if name == "mlp" else 2)
    with_copies = _outputs_and_grads(layers, x, name)
    for i, (got, want) in enumerate(zip(with_copies, cast)):
        assert torch.equal(got, want), f"{name}: result {i} with the copies differs from casting"
    for c in copies:
        c.tensor.zero_()
    assert _outputs_and_grads(layers, x, name)[0].abs().max() < with_copies[0].abs().max() / 10, \
        f"{name}: zeroed copies did not reach the output, so the op did not read them"
    with torch.no_grad():
        for p in layers[name].parameters():
            p.mul_(1.5)  # outside the optimizer: the (zeroed) copies are stale
    assert all(c.current() is None for c in copies)
    stale = _outputs_and_grads(layers, x, name)
    for m in layers[name].modules():
        if isinstance(m, Linear):
            m.weight_copy = m.bias_copy = None
    cast = _outputs_and_grads(layers, x, name)
    for i, (got, want) in enumerate(zip(stale, cast)):
        assert torch.equal(got, want), f"{name}: result {i} after the parameters changed is not the cast's"


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_layers_read_the_copies_after_each_step(backend, monkeypatch, _fresh_seed):
    """Training the layers with the copies (rewritten by every step) follows training a copy of
    them that casts, step for step."""
    monkeypatch.setenv("ENGINE_BACKEND", backend)
    ours = _layers()
    theirs = copy.deepcopy(ours)
    # The optimizers run the Triton pass, which writes the copies (ENGINE_BACKEND=cuda has no AdamW).
    opt = AdamW(ours.parameters(), lr=1e-2, backend="triton")
    ref = AdamW(theirs.parameters(), lr=1e-2, backend="triton")
    opt.attach_copies(ours, torch.bfloat16)
    for step in range(3):
        x = torch.randn(2, 5, 24)
        for layers, optimizer in ((ours, opt), (theirs, ref)):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = sum(torch.cat(o, -1).float().square().sum() if isinstance(o, tuple) else o.float().square().sum()
                           for o in (layers[name](x) for name in ("linear", "chunks", "mlp")))
            loss.backward()
            optimizer.step()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(p, q), f"{name} after step {step} (seed {_fresh_seed})"


# ---------------------------------------------------------------------------------------------
# AdamW.set_grad_scale with clip_coefficient, AdamW.attach_ema
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("max_norm", [1e-3, 1e6, float("inf")])  # clips, does not clip, measures only
def test_folded_clipping_is_clip_grad_norm_then_step(device, backend, max_norm, _fresh_seed):
    """clip_coefficient into the optimizer's grad scale, then step, gives bitwise the norm, and the
    parameters, moments and copies of clip_grad_norm_(foreach=True) then the step without it
    (bitwise on the CPU, within _FOLD_ULPS on CUDA), over steps with fresh gradients;
    clip_coefficient leaves the gradients as they are."""
    ours, theirs = _model(device), _model(device)
    theirs.load_state_dict(ours.state_dict())
    opt = AdamW(ours.parameters(), lr=1e-2, backend=backend)
    ref = AdamW(theirs.parameters(), lr=1e-2, backend=backend)
    opt.attach_copies(ours, torch.bfloat16)
    ref.attach_copies(theirs, torch.bfloat16)
    scale = torch.ones((), device=device)
    opt.set_grad_scale(scale)
    for step in range(3):
        ours(torch.randn(8, 6, device=device)).square().sum().backward()
        for p, q in zip(ours.parameters(), theirs.parameters()):
            q.grad = p.grad.clone()
        grads = [p.grad.clone() for p in ours.parameters()]
        norm, coef = clip_coefficient([p.grad for p in ours.parameters()], max_norm)
        assert all(torch.equal(p.grad, g) for p, g in zip(ours.parameters(), grads)), "clip_coefficient wrote"
        assert (coef.item() < 1.0) == (max_norm == 1e-3), f"max_norm {max_norm}: coefficient {coef.item()}"
        scale.copy_(coef)
        want_norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, foreach=True)
        assert torch.equal(norm, want_norm), f"norm {norm.item()} != clip_grad_norm_'s {want_norm.item()}"
        opt.step()
        ref.step()
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        _assert_bitwise(["param", "exp_avg", "exp_avg_sq", "copy"],
                        [list(ours.parameters()), [opt.state[p]["exp_avg"] for p in ours.parameters()],
                         [opt.state[p]["exp_avg_sq"] for p in ours.parameters()],
                         [c.tensor for c in opt.copies.values()]],
                        [list(theirs.parameters()), [ref.state[p]["exp_avg"] for p in theirs.parameters()],
                         [ref.state[p]["exp_avg_sq"] for p in theirs.parameters()],
                         [c.tensor for c in ref.copies.values()]], f"{_fresh_seed}, step {step}",
                        ulps=_FOLD_ULPS[device])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_attached_ema_is_the_separate_ema(device, backend, _fresh_seed):
    """AdamW with attach_ema keeps the shadows bitwise as the training loop's separate EMA
    (torch._foreach_lerp_ over all parameters after each step taken): a parameter without a
    gradient in one step still moves its shadow toward it; a step not taken moves none."""
    decay = 0.9
    ours, theirs = _model(device), _model(device)
    theirs.load_state_dict(ours.state_dict())
    shadows = [p.detach().float().clone() for p in ours.parameters()]
    their_shadows = [s.clone() for s in shadows]
    opt = AdamW(ours.parameters(), lr=1e-2, backend=backend)
    ref = AdamW(theirs.parameters(), lr=1e-2, backend=backend)
    assert opt.attach_ema(dict(zip(ours.parameters(), shadows)), decay) == len(shadows)
    for step in range(4):
        x = torch.randn(8, 6, device=device)
        for model, optimizer in ((ours, opt), (theirs, ref)):
            model(x).square().sum().backward()
            if step == 1:
                model.fc2.bias.grad = None
        if step == 2:  # skipped, as the loop skips a non-finite step: neither optimizer nor EMA
            before = [s.clone() for s in shadows]
        else:
            opt.step()
            ref.step()
            torch._foreach_lerp_(their_shadows, [p.detach().float() for p in theirs.parameters()], 1.0 - decay)
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(shadows, before)), "a step not taken moved a shadow"
        _assert_bitwise(["param", "shadow"], [list(ours.parameters()), shadows],
                        [list(theirs.parameters()), their_shadows], f"{_fresh_seed}, step {step}")
    assert not torch.equal(shadows[0], ours.fc1.weight.detach()), "the shadows lag the parameters"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_apply_flag_writes_all_or_nothing(device, backend, _fresh_seed):
    """apply = 0: parameters, moments, copies, shadows and the non-finite flag stay bitwise as they
    were, even with a NaN gradient that would make a parameter NaN; apply = 1: bitwise the step
    without the flag."""
    shapes = SHAPES
    state = make_state(shapes, torch.float32, torch.float32, device)
    state[1][1].view(-1)[5] = float("nan")  # the step, if taken, would write NaN and set the flag
    copies = [torch.zeros(p.shape, dtype=torch.bfloat16, device=device) for p in state[0]]
    shadows = [torch.randn(p.shape, device=device) for p in state[0]]
    scale = torch.full((1,), 0.5, device=device)
    kwargs = dict(step=4, backend=backend, grad_scale=scale, ema_weight=0.1, **HYPER)
    for value in (0.0, 1.0):
        ours = _clone_all(*state, copies, shadows)
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        adamw_step_(*ours[:4], ours[4], shadows=ours[5], nonfinite=flag,
                    apply=torch.full((1,), value, device=device), **kwargs)
        if value == 0.0:
            want, want_flag = _clone_all(*state, copies, shadows), 0
        else:
            want = _clone_all(*state, copies, shadows)
            want_flag = torch.zeros(1, dtype=torch.int32, device=device)
            adamw_step_(*want[:4], want[4], shadows=want[5], nonfinite=want_flag, **kwargs)
            want_flag = want_flag.item()
            assert want_flag == 1, "the NaN gradient did not reach a parameter: the test shows nothing"
        written = [0, 2, 3, 4, 5]  # all but the gradients
        _assert_bitwise(["param", "exp_avg", "exp_avg_sq", "copy", "shadow"], [ours[i] for i in written],
                        [want[i] for i in written], f"{_fresh_seed}, apply {value}")
        assert flag.item() == want_flag, f"apply {value}: flag {flag.item()} (seed {_fresh_seed})"


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_forget_step_is_the_step_not_taken(backend, _fresh_seed):
    """Steps launched with set_apply, the middle one's flag 0 and then forget_step(): parameters,
    moments, shadows and step counts bitwise those of an optimizer that never saw the middle step
    (the training loop's non-finite skip, decided on the device)."""
    ours, theirs = _model("cpu"), _model("cpu")
    theirs.load_state_dict(ours.state_dict())
    opt, ref = AdamW(ours.parameters(), lr=1e-2, backend=backend), AdamW(theirs.parameters(), lr=1e-2, backend=backend)
    shadows = [p.detach().float().clone() for p in ours.parameters()]
    their_shadows = [s.clone() for s in shadows]
    opt.attach_ema(dict(zip(ours.parameters(), shadows)), 0.9)
    ref.attach_ema(dict(zip(theirs.parameters(), their_shadows)), 0.9)
    apply = torch.ones(1)
    opt.set_apply(apply)
    for step in range(4):
        x = torch.randn(8, 6)
        for model in (ours, theirs):
            model(x).square().sum().backward()
        apply.fill_(0.0 if step == 1 else 1.0)
        opt.step()
        if step == 1:
            opt.forget_step()
        else:
            ref.step()
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        _assert_bitwise(["param", "shadow"], [list(ours.parameters()), shadows],
                        [list(theirs.parameters()), their_shadows], f"{_fresh_seed}, step {step}")
    for p, q in zip(ours.parameters(), theirs.parameters()):
        mine, want = opt.state[p], ref.state[q]
        assert mine["step"].item() == want["step"].item() == 3
        assert torch.equal(mine["exp_avg"], want["exp_avg"]) and torch.equal(mine["exp_avg_sq"], want["exp_avg_sq"])


def test_attach_ema_and_grad_scale_errors():
    model = _model("cpu")
    opt = AdamW([p for name, p in model.named_parameters() if name != "head.bias"], lr=1e-2)
    with pytest.raises(ValueError, match="not one of this optimizer's"):
        opt.attach_ema({model.head.bias: model.head.bias.detach().clone()}, 0.99)
    with pytest.raises(ValueError, match="expected float32"):
        opt.attach_ema({model.fc1.weight: model.fc1.weight.detach().double()}, 0.99)
    with pytest.raises(ValueError, match="decay must be in"):
        opt.attach_ema({}, 1.5)
    with pytest.raises(ValueError, match="one-element float32"):
        opt.set_grad_scale(torch.ones(2))
    with pytest.raises(ValueError, match="one-element float32"):
        opt.set_grad_scale(torch.ones((), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="one-element float32"):
        opt.set_apply(torch.ones(2))


def test_optimizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="betas"):
        AdamW(_model("cpu").parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr, eps and weight_decay"):
        AdamW(_model("cpu").parameters(), lr=-1.0)
