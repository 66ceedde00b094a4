"""Where a training step's GPU time goes: torch.profiler over a few training steps of PixArt-α or MicroDiT.

    python bench/step_profile.py [--variant engine] [--preset pixart-xl2] [--res 256] [--batch 64]
                                 [--mask-ratio R] [--steps 5] [--warmup 3] [--json PATH] [--md PATH]
                                 [--trace PATH] [--git-commit SHA]

The step is bench/throughput.py's for the preset's family (same model build, synthetic batch, loss
under bf16 autocast, AdamW, ENGINE_BACKEND of the variant): PixArt-α's IDDPM step, or with a
MicroDiT preset (``microdit-xl2``) its EDM step, on the tokens --mask-ratio keeps (0.75 in its
first stage; default 0). After the first step (which compiles, for the compile variants) and
--warmup more:

1. the step's wall time is the median of --steps unprofiled steps, timed by CUDA events
   (bench/hardware.py's ``median_seconds``): img/s and every "% of wall" divide by it;
2. --steps more steps run under torch.profiler (CPU + CUDA activities); every GPU kernel, copy and
   fill it recorded is summed by name (device time) and put in a category by ``CATEGORY_RULES``.

Per category the result gives ms per step, % of the summed kernel time and % of the step's wall
time; "idle" is wall - summed kernel time per step: the time the GPU waits for launches (negative
only if kernels overlapped on several streams, or ran slower under the profiler than without). Also the 15 costliest kernels and the 10 costliest
ones no rule matched, so that the table can be extended. The profiled GPU span per step (first
kernel start to last kernel end, divided by --steps) is reported next to the unprofiled wall time
as a check on the profiler's own overhead.

Without a GPU it profiles the ``tiny`` preset (or the one given, e.g. ``microdit-tiny``) on the CPU
and sums the CPU self time of aten (and engine::) ops instead of kernels: a smoke test of the
script whose numbers say nothing about a GPU.

The file is not named profile.py: a script of that name in bench/ shadows the standard library's
``profile`` module, which ``torch._dynamo`` imports (through cProfile), and breaks every bench script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import hardware  # bench/ is on sys.path when run as a script
import throughput

CATEGORIES = ("gemm", "attention", "fused", "optimizer", "elementwise", "copy", "other")
CATEGORY_LABELS = dict(gemm="GEMM", attention="attention", fused="fused ops (engine)", optimizer="optimizer",
                       elementwise="elementwise / reduction", copy="copy / cast / memset", other="other")

# Kernel name -> category: the first pattern that matches (case-insensitive search) wins; no match is
# "other". Derived from kernel names of torch.profiler traces on H100 / H200 (cuBLAS: sm90_xmma_*,
# nvjet_*, cutlass; cuDNN SDPA: cudnn_generated_fort_native_sdpa_*; PyTorch's flash and memory-efficient
# attention: pytorch_flash::flash_*, fmha_cutlass*; ATen: at::native::*_kernel<functor>; Inductor:
# triton_{poi,red,per,tem}_*; the profiler's own Memcpy / Memset rows; examples in
# tests/bench/test_profile.py), from the engine's kernel names (`def _*_kernel` in engine/ops/*.py
# and engine/optim/*.py, `__global__` in csrc/*.cu) and, for the CPU smoke run, from aten op names.
# Order matters: attention kernels carry "cutlass" / "gemm"-like words, Inductor kernels the names
# of the aten ops they fused ("_to_copy", "layer_norm"), the engine's norm_modulate_reduce_kernel
# "reduce". A trace of a step with names no rule knows lists the costliest of them under
# "top_other": extend the table from there.
CATEGORY_RULES = (
    (r"^Memcpy|^Memset", "copy"),
    (r"^triton_tem_", "gemm"),  # Inductor's matmul templates
    (r"^triton_(poi|red|per)_", "elementwise"),  # Inductor's pointwise / reduction / persistent-reduction kernels
    (r"flash|fmha|sdpa|attention", "attention"),  # incl. the engine's _cross_attention_{fwd,bwd}_kernel
    (r"norm_modulate|patchify|bias_grad|gated_add|_swiglu_|_moe_|^(void )?engine::", "fused"),  # engine/ops Triton kernels, csrc engine:: kernels
    (r"multi_tensor_apply|adam|_foreach_", "optimizer"),  # fused / foreach AdamW
    (r"gemm|gemv|nvjet|xmma|cublas|cutlass|matmul|^aten::(mm|bmm|addmm|baddbmm|addbmm|_addmm_activation|linear)$",
     "gemm"),
    (r"copy|fill|^aten::(zero_|cat)$", "copy"),  # casts count as copies (autocast's bf16 weight copies)
    # on the CPU every aten op left (views and allocations included) lands here: a smoke-test simplification
    (r"elementwise|reduce|softmax|norm|gammabeta|index|scatter|gather|distribution|^aten::", "elementwise"),
)
_COMPILED_RULES = tuple((re.compile(pattern, re.IGNORECASE), category) for pattern, category in CATEGORY_RULES)

GPU_DEFAULTS = dict(preset="pixart-xl2", batch=64, steps=5, warmup=3)
CPU_DEFAULTS = dict(preset="tiny", batch=2, steps=1, warmup=1)
TOP_KERNELS = 40  # down to ~0.5% of the step on the H200: what the next fusion would target
TOP_OTHER = 10
CPU_NOTE = ("CPU run: a smoke test of the profiling path on a tiny model; 'kernel' time is the CPU self time of "
            "aten / engine ops and 'idle' is Python and autograd overhead; NOT representative of GPU training")


def classify(name: str) -> str:
    """The category of a kernel (or, on the CPU, an aten op) by its name; "other" when no rule matches."""
    for pattern, category in _COMPILED_RULES:
        if pattern.search(name):
            return category
    return "other"


@dataclasses.dataclass(frozen=True)
class KernelTime:
    name: str
    us: float  # device time of one GPU kernel / copy / fill, or the self time of one CPU op
    start_us: float
    end_us: float


# Rows of the GPU track that are no GPU work: CUDA synchronisation records (kineto's "cuda_sync"
# category: a "Context Sync" spans the whole host wait of torch.cuda.synchronize()).
_SYNC_EVENT = re.compile(r"^(Context|Stream|Event|Device) Sync$|^Stream Wait Event$")


def recorded_kernels(events, device: torch.device) -> list[KernelTime]:
    """What ran during the profiled steps: GPU kernels, copies and fills on CUDA (without the GPU-side
    copies of user annotations such as ProfilerStep#, as torch's own totals do, and without sync
    records); on the CPU the aten and engine:: ops, each with its self time, so that nested ops are
    not counted twice."""
    if device.type == "cuda":
        return [KernelTime(e.name, e.time_range.elapsed_us(), e.time_range.start, e.time_range.end)
                for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation
                and not _SYNC_EVENT.search(e.name)]
    return [KernelTime(e.name, e.self_cpu_time_total, e.time_range.start, e.time_range.end)
            for e in events if e.device_type == DeviceType.CPU and e.name.startswith(("aten::", "engine::"))]


# The profiler's Python-function events ("engine/model/microdit.py(183): forward") of the project's
# own files, and autograd's node events ("MulBackward0"), among an op's parents.
_SOURCE_FRAME = re.compile(r"(^|/)((engine|train|bench)/[\w/]*\.py\(\d+\): \w+)")
_AUTOGRAD_NODE = re.compile(r"^\w+Backward\w*$")
SOURCE_CATEGORIES = ("copy", "elementwise", "fused", "other")  # what --sources attributes: not GEMMs, attention, optimizer


def _where(event) -> str:
    """What launched an op, from its parents in the profile: the autograd node whose backward ran
    it (if any), then the innermost three of the project's Python frames."""
    node, frames, parent = None, [], event.cpu_parent
    while parent is not None:
        if node is None and _AUTOGRAD_NODE.match(parent.name):
            node = parent.name
        frame = _SOURCE_FRAME.search(parent.name)
        if frame:
            frames.append(frame.group(2))
        parent = parent.cpu_parent
    return " <- ".join(([f"backward of {node}"] if node else []) + frames[:3]) or "(no frame)"


def kernel_sources(events, device: torch.device, steps: int, limit: int) -> list[dict]:
    """The costliest kernels outside GEMMs, attention and the optimizer, grouped by what launched
    them: the aten op, its input shapes and where it ran from (_where; a profile taken with
    with_stack and record_shapes, of a step launched op by op: a replayed CUDA graph links no
    kernel to an op). On the CPU the aten ops are the kernels."""
    groups: dict[tuple, list[float]] = {}
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        if device.type == "cuda":
            launched = [(k.name, k.duration) for k in e.kernels]
        elif e.name.startswith(("aten::", "engine::")):
            launched = [(e.name, e.self_cpu_time_total)]
        else:
            continue
        for name, us in launched:
            if classify(name) not in SOURCE_CATEGORIES:
                continue
            shapes = ", ".join(str(tuple(shape)) for shape in (e.input_shapes or []) if shape)
            total = groups.setdefault((name, e.name, shapes, _where(e)), [0.0, 0])
            total[0] += us
            total[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])[:limit]
    return [dict(kernel=name, op=op, shapes=shapes, where=where, ms_per_step=us / steps / 1e3,
                 calls_per_step=calls / steps) for (name, op, shapes, where), (us, calls) in ranked]


def summarise(kernels: list[KernelTime], steps: int, wall_ms: float, batch: int) -> dict:
    """Per-category and per-kernel shares of the profiled kernel time, per step, against the wall time."""
    if not kernels:
        raise RuntimeError("the profiler recorded no kernels in the profiled steps (is CUPTI available?)")
    by_name: dict[str, list[float]] = {}  # name -> [total us, calls]
    for k in kernels:
        total = by_name.setdefault(k.name, [0.0, 0])
        total[0] += k.us
        total[1] += 1
    kernel_us = sum(us for us, _ in by_name.values())
    kernel_ms = kernel_us / steps / 1e3

    def share(us: float, calls: int) -> dict:
        ms = us / steps / 1e3
        return dict(ms_per_step=ms, pct_of_kernel_time=100.0 * us / kernel_us, pct_of_wall=100.0 * ms / wall_ms,
                    calls_per_step=calls / steps)

    per_category = {c: [0.0, 0] for c in CATEGORIES}
    for name, (us, calls) in by_name.items():
        total = per_category[classify(name)]
        total[0] += us
        total[1] += calls
    categories = {c: share(*per_category[c]) for c in CATEGORIES}
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])
    top = [dict(name=name, category=classify(name), **share(us, calls)) for name, (us, calls) in ranked[:TOP_KERNELS]]
    top_other = [dict(name=name, **share(us, calls)) for name, (us, calls) in ranked
                 if classify(name) == "other"][:TOP_OTHER]
    idle_ms = wall_ms - kernel_ms
    non_gemm = {c: categories[c]["ms_per_step"] for c in CATEGORIES if c != "gemm"}
    non_gemm["idle"] = idle_ms
    largest = max(non_gemm, key=non_gemm.get)
    return dict(
        step=dict(wall_ms=wall_ms, img_per_s=batch / (wall_ms / 1e3), kernel_ms=kernel_ms, idle_ms=idle_ms,
                  idle_pct_of_wall=100.0 * idle_ms / wall_ms, kernels_per_step=len(kernels) / steps,
                  profiled_span_ms=(max(k.end_us for k in kernels) - min(k.start_us for k in kernels)) / steps / 1e3),
        categories=categories,
        largest_non_gemm=dict(name=largest, ms_per_step=non_gemm[largest],
                              pct_of_wall=100.0 * non_gemm[largest] / wall_ms),
        top_kernels=top,
        top_other=top_other,
    )


def profile_variant(variant: throughput.Variant, config, resolution: int, batch: int, device: torch.device,
                    steps: int, warmup: int, trace: Path | None, mask_ratio: float | None = None,
                    sources: int = 0) -> dict:
    """Wall time of unprofiled steps, then the kernels of ``steps`` profiled ones, summarised; with
    ``sources`` > 0 also the costliest kernels' launching ops and Python stacks (kernel_sources)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with throughput.engine_backend(variant.backend), throughput.single_cpu_thread(device):
        train_step, losses = throughput.make_train_step(variant, config, resolution, batch, device,
                                                        mask_ratio=mask_ratio)
        train_step()  # compiles, for the compile variants
        wall_s = hardware.median_seconds(train_step, device, repeats=steps, warmup=warmup)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # no kernel of an earlier step runs into the profiled window
        with profile(activities=activities, with_stack=sources > 0, record_shapes=sources > 0) as prof:  # waits for the GPU
            for _ in range(steps):
                train_step()
    if not torch.isfinite(torch.stack(losses)).all():
        raise FloatingPointError(f"non-finite training loss: {torch.stack(losses).tolist()}")
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    events = prof.events()
    result = summarise(recorded_kernels(events, device), steps, wall_s * 1e3, batch)
    if sources > 0:
        result["sources"] = kernel_sources(events, device, steps, sources)
    return result


def _cell(name: str, width: int = 110) -> str:
    """A kernel name for a markdown table: shortened, in a code span (template brackets stay literal)."""
    short = name if len(name) <= width else name[: width - 3] + "..."
    return "`" + short.replace("|", "\\|") + "`"


def format_markdown(result: dict) -> str:
    s, env, step = result["settings"], result["environment"], result["step"]
    device = env["gpu_name"] or "CPU"
    time_kind = "device time of GPU kernels" if result["representative"] else "CPU self time of aten ops"
    masked = f", mask {s['mask_ratio']:g}" if s.get("mask_ratio") is not None else ""
    lines = [f"## Training step profile: {s['variant']}, {s['preset']} {s['resolution']}px, batch {s['batch']}"
             f"{masked}, {device}", ""]
    if result["note"]:
        lines += [f"**{result['note']}.**", ""]
    lines += [
        f"Step {step['wall_ms']:.2f} ms ({step['img_per_s']:.1f} img/s; median of {s['steps']} unprofiled steps); "
        f"kernels {step['kernel_ms']:.2f} ms per step ({time_kind}, {step['kernels_per_step']:.0f} per step, "
        f"{s['steps']} profiled steps); profiled span {step['profiled_span_ms']:.2f} ms per step.",
        f"torch {env['torch']}, triton {env['triton']}, {env['date']}, commit {env['git_commit']}, "
        f"`{env['command']}`",
        "",
        "| category | ms / step | % of kernel time | % of step wall |",
        "|---|---:|---:|---:|",
    ]
    for c in CATEGORIES:
        row = result["categories"][c]
        lines.append(f"| {CATEGORY_LABELS[c]} | {row['ms_per_step']:.2f} | {row['pct_of_kernel_time']:.1f} | "
                     f"{row['pct_of_wall']:.1f} |")
    lines += [f"| idle (wall - kernels) | {step['idle_ms']:.2f} | - | {step['idle_pct_of_wall']:.1f} |",
              f"| step wall | {step['wall_ms']:.2f} | 100.0 | 100.0 |", ""]
    largest = result["largest_non_gemm"]
    lines += [f"Largest non-GEMM share: {CATEGORY_LABELS.get(largest['name'], largest['name'])}, "
              f"{largest['ms_per_step']:.2f} ms per step ({largest['pct_of_wall']:.1f}% of the step).", "",
              f"Top {len(result['top_kernels'])} kernels:", "",
              "| kernel | category | ms / step | % of kernel time | calls / step |", "|---|---|---:|---:|---:|"]
    lines += [f"| {_cell(k['name'])} | {k['category']} | {k['ms_per_step']:.3f} | {k['pct_of_kernel_time']:.1f} | "
              f"{k['calls_per_step']:g} |" for k in result["top_kernels"]]
    if result["top_other"]:
        lines += ["", "Costliest kernels in no category (extend CATEGORY_RULES in bench/step_profile.py):", "",
                  "| kernel | ms / step | % of kernel time |", "|---|---:|---:|"]
        lines += [f"| {_cell(k['name'])} | {k['ms_per_step']:.3f} | {k['pct_of_kernel_time']:.1f} |"
                  for k in result["top_other"]]
    if result.get("sources"):
        lines += ["", "Where the costliest kernels outside GEMMs, attention and the optimizer come from (the launching "
                  "op, its input shapes, the innermost project frames):", "",
                  "| kernel | op | shapes | where | ms / step | calls / step |", "|---|---|---|---|---:|---:|"]
        lines += [f"| {_cell(k['kernel'], 60)} | {k['op']} | {_cell(k['shapes'], 60)} | {_cell(k['where'], 120)} | "
                  f"{k['ms_per_step']:.3f} | {k['calls_per_step']:g} |" for k in result["sources"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--variant", default="engine", help=f"one of {','.join(throughput.VARIANTS)} (default: engine)")
    p.add_argument("--preset", default=None, help="model preset (default: pixart-xl2 on GPU, tiny on CPU)")
    p.add_argument("--res", type=int, default=None, help="image side in pixels (default: the preset's, 256 for "
                                                         "pixart-xl2)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 64 on GPU, 2 on CPU)")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="MicroDiT presets: share of patch tokens dropped after the patch-mixer (default 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="unprofiled timed steps, then as many profiled ones (default: 5 GPU, 1 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after the first (compiling) step (default: 3 GPU, 1 CPU)")
    p.add_argument("--git-commit", default=None,
                   help="commit to record when the tree is not a git checkout (e.g. a copy on a GPU machine)")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--md", type=Path, default=None, help="write the markdown summary here")
    p.add_argument("--trace", type=Path, default=None, help="write the profiler's chrome trace here")
    p.add_argument("--sources", type=int, default=0,
                   help="also list the N costliest kernels outside GEMMs, attention and the optimizer by launching "
                        "op, shapes and Python stack (a variant without a CUDA graph: a replay links no kernel to "
                        "an op)")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    defaults = GPU_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.variant not in throughput.VARIANTS:
        raise SystemExit(f"--variant: unknown {args.variant!r}; choose from {','.join(throughput.VARIANTS)}")
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if args.sources < 0:
        raise SystemExit(f"--sources must be >= 0, got {args.sources}")
    if args.sources and throughput.VARIANTS[args.variant].graphed:
        raise SystemExit(f"--sources needs a variant launched op by op, not {args.variant}: a replayed CUDA graph "
                         "links no kernel to the op that launched it (profile 'engine' for engine+graph's kernels)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    # checks preset, res and mask ratio
    ((preset_name, resolution, batch, mask_ratio),) = throughput.measurement_plan(args, schedule=None)
    variant = throughput.VARIANTS[args.variant]
    config = throughput.preset(preset_name, resolution)
    try:
        throughput.check_variant(throughput.family_step(config, resolution, mask_ratio), variant)
    except ValueError as exc:
        raise SystemExit(f"--variant: {exc}") from None
    command = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    if device.type != "cuda":
        print(f"NOTE: {CPU_NOTE}.", flush=True)
    result = dict(
        benchmark="training step profile",
        representative=device.type == "cuda",
        note=None if device.type == "cuda" else CPU_NOTE,
        environment=hardware.environment(command, git_commit=args.git_commit),
        settings=dict(variant=variant.name, backend=variant.backend, compiled=variant.compiled, preset=preset_name,
                      resolution=resolution, batch=batch, mask_ratio=mask_ratio, steps=args.steps, warmup=args.warmup,
                      wall="median of --steps unprofiled steps by CUDA events (perf_counter on CPU), after the "
                           "first step and --warmup more",
                      kernel_time="torch.profiler over --steps further steps: device time of every GPU kernel, "
                                  "copy and fill (CPU: self time of aten / engine ops), summed per step"),
        **profile_variant(variant, config, resolution, batch, device, args.steps, args.warmup, args.trace,
                          mask_ratio, args.sources),
        category_rules=[list(rule) for rule in CATEGORY_RULES],
    )
    markdown = format_markdown(result)
    if args.json is not None:
        throughput.write_json(args.json, result)
    if args.md is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
