"""AdamW whose step also writes the bf16 copies the Linears read (engine.ops.adamw).

    optimizer = AdamW(model.parameters(), lr=2e-5, weight_decay=0.03, eps=1e-10, copy_dtype=torch.bfloat16)

The update is torch.optim.AdamW's (decoupled weight decay, no amsgrad), and the state has its
layout (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), so state dicts load into either.
With ``copy_dtype`` every parameter gets a copy in that dtype, written at construction and by
each step in the same pass as the update; engine.ops.linear reads it through
``engine.ops.adamw.low_precision`` instead of casting the parameter under autocast. Set it to
the autocast dtype of the training step. Parameters must be plain contiguous tensors (not
FSDP2's sharded DTensors).

A parameter without a gradient is skipped, its step count unchanged, as torch's AdamW does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from engine.ops.adamw import adamw_step_, register_copy


class AdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, copy_dtype: torch.dtype | None = None,
                 backend: str | None = None):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"AdamW: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: betas must be two values in [0, 1), got {betas}")
        # The group keys torch's AdamW keeps too: a state dict of ours loads into it as AdamW
        # (without decoupled_weight_decay torch's Adam.__setstate__ would make it L2-decay Adam).
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                                      maximize=False, foreach=None, capturable=False, differentiable=False,
                                      fused=None, decoupled_weight_decay=True))
        self.copy_dtype, self.backend = copy_dtype, backend
        self.copies: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor:
                    raise TypeError(f"AdamW takes plain tensors, got a {type(p).__name__} parameter "
                                    "(for FSDP2's sharded parameters use torch.optim.AdamW)")
                if copy_dtype is not None:
                    copy = p.detach().to(copy_dtype, copy=True)
                    self.copies[p] = copy
                    register_copy(p, copy)

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
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or not group["decoupled_weight_decay"]:
                raise ValueError("AdamW: amsgrad, maximize and L2 (coupled) weight decay are not implemented; "
                                 f"got a param group with amsgrad={group['amsgrad']}, maximize={group['maximize']}, "
                                 f"decoupled_weight_decay={group['decoupled_weight_decay']}")
            beta1, beta2 = group["betas"]
            by_step: dict[int, list[torch.Tensor]] = {}  # one launch per step count (normally one)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not take sparse gradients")
                state = self._state_of(p)
                if state["step"].device.type != "cpu":  # loaded from a fused torch AdamW: once
                    state["step"] = state["step"].cpu()
                step = int(state["step"].item()) + 1
                by_step.setdefault(step, []).append(p)
            for step, params in by_step.items():
                states = [self.state[p] for p in params]
                adamw_step_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [self.copies.get(p) for p in params], step=step,
                            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"], backend=self.backend)
                for p, state in zip(params, states):
                    state["step"].fill_(step)
                    if p in self.copies:
                        register_copy(p, self.copies[p])  # the parameter's version now
        return loss
