"""The optimizer pass of a training step on PixArt-XL/2's parameters, timed alone: torch's fused AdamW
and engine.optim.AdamW, with and without the gradient clipping and the EMA the training loop runs
around them.

    python bench/optimizer.py [--preset pixart-xl2] [--res 256] [--step-ms X] [--max-norm 0.01]
                              [--decay 0.9999] [--calls 20] [--replays 10] [--json PATH] [--git-commit C]

Rows, each with its own optimizer over the model's parameters (random fp32 gradients, fixed seed;
the engine rows keep bf16 copies of the Linears' parameters, as in training):

    a  torch-adamw            torch's fused AdamW step
    b  torch-clip-adamw-ema   clip_grad_norm_(foreach) + torch's fused AdamW + torch._foreach_lerp_ EMA
                              (the training loop's step with torch's optimizer)
    c  engine-adamw           engine.optim.AdamW.step: bf16 copies and the non-finite flag
    d  engine-adamw-noflag    adamw_step_ with nonfinite=None: (c) - (d) is the flag's cost
    e  engine-clip-adamw-ema  clip_grad_norm_ + engine AdamW + torch._foreach_lerp_ EMA (the loop today)
    f  engine-folded          clip_coefficient + engine AdamW with the folded clip scale and the fused EMA

Minimum bytes, for N fp32 parameters of which Nc have a bf16 copy: the norm pass reads the
gradients (4 N), the clip multiply reads and writes them (8 N), the update reads p, g, m, v and
writes p, m, v (28 N) plus the copies (2 Nc), the separate EMA reads the shadow and p and writes
the shadow (12 N), the fused one reads and writes the shadow (8 N):

    a 28 N    b 52 N    c, d 28 N + 2 Nc    e 52 N + 2 Nc    f 40 N + 2 Nc

GB/s is those bytes over the time; ``copy`` divides it by the device-to-device copy rate measured
in the same run (bytes read + written), so 100% is a plain copy's speed. On the GPU a row's time is
the median per call over --replays replays of a CUDA graph of --calls calls of its step
(bench/kernels.py cuda_graph_seconds): GPU time alone, as in a training step whose host runs
ahead. ``--step-ms`` (the engine+graph step time that bench/throughput.py measured in the same
device call) adds each row's share of the step.

Without a GPU it runs the ``tiny`` preset on the CPU, the engine rows on their eager backend: a
smoke test of the script whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent


def _load_bench_kernels():
    """bench/kernels.py by its path, for cuda_graph_seconds: importing throughput moves bench/ behind
    the installed packages, where a plain `import kernels` finds the installed `kernels` package.
    Loaded before engine's modules: on the CPU it switches the Triton interpreter on first."""
    if "bench_kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_kernels", _HERE / "kernels.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_kernels"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_kernels"]


cuda_graph_seconds = _load_bench_kernels().cuda_graph_seconds

import hardware  # noqa: E402  (bench/ is on sys.path when run as a script)
import throughput  # noqa: E402
from engine.config import preset  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.optim import AdamW, clip_coefficient  # noqa: E402
from engine.optim.adamw_kernel import adamw_step_  # noqa: E402

# PixArt-α's optimiser settings (train/configs/pixart-alpha.toml): gradient clip 0.01, EMA 0.9999.
HYPER = dict(lr=2e-5, weight_decay=0.03, eps=1e-10)
GPU_DEFAULTS = dict(preset="pixart-xl2", calls=20, replays=10, copy_bytes=1 << 30)
CPU_DEFAULTS = dict(preset="tiny", calls=1, replays=3, copy_bytes=16 << 20)
CPU_NOTE = ("CPU run: a smoke test of the benchmark on the tiny preset, engine rows on their eager backend; "
            "these numbers say nothing about the GPU")

# (row, name, description, bytes per fp32 parameter, bytes per parameter with a copy)
ROWS = (
    ("a", "torch-adamw", "torch fused AdamW", 28, 0),
    ("b", "torch-clip-adamw-ema", "clip_grad_norm_ + torch fused AdamW + _foreach_lerp_ EMA", 52, 0),
    ("c", "engine-adamw", "engine AdamW (bf16 copies, non-finite flag)", 28, 2),
    ("d", "engine-adamw-noflag", "engine adamw_step_ without the non-finite flag", 28, 2),
    ("e", "engine-clip-adamw-ema", "clip_grad_norm_ + engine AdamW + _foreach_lerp_ EMA", 52, 2),
    ("f", "engine-folded", "clip_coefficient + engine AdamW, clip scale and EMA folded in", 40, 2),
)


class Setup:
    """The model's parameters with random gradients, the EMA shadows, and the row builders."""

    def __init__(self, preset_name: str, resolution: int, device: torch.device, max_norm: float, decay: float):
        with torch.device(device):
            self.model = build_model(preset(preset_name, resolution))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        generator = torch.Generator(device=device).manual_seed(0)
        for p in self.params:
            p.grad = 1e-3 * torch.randn(p.shape, generator=generator, device=device)
        self.grads = [p.grad for p in self.params]
        self.shadows = [p.detach().float().clone() for p in self.params]
        self.device, self.max_norm, self.decay = device, max_norm, decay

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def copied_numel(self) -> int:
        """Elements of the parameters AdamW.attach_copies gives a copy: those a submodule reads
        through an attribute ``<name>_copy``."""
        return sum(p.numel() for module in self.model.modules() for name, p in module.named_parameters(recurse=False)
                   if hasattr(module, f"{name}_copy"))

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        cuda = self.device.type == "cuda"  # capturable: its step count on the device, for the graph
        return torch.optim.AdamW(self.params, fused=cuda, capturable=cuda, **HYPER)

    def _engine_optimizer(self) -> AdamW:
        optimizer = AdamW(self.params, **HYPER)
        optimizer.attach_copies(self.model, torch.bfloat16)
        return optimizer

    def _clip(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)

    def _ema(self) -> None:
        torch._foreach_lerp_(self.shadows, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def step(self, row: str):
        """The row's step, a callable of no arguments, with its optimizer freshly built."""
        if row in ("a", "b"):
            optimizer = self._torch_optimizer()
        else:
            optimizer = self._engine_optimizer()
        if row in ("a", "c"):
            return optimizer.step
        if row in ("b", "e"):
            def clip_step_ema():
                self._clip()
                optimizer.step()
                self._ema()
            return clip_step_ema
        if row == "d":
            optimizer.step()  # creates the moments
            states = [optimizer.state[p] for p in self.params]
            exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            copies = [c.tensor if (c := optimizer.copies.get(p)) is not None else None for p in self.params]
            group = optimizer.param_groups[0]
            beta1, beta2 = group["betas"]

            @torch.no_grad()
            def step_without_flag():
                adamw_step_(self.params, self.grads, exp_avgs, exp_avg_sqs, copies, step=2, lr=group["lr"],
                            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            return step_without_flag
        optimizer.attach_ema(dict(zip(self.params, self.shadows)), self.decay)
        scale = torch.ones((), device=self.device)
        optimizer.set_grad_scale(scale)

        def folded_step():
            scale.copy_(clip_coefficient(self.grads, self.max_norm)[1])
            optimizer.step()
        return folded_step


def seconds(step, device: torch.device, calls: int, replays: int) -> float:
    if device.type != "cuda":
        return hardware.median_seconds(step, device, repeats=replays, warmup=1)
    with torch.cuda.stream(torch.cuda.Stream()):  # graph capture needs a side stream
        return cuda_graph_seconds(step, calls=calls, replays=replays)


def measure_row(setup: Setup, row: str, calls: int, replays: int) -> dict:
    try:
        with throughput.single_cpu_thread(setup.device):
            measured = dict(ms=seconds(setup.step(row), setup.device, calls, replays) * 1e3, error=None)
    except Exception as exc:  # one row failing (out of memory) must not end the run
        measured = dict(ms=None, error=throughput.describe_error(exc))
    gc.collect()  # the row's optimizer and graph go before the next is built
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return measured


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--preset", default=None, help="model preset (default: pixart-xl2 on GPU, tiny on CPU)")
    p.add_argument("--res", type=int, default=None, help="image side in pixels (default: the preset's)")
    p.add_argument("--max-norm", type=float, default=0.01, help="gradient clipping norm (PixArt-α's: 0.01)")
    p.add_argument("--decay", type=float, default=0.9999, help="EMA decay (PixArt-α's: 0.9999)")
    p.add_argument("--calls", type=int, default=None, help="steps per CUDA graph (default 20)")
    p.add_argument("--replays", type=int, default=None, help="graph replays, median reported (default 10; CPU: "
                                                             "timed calls, default 3)")
    p.add_argument("--step-ms", type=float, default=None,
                   help="the training step's time (bench/throughput.py's engine+graph step_ms, same call): "
                        "adds each row's share of it")
    p.add_argument("--git-commit", default=None,
                   help="commit to record when the tree is not a git checkout (e.g. a copy on a GPU machine)")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    defaults = GPU_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS
    for name in ("preset", "calls", "replays"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    args.copy_bytes = defaults["copy_bytes"]
    if args.res is None:
        args.res = preset(args.preset).input_size * 8
    if args.calls < 1 or args.replays < 1:
        raise SystemExit(f"--calls and --replays must be >= 1, got {args.calls} and {args.replays}")
    if args.step_ms is not None and not args.step_ms > 0:
        raise SystemExit(f"--step-ms must be > 0, got {args.step_ms}")
    return args


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    header = f"{'row':<4}{'name':<23}{'ms':>9}{'GB':>8}{'GB/s':>8}{'copy':>7}{'% step':>8}  description"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['row']:<4}{r['name']:<23}{_fmt(r['ms'], '.3f'):>9}{r['bytes'] / 1e9:>8.2f}"
                     f"{_fmt(r['gb_per_s'], '.0f'):>8}{_fmt(r['copy_fraction'], '.0%'):>7}"
                     f"{_fmt(r['step_fraction'], '.2%'):>8}  {r['error'] or r['description']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    command = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    if device.type != "cuda":
        print(f"NOTE: {CPU_NOTE}.", flush=True)
    copy_rate = hardware.measure_copy_bandwidth(device, nbytes=args.copy_bytes)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    setup = Setup(args.preset, args.res, device, args.max_norm, args.decay)
    numel, copied = setup.numel(), setup.copied_numel()
    gc.collect()
    result = dict(
        benchmark="optimizer pass",
        representative=device.type == "cuda",
        note=None if device.type == "cuda" else CPU_NOTE,
        environment=hardware.environment(command, git_commit=args.git_commit),
        hardware=dict(device=str(device), gpu_name=gpu_name, copy_bytes=args.copy_bytes, copy_bytes_per_s=copy_rate),
        settings=dict(preset=args.preset, resolution=args.res, tensors=len(setup.params), parameters=numel,
                      copied_parameters=copied, max_norm=args.max_norm, decay=args.decay, hyper=HYPER,
                      step_ms=args.step_ms, calls=args.calls, replays=args.replays,
                      timing=("median per call over replays of a CUDA graph of `calls` steps"
                              if device.type == "cuda" else "median perf_counter time of `replays` calls"),
                      bytes="minimum bytes per row (module docstring): a 28 N, b 52 N, c/d 28 N + 2 Nc, "
                            "e 52 N + 2 Nc, f 40 N + 2 Nc"),
        rows=[],
    )
    print(f"device {gpu_name or 'cpu'}: copy {copy_rate / 1e9:.1f} GB/s (read + write); {args.preset}: "
          f"{len(setup.params)} tensors, {numel / 1e6:.1f}M parameters ({copied / 1e6:.1f}M with a bf16 copy)",
          flush=True)
    for row, name, description, per_param, per_copy in ROWS:
        nbytes = per_param * numel + per_copy * copied
        measured = measure_row(setup, row, args.calls, args.replays)
        ms = measured["ms"]
        rate = nbytes / (ms / 1e3) if ms else None
        result["rows"].append(dict(
            row=row, name=name, description=description, ms=ms, bytes=nbytes, gb_per_s=rate / 1e9 if rate else None,
            copy_fraction=rate / copy_rate if rate else None,
            step_fraction=ms / args.step_ms if ms is not None and args.step_ms else None, error=measured["error"]))
        print(f"  {row} {name}: {_fmt(ms, '.3f')} ms {measured['error'] or ''}", flush=True)
        if args.json is not None:
            throughput.write_json(args.json, result)
    print()
    print(format_table(result["rows"]))
    if device.type != "cuda":
        print(f"\nNOTE: {CPU_NOTE}.")
    return result


if __name__ == "__main__":
    main()
