"""Launch configurations of the Triton attention kernels at MicroDiT-XL/2's shapes, beside SDPA.

    python bench/attention_sweep.py [--json PATH] [--shapes self:256x64x16x64,cross:256x64x16x64x77]

Each row times one launch of engine.ops.cross_attention's forward or backward kernel (CUDA-graph
timer of bench/kernels.py, bf16) at one (BLOCK_M, num_warps, stages), on the
layouts the model passes: self-attention reads q, k, v as views into one (B, N, 3, H, d)
projection (keys = the N tokens themselves), cross-attention reads q (B, N, H, d) and k, v as
views into a (B, L, 2, H, d) projection, every caption key valid. Beside them, per shape, the
public ops forward and forward + backward through autograd: self-attention on SDPA with cuDNN
first (backend cuda) and on the Triton kernels at their defaults (backend triton), cross-attention
on its Triton kernels. Every row also goes to stdout as ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

# Run as a script, this folder is first on sys.path, where its kernels.py would shadow the
# installed `kernels` package that transformers imports when present: move it behind them, and
# load bench/kernels.py (for its CUDA-graph timer) under a name of its own.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import torch  # noqa: E402

import engine.ops.cross_attention as ca  # noqa: E402
from engine.ops.self_attention import self_attention  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_kernels", _HERE / "kernels.py")
bench_kernels = importlib.util.module_from_spec(_spec)
sys.modules["bench_kernels"] = bench_kernels  # dataclasses look their module up there
_spec.loader.exec_module(bench_kernels)

# MicroDiT-XL/2 (16 heads of 64, 77 caption keys): 256 px masked (64 of 256 tokens kept) at stage
# 1's batch 256; 256 px unmasked at 64 (the same attention shape as 512 px masked at 64).
SHAPES = ("self:256x64x16x64", "self:64x256x16x64", "cross:256x64x16x64x77", "cross:64x256x16x64x77")
# (BLOCK_M, num_warps, stages)
FWD_CONFIGS = [(64, 4, 3), (64, 4, 2), (64, 8, 3), (32, 4, 3), (128, 8, 3), (128, 4, 3)]
BWD_CONFIGS = [(64, 8, 3), (64, 8, 2), (64, 4, 3), (64, 4, 2), (32, 4, 3), (32, 8, 3), (128, 8, 3)]


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    kind, _, dims = text.partition(":")
    sizes = tuple(int(x) for x in dims.split("x"))
    if kind not in ("self", "cross") or len(sizes) != (4 if kind == "self" else 5):
        raise ValueError(f"shape {text!r}: want self:BxNxHxd or cross:BxNxHxdxL")
    return kind, sizes


def make_inputs(kind, sizes, device):
    """(q, k, v, kv_lens, leaves) as the model lays them out, bf16: q, k, v are views into the
    leaves, the projections' outputs, which require grad."""
    B, N, H, d = sizes[:4]
    if kind == "self":
        qkv = torch.randn(B, N, 3, H, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        q, k, v = qkv.unbind(2)
        L, leaves = N, (qkv,)
    else:
        L = sizes[4]
        q = torch.randn(B, N, H, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(B, L, 2, H, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        k, v = kv.unbind(2)
        leaves = (q, kv)
    return q, k, v, torch.full((B,), L, dtype=torch.int32, device=device), leaves


def sweep_shape(kind, sizes, device):
    q, k, v, kv_lens, leaves = make_inputs(kind, sizes, device)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    do = torch.randn_like(qd)
    _, lse = ca._cross_attention_fwd_triton(qd, kd, vd, kv_lens)
    rows = []
    for bm, nw, st in FWD_CONFIGS:
        def fwd(bm=bm, nw=nw, st=st):  # defaults bind this config (closures see the loop's last)
            ca._cross_attention_fwd_triton(qd, kd, vd, kv_lens, block_m=bm, num_warps=nw, num_stages=st)
        rows.append({"dir": "fwd", "bm": bm, "nw": nw, "st": st, "fn": fwd})
    for bm, nw, st in BWD_CONFIGS:
        def bwd(bm=bm, nw=nw, st=st):
            ca._cross_attention_bwd_triton(do, qd, kd, vd, lse, kv_lens, block_m=bm, num_warps=nw, num_stages=st)
        rows.append({"dir": "bwd", "bm": bm, "nw": nw, "st": st, "fn": bwd})
    ops = [("cuda", "sdpa"), ("triton", "triton")] if kind == "self" else [("triton", "triton")]
    for backend, label in ops:
        def op(backend=backend):
            if kind == "self":
                return self_attention(q, k, v, backend=backend)
            return ca.cross_attention(q, k, v, None, backend=backend)

        def both(op=op):
            torch.autograd.grad(op(), leaves, do)

        def forward(op=op):
            with torch.no_grad():
                op()
        rows.append({"dir": "op-fwd", "impl": label, "fn": forward})
        rows.append({"dir": "op-both", "impl": label, "fn": both})
    for row in rows:
        fn = row.pop("fn")
        try:
            row["us"] = round(bench_kernels.cuda_graph_seconds(fn) * 1e6, 1)
        except Exception as error:  # a config that does not compile or launch: its row says why
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--json", default=None, help="append the rows here as JSON lines")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_sweep times GPU kernels: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    stream = torch.cuda.Stream()
    out = open(args.json, "a") if args.json else None
    with torch.cuda.stream(stream):
        for text in args.shapes.split(","):
            kind, sizes = parse_shape(text)
            for row in sweep_shape(kind, sizes, device):
                row = {"shape": text, **row, **env}
                line = json.dumps(row)
                print("RESULT", line, flush=True)
                if out:
                    out.write(line + "\n")
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
