"""Kernel benchmarks: each fused op against eager, torch.compile(eager), triton and cuda.

    python bench/kernels.py [--ops norm_modulate,add_norm_modulate] [--shapes 64x256x1152,32x1024x1152]
                            [--dtype bf16] [--directions fwd,bwd,both] [--timer do_bench|cudagraph]
                            [--json PATH] [--csv PATH]

For every op, shape and direction (forward, backward, both) each variant is timed by
``triton.testing.do_bench`` (median, after warm-up; do_bench also flushes L2 between calls), and
the calls rotate over enough independent input sets that together they exceed L2 several times.
do_bench times what a Python caller sees: where an op's GPU time is shorter than its host-side
cost (Python, autograd, launches: ~200 us per fwd+bwd call here), the host sets the pace.
``--timer cudagraph`` captures a run of calls in a CUDA graph and times its replays instead:
the GPU work alone, as in a training step whose host runs ahead of the GPU.
GB/s counts the bytes the op must move at minimum (each op's spec says which tensors); the
``copy`` column divides that by the device-to-device copy bandwidth measured in the same run
(bytes read + written), so 100% means the op runs as fast as a plain copy of its bytes.

Variants: ``eager`` (the op's reference, plain PyTorch), ``compile`` (torch.compile of that
reference), ``triton`` and ``cuda`` (engine backends). A variant that cannot run here gets a row
with the reason instead of a time.

Without a GPU it runs one tiny shape on the CPU (Triton through its interpreter): a smoke test
of the script whose numbers mean nothing.

To benchmark another op, add an ``OpSpec`` to ``OPS``: how to parse a shape, how to build one
input set, how to call the op with a backend name, and the bytes per direction.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before engine's Triton kernels are defined

import hardware  # noqa: E402  (bench/ is on sys.path when run as a script)
from engine.ops.backend import unavailable_reason  # noqa: E402
from engine.ops.norm_modulate import add_norm_modulate, norm_modulate  # noqa: E402

VARIANTS = ("eager", "compile", "triton", "cuda")
DIRECTIONS = ("fwd", "bwd", "both")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Rotate over input sets until they hold this many bytes: several times the 50-60 MB L2 of
# H100 / H200, so no call finds its inputs left in L2 by the previous one.
ROTATION_BYTES = 256 * 2**20
MAX_INPUT_SETS = 8


@dataclasses.dataclass
class InputSet:
    """One independent set of tensors for one call of an op."""
    inputs: list[torch.Tensor]         # differentiable leaves, in call order
    extra: list                        # non-differentiable arguments after them (None allowed)
    grad_outputs: list[torch.Tensor]   # one per op output


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    gpu_shapes: tuple[str, ...]
    cpu_shape: str
    parse_shape: Callable[[str], tuple[int, ...]]
    make_inputs: Callable[[tuple[int, ...], torch.dtype, torch.device], InputSet]
    call: Callable[..., tuple[torch.Tensor, ...]]          # call(backend, *inputs, *extra) -> outputs
    bytes_moved: Callable[[tuple[int, ...], torch.dtype], dict[str, int]]   # {"fwd": .., "bwd": ..}
    bytes_note: str


def parse_bnd(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape {text!r} must be BxNxD with positive integers, e.g. 64x256x1152")
    return tuple(int(p) for p in parts)


def _activation(shape, dtype, device):
    return torch.randn(shape, device=device, dtype=dtype)


def _modulation(B, D, device):
    return (0.5 * torch.randn(B, D, device=device)).requires_grad_()  # fp32, as adaLN-single makes it


def _norm_modulate_inputs(shape, dtype, device):
    B, N, D = shape
    return InputSet(inputs=[_activation(shape, dtype, device).requires_grad_(), _modulation(B, D, device),
                            _modulation(B, D, device)],
                    extra=[], grad_outputs=[_activation(shape, dtype, device)])


def _add_norm_modulate_inputs(shape, dtype, device):
    B, N, D = shape
    return InputSet(inputs=[_activation(shape, dtype, device).requires_grad_(),
                            _activation(shape, dtype, device).requires_grad_(),
                            _modulation(B, D, device), _modulation(B, D, device), _modulation(B, D, device)],
                    extra=[], grad_outputs=[_activation(shape, dtype, device), _activation(shape, dtype, device)])


def _activation_bytes(shape, dtype):
    return math.prod(shape) * dtype.itemsize


OPS = {
    "norm_modulate": OpSpec(
        name="norm_modulate",
        gpu_shapes=("64x256x1152", "32x1024x1152"),
        cpu_shape="2x32x256",
        parse_shape=parse_bnd,
        make_inputs=_norm_modulate_inputs,
        call=lambda backend, x, shift, scale: (norm_modulate(x, shift, scale, backend=backend),),
        # fwd reads x, writes h; bwd reads dh, x, writes dx (modulation and row stats are O(B*D + B*N)).
        bytes_moved=lambda shape, dtype: {"fwd": 2 * _activation_bytes(shape, dtype),
                                          "bwd": 3 * _activation_bytes(shape, dtype)},
        bytes_note="fwd x,h; bwd dh,x,dx",
    ),
    "add_norm_modulate": OpSpec(
        name="add_norm_modulate",
        gpu_shapes=("64x256x1152", "32x1024x1152"),
        cpu_shape="2x32x256",
        parse_shape=parse_bnd,
        make_inputs=_add_norm_modulate_inputs,
        call=lambda backend, x, y, gate, shift, scale: add_norm_modulate(x, y, gate, shift, scale, backend=backend),
        # gated, as PixArt's attention and MLP residuals are: fwd reads x, y, writes r, h;
        # bwd reads dh, dr, r, y, writes dx, dy.
        bytes_moved=lambda shape, dtype: {"fwd": 4 * _activation_bytes(shape, dtype),
                                          "bwd": 6 * _activation_bytes(shape, dtype)},
        bytes_note="fwd x,y,r,h; bwd dh,dr,r,y,dx,dy",
    ),
}


def cuda_graph_seconds(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Median GPU seconds per call of ``fn``, from replays of a graph of ``calls`` calls. Runs on
    the current stream, which must not be the default one (capture needs a side stream)."""
    for _ in range(3):
        fn()  # warm-up: JIT compiles and allocator pools happen outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):
        for _ in range(calls):
            fn()
    seconds = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(seconds)


def median_seconds(fn: Callable[[], object], device: torch.device, timer: str) -> float:
    if device.type != "cuda":
        return hardware.median_seconds(fn, device, repeats=3, warmup=1)
    if timer == "cudagraph":
        return cuda_graph_seconds(fn)
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def variant_function(spec: OpSpec, variant: str, device: torch.device):
    """(function of the op's arguments, None) or (None, reason it cannot run here)."""
    if variant == "compile":
        if device.type != "cuda":
            return None, "torch.compile is timed on the GPU only (a CPU build compiles slowly and says nothing)"
        return torch.compile(lambda *args: spec.call("eager", *args), dynamic=False), None
    reason = unavailable_reason(variant, device)
    if reason is not None:
        return None, reason
    return (lambda *args: spec.call(variant, *args)), None


def time_directions(fn, sets: list[InputSet], directions, device, timer) -> dict[str, float]:
    """Median seconds per direction, each call on the next input set in turn."""
    turn = iter(range(10**12))

    def next_set() -> InputSet:
        return sets[next(turn) % len(sets)]

    def forward():
        s = next_set()
        return fn(*s.inputs, *s.extra)

    def both():
        s = next_set()
        return torch.autograd.grad(fn(*s.inputs, *s.extra), s.inputs, s.grad_outputs)

    seconds = {}
    if "fwd" in directions:
        seconds["fwd"] = median_seconds(forward, device, timer)
    if "bwd" in directions:
        graphs = [(fn(*s.inputs, *s.extra), s) for s in sets]   # one retained graph per input set
        step = iter(range(10**12))

        def backward():
            outputs, s = graphs[next(step) % len(graphs)]
            return torch.autograd.grad(outputs, s.inputs, s.grad_outputs, retain_graph=True)

        seconds["bwd"] = median_seconds(backward, device, timer)
        del graphs
    if "both" in directions:
        seconds["both"] = median_seconds(both, device, timer)
    return seconds


def bench_op(spec: OpSpec, shape_text: str, dtype: torch.dtype, variants, directions, device, timer, copy_bandwidth):
    shape = spec.parse_shape(shape_text)
    moved = spec.bytes_moved(shape, dtype)
    moved["both"] = moved["fwd"] + moved["bwd"]
    one_set = spec.make_inputs(shape, dtype, device)
    set_bytes = sum(t.numel() * t.element_size() for t in one_set.inputs + one_set.grad_outputs)
    n_sets = min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / set_bytes)) if device.type == "cuda" else 1
    sets = [one_set] + [spec.make_inputs(shape, dtype, device) for _ in range(n_sets - 1)]
    rows, eager_seconds = [], {}
    for variant in variants:
        base = dict(op=spec.name, shape=shape_text, dtype=str(dtype).removeprefix("torch."), variant=variant,
                    timer=timer if device.type == "cuda" else "host clock", bytes_note=spec.bytes_note)
        fn, reason = variant_function(spec, variant, device)
        seconds = {}
        if fn is not None:
            try:
                # For graph capture everything, the retained autograd graphs included, runs on
                # one side stream: backward kernels run on the stream of their forward.
                side_stream = torch.cuda.stream(torch.cuda.Stream()) if timer == "cudagraph" and device.type == "cuda" \
                    else contextlib.nullcontext()
                with side_stream:
                    seconds = time_directions(fn, sets, directions, device, timer)
            except Exception as error:  # a variant that fails gets its error in its row, the run goes on
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        for direction in directions:
            row = dict(base, direction=direction, bytes=moved[direction], time_us=None, gbps=None,
                       copy_share=None, speedup_vs_eager=None, skipped=reason)
            if direction in seconds:
                s = seconds[direction]
                row.update(time_us=s * 1e6, gbps=moved[direction] / s / 1e9,
                           copy_share=moved[direction] / s / copy_bandwidth)
                if variant == "eager":
                    eager_seconds[direction] = s
                if direction in eager_seconds:
                    row["speedup_vs_eager"] = eager_seconds[direction] / s
            rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows, copy_bandwidth):
    print(f"copy bandwidth (read + write): {copy_bandwidth / 1e9:.0f} GB/s")
    header = f"{'op':<18} {'shape':<13} {'dtype':<8} {'dir':<4} {'variant':<8} {'time us':>9} {'GB/s':>7} {'copy':>6} {'vs eager':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        start = f"{r['op']:<18} {r['shape']:<13} {r['dtype']:<8} {r['direction']:<4} {r['variant']:<8}"
        if r["time_us"] is None:
            print(f"{start} skipped: {r['skipped']}")
            continue
        speedup = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] is not None else ""
        print(f"{start} {r['time_us']:>9.1f} {r['gbps']:>7.0f} {r['copy_share']:>6.0%} {speedup:>8}")


def write_results(rows, env, copy_bandwidth, json_path, csv_path):
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(dict(environment=env, copy_bandwidth_bytes_per_s=copy_bandwidth,
                                                   rows=rows), indent=2))
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        fields = list(rows[0]) + ["copy_bandwidth_bytes_per_s"] + list(env)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow(dict(r, copy_bandwidth_bytes_per_s=copy_bandwidth, **env))


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown or not items:
        raise SystemExit(f"--{what}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
    return items


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated, from: " + ", ".join(OPS))
    parser.add_argument("--shapes", default=None, help="comma-separated op shapes (default: each op's PixArt shapes)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--directions", default=",".join(DIRECTIONS))
    parser.add_argument("--timer", default="do_bench", choices=("do_bench", "cudagraph"),
                        help="do_bench: as a Python caller sees it; cudagraph: GPU time alone")
    parser.add_argument("--json", default=None, help="write rows and environment as JSON here")
    parser.add_argument("--csv", default=None, help="write rows (with environment columns) as CSV here")
    args = parser.parse_args(argv)
    ops = parse_list(args.ops, OPS, "ops")
    variants = parse_list(args.variants, VARIANTS, "variants")
    directions = parse_list(args.directions, DIRECTIONS, "directions")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("No GPU: CPU smoke test at a tiny shape, Triton interpreted. These numbers mean nothing.")
        copy_bandwidth = hardware.measure_copy_bandwidth(device, nbytes=64 * 2**20, repeats=3, warmup=1)
    else:
        copy_bandwidth = hardware.measure_copy_bandwidth(device)
    rows = []
    for name in ops:
        spec = OPS[name]
        shapes = args.shapes.split(",") if args.shapes else (spec.gpu_shapes if device.type == "cuda" else (spec.cpu_shape,))
        for shape_text in shapes:
            rows += bench_op(spec, shape_text, DTYPES[args.dtype], variants, directions, device, args.timer,
                             copy_bandwidth)
    env = hardware.environment(sys.argv if argv is None else ["bench/kernels.py", *argv])
    print_table(rows, copy_bandwidth)
    print(f"{env['gpu_name'] or env['cpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}")
    write_results(rows, env, copy_bandwidth, args.json, args.csv)


if __name__ == "__main__":
    main()
