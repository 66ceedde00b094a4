"""Optimizers: AdamW in one Triton pass that also writes the low-precision parameter copies the
engine's Linears read, with the gradient clipping's multiply and the parameters' EMA folded in
(engine.optim.adamw; its kernel in engine.optim.adamw_kernel)."""

from engine.optim.adamw import AdamW, ParameterCopy, clip_coefficient

__all__ = ["AdamW", "ParameterCopy", "clip_coefficient"]
