"""Optimizers: AdamW in one Triton pass that also writes the low-precision parameter copies the
engine's Linears read (engine.optim.adamw; its kernel in engine.optim.adamw_kernel)."""

from engine.optim.adamw import AdamW, ParameterCopy

__all__ = ["AdamW", "ParameterCopy"]
