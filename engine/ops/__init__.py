"""Engine ops: one op per module (see docs/design.md §3); each public function takes ``backend=``.

``engine.ops.<op>`` is the op's module and ``engine.ops.<op>.<op>`` its function (``from
engine.ops.linear import linear``); ``_gemm`` holds the GEMM plumbing linear and mlp share.
"""

from engine.ops import (backend, cross_attention, gated_add, linear, mlp, moe, norm_modulate, patchify,
                        self_attention, split_sums, swiglu)

__all__ = ["backend", "cross_attention", "gated_add", "linear", "mlp", "moe", "norm_modulate", "patchify",
           "self_attention", "split_sums", "swiglu"]
