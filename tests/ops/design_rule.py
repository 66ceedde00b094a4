"""docs/design.md §3 correctness rule, shared by the op tests: per tensor,
    max|kernel - fp64 ref| <= 2 * max|eager same-dtype - fp64 ref| + atol,
atol a fraction of the reference's largest magnitude: room for reordered fp32 sums where eager
happens to be almost exact; for bf16 / fp16 a quarter of one rounding step at 1.0."""

import torch

ATOL_FRACTION = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 2.5e-4}


def assert_rule(names, kernel, eager, ref, seed, floors=None):
    """kernel, eager: results in the test dtype; ref: fp64. Same dtype and shape as eager, finite,
    within the rule; every message names the tensor and the seed. ``floors`` (one per tensor, or
    None): a lower bound for atol where a result's own rounding is larger than the rule's
    fraction of it, e.g. an optimizer's update measured as new - old parameter, which carries the
    parameter's rounding, not the update's."""
    for name, k, e, r, floor in zip(names, kernel, eager, ref, floors or [0.0] * len(names), strict=True):
        assert k.dtype == e.dtype and k.shape == e.shape, \
            f"{name}: {k.dtype}{tuple(k.shape)} vs eager {e.dtype}{tuple(e.shape)}"
        assert torch.isfinite(k).all(), f"{name}: non-finite values in the kernel's result (seed {seed})"
        err_kernel = (k.double() - r.double()).abs().max().item()
        err_eager = (e.double() - r.double()).abs().max().item()
        atol = max(ATOL_FRACTION[k.dtype] * r.abs().max().item(), floor)
        assert err_kernel <= 2 * err_eager + atol, (
            f"{name}: kernel error {err_kernel:.3g} > 2 x eager error {err_eager:.3g} + atol {atol:.3g} (seed {seed})")
