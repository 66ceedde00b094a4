"""AdamW whose step also writes low-precision copies of the parameters for the modules that read them,
and can fold the gradient clipping and the EMA of the parameters into the same pass.

    optimizer = AdamW(model.parameters(), lr=2e-5, weight_decay=0.03, eps=1e-10)
    optimizer.attach_copies(model, torch.bfloat16)  # the training step's autocast dtype
    optimizer.attach_ema({p: shadow_of[p] for p in params}, decay=0.9999)
    scale = torch.ones((), device=device)
    optimizer.set_grad_scale(scale)
    ...  # each step, after backward (capturable: device tensors only):
    total_norm, coef = clip_coefficient([p.grad for p in params], max_norm=0.01)
    scale.copy_(coef)
    optimizer.step()

The update is torch.optim.AdamW's (decoupled weight decay, no amsgrad), and the state has its
layout (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), so state dicts load into either.
The step is one pass of engine.optim.adamw_kernel over all parameters. Parameters must be plain
contiguous tensors (not FSDP2's sharded DTensors).

``attach_copies(module, dtype)`` gives each parameter that a submodule reads in low precision a
``ParameterCopy``: the parameter rounded to ``dtype``, written at attachment and by every step in
the same pass as the update. A submodule asks for the copy of its parameter ``name`` by having an
attribute ``<name>_copy`` (engine.model.layers.Linear has ``weight_copy`` and ``bias_copy``, None
until attached) and hands ``copy.current()`` to its op, which reads it instead of casting the
parameter under autocast (engine.ops.linear's ``weight_lp``).

``set_grad_scale(scale)``: every later step multiplies each gradient by the one-element fp32
device tensor ``scale`` as it reads it: what ``torch.nn.utils.clip_grad_norm_`` followed by the
step gives when ``scale`` holds ``clip_coefficient``'s coefficient (bitwise on the CPU, within an
fp32 ulp on CUDA: engine.optim.adamw_kernel), without the multiply's pass over the gradients
(8 bytes per fp32 parameter). The tensor is read at each step, not
copied: update it in place (a CUDA graph can write it).

``attach_ema(shadows, decay)``: every later step moves each shadow toward its parameter's new
value as ``torch._foreach_lerp_(shadows, [p.float() ...], 1 - decay)`` does, bitwise, in the
update's pass: the shadow is read and written there, the parameter is not read again (4 bytes
per fp32 parameter fewer than the separate lerp). A step that is not taken moves no shadow.

Together: 42 bytes per fp32 parameter for clip norm + update + copy + EMA, against 54 with the
separate clip multiply and lerp (engine.optim.adamw_kernel's docstring has the arithmetic).

``set_apply(flag)``: every later step reads the one-element fp32 device tensor ``flag`` in its
pass and writes nothing where it is 0, so that the host can launch the step before it has read
whether the step's loss and gradients were finite (train's loop skips non-finite steps this way
without waiting for the GPU). The step counts advance on the host regardless; after reading a
flag that was 0, ``forget_step()`` takes back the counts of the last step.

A parameter without a gradient is skipped, its step count unchanged, as torch's AdamW does; its
shadow still moves toward it (a separate lerp), as the separate EMA would move it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from engine.optim.adamw_kernel import adamw_step_


class ParameterCopy:
    """``param`` rounded to a lower precision, kept by the optimizer that updates ``param``.

    ``tensor`` is written in place by every optimizer step and keeps its storage for life, so a
    CUDA graph that captured a read of it (engine.step_graph) replays with each step's values.
    ``current()`` is the copy while it holds the parameter's value, else None: the optimizer
    records the parameter's version counter and storage when it writes the copy (its Triton pass
    moves no version counter), and any other in-place change of the parameter (load_state_dict,
    ``copy_``, an edit under no_grad) moves the counter, a new storage (``module.to``) moves the
    address; the reader then casts until the next step rewrites the copy. A CUDA graph captured
    while the copy was current keeps reading it: change parameters outside the optimizer only
    before capturing.
    """

    def __init__(self, param: torch.Tensor, dtype: torch.dtype):
        self.param = param
        self.tensor = param.detach().to(dtype, copy=True)
        self._written = self._stamp()

    def _stamp(self) -> tuple[int, int]:
        return self.param._version, self.param.data_ptr()

    def mark_written(self) -> None:
        """Record that ``tensor`` holds the parameter's current value (after the optimizer's write)."""
        self._written = self._stamp()

    def current(self) -> torch.Tensor | None:
        """``tensor`` while it holds the parameter's value, else None; None under torch.compile,
        whose graphs cast (Inductor fuses the cast) and cannot guard on version counters."""
        if torch.compiler.is_compiling() or self._stamp() != self._written:
            return None
        return self.tensor

    def __deepcopy__(self, memo) -> None:
        # A deep copy of a module has new parameters, which this optimizer does not update: the
        # copied module carries no copies and casts.
        return None


def clip_coefficient(grads: Iterable[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_norm, coefficient) of ``torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)``
    over these gradients, without touching them: the 2-norm of all gradients together and
    min(max_norm / (total_norm + 1e-6), 1), computed by torch's own ops (so bitwise the same), as
    0-dim device tensors in the gradients' dtype; no host synchronisation. clip_grad_norm_ would
    multiply every gradient by the coefficient; AdamW.set_grad_scale folds that into the step."""
    total_norm = torch.nn.utils.get_total_norm(list(grads), 2.0, error_if_nonfinite=False, foreach=True)
    max_norm = float(max_norm)
    return total_norm, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


class AdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, backend: str | None = None):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"AdamW: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: betas must be two values in [0, 1), got {betas}")
        # The group keys torch's AdamW keeps too: a state dict of ours loads into it as AdamW
        # (without decoupled_weight_decay torch's Adam.__setstate__ would make it L2-decay Adam).
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                                      maximize=False, foreach=None, capturable=False, differentiable=False,
                                      fused=None, decoupled_weight_decay=True))
        self.backend = backend
        self.copies: dict[torch.Tensor, ParameterCopy] = {}
        self.shadows: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> fp32 EMA (attach_ema)
        self.ema_decay = 0.0
        self._grad_scale: torch.Tensor | None = None
        self._apply: torch.Tensor | None = None
        self._last_counted: list[dict] = []  # the states whose step count the last step() advanced
        # 1 once a step has written an inf or NaN into a parameter (see parameters_nonfinite)
        self._nonfinite: torch.Tensor | None = None
        for group in self.param_groups:
            for p in group["params"]:
                if type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor:
                    raise TypeError(f"AdamW takes plain tensors, got a {type(p).__name__} parameter "
                                    "(for FSDP2's sharded parameters use torch.optim.AdamW)")

    def attach_copies(self, module: nn.Module, dtype: torch.dtype) -> int:
        """Give every submodule of ``module`` that has an attribute ``<name>_copy`` for its own
        parameter ``name`` a ParameterCopy of it in ``dtype``, kept from now on by each step; only
        parameters of this optimizer. Returns the number of parameters with a copy."""
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for submodule in module.modules():
            for name, p in submodule.named_parameters(recurse=False):
                if not hasattr(submodule, f"{name}_copy") or id(p) not in owned:
                    continue
                copy = self.copies.get(p)
                if copy is None:
                    copy = self.copies[p] = ParameterCopy(p, dtype)
                elif copy.tensor.dtype != dtype:
                    raise ValueError(f"AdamW.attach_copies: {name} already has a {copy.tensor.dtype} copy, "
                                     f"asked for {dtype}")
                setattr(submodule, f"{name}_copy", copy)
        return len(self.copies)

    def attach_ema(self, shadows: Mapping[torch.Tensor, torch.Tensor], decay: float) -> int:
        """Keep an exponential moving average of parameters of this optimizer: ``shadows`` maps each
        to an fp32 contiguous tensor of its shape and device, which every later step moves in place
        by ``torch.lerp(shadow, p.float(), 1 - decay)`` after updating p. Attaching again adds
        shadows (or replaces a parameter's) and sets the decay for all. Returns the number of
        parameters with a shadow."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"AdamW.attach_ema: decay must be in [0, 1], got {decay}")
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for p, shadow in shadows.items():
            if id(p) not in owned:
                raise ValueError(f"AdamW.attach_ema: a {tuple(p.shape)} parameter is not one of this optimizer's")
            if (shadow.shape != p.shape or shadow.dtype != torch.float32 or shadow.device != p.device
                    or not shadow.is_contiguous()):
                raise ValueError(f"AdamW.attach_ema: shadow {tuple(shadow.shape)} {shadow.dtype} on {shadow.device} "
                                 f"(contiguous: {shadow.is_contiguous()}) for a parameter {tuple(p.shape)} on "
                                 f"{p.device}; expected float32, contiguous, of the parameter's shape and device")
        self.shadows.update(shadows)
        self.ema_decay = float(decay)
        return len(self.shadows)

    def set_grad_scale(self, scale: torch.Tensor | None) -> None:
        """Multiply every gradient by ``scale`` (a one-element float32 tensor on the parameters'
        device, read at each step; e.g. clip_coefficient's coefficient copied into it) inside
        each later step; None: no scaling."""
        if scale is not None and (scale.numel() != 1 or scale.dtype != torch.float32):
            raise ValueError(f"AdamW.set_grad_scale: expected a one-element float32 tensor, got "
                             f"{tuple(scale.shape)} {scale.dtype}")
        self._grad_scale = scale

    def set_apply(self, flag: torch.Tensor | None) -> None:
        """Write each later step only where ``flag`` (a one-element float32 tensor on the
        parameters' device, read at each step) is nonzero; None: always write."""
        if flag is not None and (flag.numel() != 1 or flag.dtype != torch.float32):
            raise ValueError(f"AdamW.set_apply: expected a one-element float32 tensor, got "
                             f"{tuple(flag.shape)} {flag.dtype}")
        self._apply = flag

    def forget_step(self) -> None:
        """Take back the step counts the last step() advanced: call it when that step's apply flag
        (set_apply) turned out to be 0, so that its parameters, moments and shadows are unchanged
        and the next step's bias corrections are those of the step not taken."""
        for state in self._last_counted:
            state["step"] -= 1
        self._last_counted = []

    def parameters_nonfinite(self) -> torch.Tensor | None:
        """A (1,) int32 device tensor, 1 once any step of this optimizer has written an inf or NaN
        into a parameter (found in the update's own pass: no extra read of the parameters, no
        host synchronisation); None before the first step."""
        return self._nonfinite

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:  # torch AdamW's layout: the step count on the host, moments like the parameter
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._last_counted = []
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or not group["decoupled_weight_decay"]:
                raise ValueError("AdamW: amsgrad, maximize and L2 (coupled) weight decay are not implemented; "
                                 f"got a param group with amsgrad={group['amsgrad']}, maximize={group['maximize']}, "
                                 f"decoupled_weight_decay={group['decoupled_weight_decay']}")
            beta1, beta2 = group["betas"]
            by_step: dict[int, list[torch.Tensor]] = {}  # one launch per step count (normally one)
            idle = []  # without a gradient: not updated, but its shadow moves toward it
            for p in group["params"]:
                if p.grad is None:
                    if p in self.shadows:
                        idle.append(p)
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not take sparse gradients")
                state = self._state_of(p)
                if state["step"].device.type != "cpu":  # loaded from a fused torch AdamW: once
                    state["step"] = state["step"].cpu()
                step = int(state["step"].item()) + 1
                by_step.setdefault(step, []).append(p)
            if idle and self._apply is None:
                torch._foreach_lerp_([self.shadows[p] for p in idle], [p.detach().float() for p in idle],
                                     1.0 - self.ema_decay)
            elif idle:
                for p in idle:
                    shadow = self.shadows[p]
                    moved = torch.lerp(shadow, p.detach().float(), 1.0 - self.ema_decay)
                    shadow.copy_(torch.where(self._apply.reshape(()) != 0, moved, shadow))
            for step, params in by_step.items():
                if self._nonfinite is None:
                    self._nonfinite = torch.zeros(1, dtype=torch.int32, device=params[0].device)
                states = [self.state[p] for p in params]
                copies = [self.copies.get(p) for p in params]
                adamw_step_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [c.tensor if c is not None else None for c in copies],
                            step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"], backend=self.backend, nonfinite=self._nonfinite,
                            grad_scale=self._grad_scale, shadows=[self.shadows.get(p) for p in params],
                            ema_weight=1.0 - self.ema_decay, apply=self._apply)
                self._last_counted += states
                for state, copy in zip(states, copies):
                    state["step"].fill_(step)
                    if copy is not None:
                        copy.mark_written()  # the parameter's version now
        return loss
