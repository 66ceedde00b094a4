"""Tilings of linear's bias-gradient column sum, and the pieces of the MLP's backward that the
DGELU epilogue replaces, timed by bench/kernels.py's CUDA-graph timer (GPU time only).

    python bench/bias_grad_sweep.py --json out.json

Column sum (engine.ops._gemm.bias_grad without GELU) for every (BLOCK_M, BLOCK_N,
num_warps, programs per SM) of a small grid, at the token x column shapes of PixArt-XL/2's step
(256 px / 64: 16384 tokens, 7680 caption tokens); then, at fc2's 16384 x 1152 -> 4608: the plain
input-gradient GEMM, the same GEMM with the DGELU epilogue, and the GELU bias-gradient pass.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import cuda_graph_seconds  # noqa: E402

from engine.ops import _gemm  # noqa: E402

SHAPES = [(16384, 4608), (16384, 1152), (7680, 2304), (32768, 4608)]
GRID = [(bm, bn, w, pps) for bm in (16, 32, 64) for bn in (64, 128, 256) for w in (4, 8) for pps in (2, 4, 8, 16)]


def microseconds(fn) -> float:
    return round(cuda_graph_seconds(fn) * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.cuda.set_stream(torch.cuda.Stream())  # graph capture needs a side stream
    bf16 = torch.bfloat16
    grads = [torch.randn(m, n, device="cuda", dtype=bf16) for m, n in SHAPES]
    default = _gemm.BIAS_GRAD_CONFIG[False]
    sweep = {}
    for config in GRID:
        _gemm.BIAS_GRAD_CONFIG[False] = config
        sweep[",".join(map(str, config))] = [
            microseconds(lambda: _gemm.bias_grad(g, None, torch.float32)) for g in grads]
    _gemm.BIAS_GRAD_CONFIG[False] = default
    for i, shape in enumerate(SHAPES):
        best = sorted((times[i], name) for name, times in sweep.items())[:5]
        print(f"column sum {shape[0]} x {shape[1]}: best {best}; default {default}: "
              f"{sweep[','.join(map(str, default))][i]} us", flush=True)
    pre = torch.randn(16384, 4608, device="cuda", dtype=bf16)
    dy = torch.randn(16384, 1152, device="cuda", dtype=bf16)
    w2 = torch.randn(1152, 4608, device="cuda", dtype=bf16) * 0.03
    pieces = dict(
        input_grad_gemm=microseconds(lambda: _gemm.cublaslt_input_grad(dy, w2)),
        input_grad_gemm_dgelu=microseconds(lambda: _gemm.cublaslt_input_grad(dy, w2, dgelu_of=pre)),
        gelu_bias_grad_pass=microseconds(lambda: _gemm.bias_grad(pre, pre, torch.float32)))
    print("fc2 input gradient at 16384 x 1152 -> 4608 (us):", pieces)
    if args.json:
        args.json.write_text(json.dumps(dict(shapes=SHAPES, column_sum_us=sweep, default=default, mlp_pieces_us=pieces,
                                             gemm_tuning=_gemm.gemm_tuning_report()), indent=1))


if __name__ == "__main__":
    main()
