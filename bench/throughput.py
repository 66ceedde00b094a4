"""Training throughput of the engine's models side by side: engine kernels vs eager vs torch.compile
(vs diffusers, for PixArt-α).

    python bench/throughput.py [--preset pixart-xl2] [--res 256] [--batch 64] [--variants LIST]
                               [--mask-ratio R] [--steps N] [--warmup N] [--schedule]
                               [--schedule-file F] [--schedule-batches LIST] [--grid-gco2-per-kwh G]
                               [--usd-per-gpu-hour P] [--json PATH] [--csv PATH] [--plot PATH]

One row per variant, all on the same model config, synthetic inputs, optimizer and loss:

    eager              engine model, ops backend "eager" (ENGINE_BACKEND=eager)
    engine             engine model, fused backends (ENGINE_BACKEND=auto)
    engine+graph       the same with forward and backward replayed as one CUDA graph
                       (engine.step_graph), as `python -m train` runs one-GPU fixed-shape stages
    compile            torch.compile of the eager engine model
    engine+compile     fused backends under torch.compile
    diffusers          diffusers' PixArtTransformer2DModel of the same architecture (PixArt only)
    diffusers+compile  the same under torch.compile (PixArt only)

The preset's family says what a training step is (``FamilyStep``: the objective, the synthetic
batch, the loss); two families are measured:

- PixArt-α (``pixart-xl2``, ``tiny``, their ``-ms`` twins): IDDPM loss (engine.diffusion.iddpm,
  learned variance) on latents (B, 4, res/8, res/8), text features (B, text_len, caption_channels)
  with random valid lengths in [1, text_len] and integer timesteps.
- MicroDiT (``microdit-xl2``, ``microdit-tiny``): the EDM loss as MicroDiT trains it (σ_data 0.9;
  ln σ ~ N(-0.6, 1.2²) below 512 px as its 256 px stages, N(0, 0.6²) from 512 px as its 512 px
  stages; MICRODIT.md) on latents and random caption features (B, text_len, caption_channels),
  77 x 1024 for microdit-xl2. With --mask-ratio R > 0 each sample keeps int(T (1 - R)) of its T
  patch tokens after the patch-mixer and the loss counts those patches only (stage 1: R = 0.75).
  The caption drop and the kept tokens come from the family's own ``training_conditions`` and the
  loss from the objective's ``training_losses`` with the loss mask, as `python -m train run` calls
  them (train.loop.micro_batch_loss); here they are drawn once from a seeded generator and the
  same batch is trained on every step. There is no diffusers MicroDiT: its diffusers rows say so
  in their error, and the default variant list leaves them out. The expert-choice MoE blocks run
  engine.ops.moe with the row's ENGINE_BACKEND (under "auto", the backend that op prefers).

Every step runs under bf16 autocast over fp32 master weights, then backward, then AdamW: torch's
(fused on CUDA), except on the engine and engine+graph rows, whose step is engine.optim.AdamW (the
same update, one Triton pass that also writes the bf16 weight copies the engine's Linears read
instead of casting; --optimizer torch gives every row torch's, for an A/B). The noise level
(timestep or σ) and, for MicroDiT, the kept tokens are fixed inputs of the step (the captured ones
of engine+graph); the noise is drawn in the step. Each variant builds a fresh model and optimizer;
its first step (which compiles, for compile variants) and --warmup more steps are untimed; the
step time is the median over --steps, timed by CUDA events. On the GPU each variant runs in its
own process (--no-isolate to turn that off), so a faulting kernel cannot take the later rows down
and every variant starts with all GPU memory free. A variant that fails (out of memory, compile
error, crash) shows its error in its row and the run goes on; the JSON and CSV are rewritten after
every row, so a run cut short keeps what it measured.

FLOPs per image are the engine model's ``flops_per_sample`` (docs/design.md §10): PixArt's at the
padded text length, used for the diffusers rows too (same architecture); MicroDiT's at the row's
mask ratio (``mask_ratio`` in the row: None for PixArt), which counts the experts' GEMMs on the
tokens they take and no routing. MFU is reported against the bf16 matmul rate measured in the
same run (8192^3) and against the datasheet dense peak.

--schedule measures every distinct shape of the preset's family's training schedule once and
projects the whole schedule (docs/cost.md): bench/schedule_pixart_alpha.json for PixArt-α (256 and
512 px with --preset, 1024 px with its micro-conditioned "-ms" twin), bench/schedule_microdit.json
for MicroDiT (256 and 512 px, each masked 0.75 and unmasked), or --schedule-file. Per variant: GPU-days
on this GPU, A100-equivalent GPU-days, the energy (kWh, from the GPU's NVML counter read around the
timed steps of each row; null with the reason where there is no counter), kg CO2e at
--grid-gco2-per-kwh and dollars at --usd-per-gpu-hour, beside the paper's published cost; --plot
draws them beside it.

Device time: on an H200 the default run at 256 px took about 5 minutes, mostly compiling (the first
step of a compile variant took 64-82 s); a non-compiled variant takes 10-20 s. --schedule measures
three (PixArt-α) or four (MicroDiT) shapes, so where commands have a time limit, repeat

    python bench/throughput.py --schedule --resume R.json --json R.json --csv R.csv --plot R.png

until every row is in: each run keeps the error-free rows of the last and measures the rest.

Without a GPU it runs the ``tiny`` preset on the CPU (``microdit-tiny`` for MicroDiT): a smoke test
of the whole path whose numbers say nothing about GPU training.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import gc
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import hardware
from engine.config import MicroDiTConfig, PixArtConfig, latent_size, preset

# Run as a script, this folder is first on sys.path, where its kernels.py would shadow the
# installed `kernels` package that transformers imports (diffusers -> transformers) when present:
# move it behind the installed packages (its sibling modules still import by name).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]
from engine import family as engine_family
from engine.diffusion.edm import EDM
from engine.diffusion.iddpm import GaussianDiffusion
from engine.model import build_model
from engine.optim import AdamW
from engine.step_graph import StepGraph
from train.config import TrainSection

SCHEDULE_PATH = Path(__file__).resolve().parent / "schedule_pixart_alpha.json"
MICRODIT_SCHEDULE_PATH = Path(__file__).resolve().parent / "schedule_microdit.json"
SCHEDULE_FILES = {"pixart": SCHEDULE_PATH, "microdit": MICRODIT_SCHEDULE_PATH}  # --schedule's default, by family
SECONDS_PER_DAY = 86400.0
JOULES_PER_KWH = 3.6e6
GIB = 2**30

# --grid-gco2-per-kwh's default: the world's average carbon intensity of electricity generation in
# 2023, lifecycle emissions in CO2-equivalents, from Ember's yearly electricity data (the data of
# its Global Electricity Review 2024). A world figure says nothing about a particular data centre's
# grid: give your own.
GRID_GCO2_PER_KWH = 481.0
GRID_SOURCE = ("Ember, Yearly Electricity Data / Global Electricity Review 2024: world average lifecycle carbon "
               "intensity of electricity generation in 2023, 481 gCO2e/kWh")
# --usd-per-gpu-hour's default: the H100 rental price MicroDiT's paper prices its run at.
USD_PER_GPU_HOUR = 3.75
PRICE_SOURCE = ("Sehwag et al., arXiv 2407.15811 (MicroDiT): $3.75 per H100-hour, the price behind its $1,890 for "
                "2.6 days on 8 x H100")
ENERGY_SCOPE = ("the GPU board's own energy (NVML counter read around the timed steps of each row); host CPUs, "
                "memory, network and cooling are not counted")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    model: str  # "engine" or "diffusers"
    backend: str | None  # ENGINE_BACKEND while it runs; None leaves the variable as it is
    compiled: bool
    graphed: bool = False  # forward + backward captured once and replayed (engine.step_graph), CUDA only
    optimizer: str = "torch"  # "torch": torch's AdamW (fused on CUDA); "engine": engine.optim.AdamW (bf16 copies)


VARIANTS = {v.name: v for v in (
    Variant("eager", "engine", "eager", False),
    Variant("engine", "engine", "auto", False, optimizer="engine"),
    Variant("engine+graph", "engine", "auto", False, graphed=True, optimizer="engine"),
    Variant("compile", "engine", "eager", True),
    Variant("engine+compile", "engine", "auto", True),
    Variant("diffusers", "diffusers", None, False),
    Variant("diffusers+compile", "diffusers", None, True),
)}

# Per-device defaults. On a 2-core CPU machine torch.compile of even the tiny model took 110-180 s
# per variant (fwd + bwd, measured while sharing the cores), so the CPU run leaves the compile
# variants out unless asked.
GPU_DEFAULTS = dict(preset="pixart-xl2", batch=64, steps=10, warmup=3, variants=",".join(VARIANTS),
                    matmul_n=8192, copy_bytes=1 << 30)
CPU_DEFAULTS = dict(preset="tiny", batch=4, steps=3, warmup=1, variants="eager,engine,diffusers",
                    matmul_n=128, copy_bytes=16 << 20)
# --schedule-batches' defaults by family, (GPU, CPU): one per-GPU batch per shape of the family's
# schedule file, in the order the shapes first appear there. PixArt-α: 256, 512, 1024 px. MicroDiT:
# 256 px masked 0.75, 256 px unmasked, 512 px masked, 512 px unmasked, the batches of
# bench/gpu_session.sh's MicroDiT table on one 80 GB GPU (the official configs' per-GPU micro-batches,
# under 8-way sharding, are 256, 64, 32 and 16: bench/schedule_microdit.json).
SCHEDULE_BATCHES = {"pixart": ("64,32,8", "4,2,1"), "microdit": ("256,64,64,16", "2,2,1,1")}

A100_NOTE = ("A100-equivalent GPU-days = GPU-days on this GPU x (its datasheet dense bf16 peak / 312 TFLOP/s), "
             "i.e. assuming an A100 reaches the same MFU")
CPU_NOTE = ("CPU run: a smoke test of the benchmark path on a tiny model; these numbers are NOT representative "
            "of GPU training throughput (and on the CPU the 'engine' variant's auto backend is eager)")


class DiffusersPixArt(nn.Module):
    """diffusers' PixArtTransformer2DModel behind the engine model's call signature."""

    def __init__(self, config: PixArtConfig):
        super().__init__()
        from diffusers import PixArtTransformer2DModel

        from engine.interop.diffusers import diffusers_kwargs

        self.transformer = PixArtTransformer2DModel(**diffusers_kwargs(config))

    def forward(self, x, t, caption, caption_lens, resolution=None, aspect_ratio=None):
        L = caption.shape[1]
        keep = (torch.arange(L, device=caption.device)[None] < caption_lens[:, None]).to(x.dtype)  # (B, L) 1 = valid
        return self.transformer(
            x, encoder_hidden_states=caption, timestep=t, encoder_attention_mask=keep,
            added_cond_kwargs={"resolution": resolution, "aspect_ratio": aspect_ratio}, return_dict=False,
        )[0]  # (B, 2C, H, W)


@contextlib.contextmanager
def engine_backend(name: str | None):
    """Set ENGINE_BACKEND (read by the ops at call time) for one variant, then restore it."""
    previous = os.environ.get("ENGINE_BACKEND")
    if name is not None:
        os.environ["ENGINE_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ENGINE_BACKEND", None)
        else:
            os.environ["ENGINE_BACKEND"] = previous


@contextlib.contextmanager
def single_cpu_thread(device: torch.device):
    """On the CPU, run the (tiny) model on one thread: with the cores shared by other jobs, OpenMP
    threads waiting on each other made a tiny-model step 18x slower (716 ms on 2 threads, 39 ms on 1)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synthetic_batch(config: PixArtConfig, resolution: int, batch: int, device: torch.device, num_timesteps: int):
    """Latents, timesteps and caption features for one PixArt step; the same for every variant (fixed seed)."""
    g = torch.Generator(device=device).manual_seed(0)
    side = latent_size(resolution)
    x0 = torch.randn(batch, config.in_channels, side, side, generator=g, device=device)  # (B, C, h, w)
    t = torch.randint(0, num_timesteps, (batch,), generator=g, device=device)  # (B,)
    caption = torch.randn(batch, config.text_len, config.caption_channels, generator=g, device=device)  # (B, L, Cc)
    caption_lens = torch.randint(1, config.text_len + 1, (batch,), generator=g, device=device)  # (B,)
    kwargs = dict(caption=caption, caption_lens=caption_lens)
    if config.micro_conditions:  # square images at their own size, as in the 1024px MS stage
        kwargs["resolution"] = torch.full((batch, 2), float(resolution), device=device)  # (B, 2) = (h, w)
        kwargs["aspect_ratio"] = torch.ones(batch, 1, device=device)  # (B, 1)
    return x0, t, kwargs


# ------------------------------------------------------------------------------ a family's step


class FamilyStep:
    """What a training step of one model family is, for one config, resolution and mask ratio: its
    objective, its fixed synthetic batch and its loss. The rest (model build, optimizer, autocast,
    timing, CUDA graph) is shared by every family. A subclass per family, in FAMILY_STEPS:

    - ``models``: the Variant.model kinds that exist for the family;
    - ``mask_ratio``: the share of patch tokens the step drops (None: the family has no masking);
    - ``flops(model)``: training FLOPs per image, the model's own count;
    - ``inputs(model, batch, device)`` -> (static, fixed): the tensors a CUDA graph captures as the
      step's inputs (``x0``, the noise ``level``, ...) and the model's other keyword arguments,
      drawn from a generator seeded 0, so every variant trains on the same batch;
    - ``loss(forward, static, fixed)``: the batch's mean loss through ``forward`` (the caller
      sets autocast)."""

    title = ""
    models: tuple[str, ...] = ("engine",)

    def __init__(self, config, resolution: int):
        self.config, self.resolution = config, resolution
        self.mask_ratio: float | None = None


class PixArtStep(FamilyStep):
    """PixArt-α: IDDPM with learned variance, caption features of random valid lengths."""

    title = "PixArt-α"
    models = ("engine", "diffusers")  # diffusers' PixArtTransformer2DModel: the same architecture

    def __init__(self, config: PixArtConfig, resolution: int, mask_ratio: float | None = None):
        super().__init__(config, resolution)
        if mask_ratio:
            raise ValueError(f"PixArt-α drops no tokens: --mask-ratio {mask_ratio} needs a MicroDiT preset")
        self.objective = GaussianDiffusion(learn_sigma=config.learn_sigma)

    def flops(self, model: nn.Module) -> float:
        return model.flops_per_sample(self.resolution, self.resolution, self.config.text_len)

    def inputs(self, model: nn.Module, batch: int, device: torch.device) -> tuple[dict, dict]:
        x0, t, kwargs = synthetic_batch(self.config, self.resolution, batch, device, self.objective.num_timesteps)
        return {"x0": x0, "level": t}, kwargs

    def loss(self, forward, static: dict, fixed: dict) -> torch.Tensor:
        return self.objective.training_losses(forward, static["x0"], static["level"], fixed)["loss"].mean()


# MicroDiT's EDM (MICRODIT.md, from the official model.py): σ_data, and the (P_mean, P_std) of ln σ
# of its 256 px stages and of its 512 px stages. Smaller images (the CPU's tiny runs) take the
# 256 px values.
MICRODIT_SIGMA_DATA = 0.9
MICRODIT_NOISE_LEVELS = {256: (-0.6, 1.2), 512: (0.0, 0.6)}


class MicroDiTStep(FamilyStep):
    """MicroDiT: EDM with the loss on the kept patches, caption drop and kept tokens drawn by the
    family's ``training_conditions`` and the loss by the objective's ``training_losses``, as
    train.loop.micro_batch_loss calls them."""

    title = "MicroDiT"
    models = ("engine",)

    def __init__(self, config: MicroDiTConfig, resolution: int, mask_ratio: float | None = None):
        super().__init__(config, resolution)
        self.mask_ratio = 0.0 if mask_ratio is None else float(mask_ratio)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"--mask-ratio must be in [0, 1), got {mask_ratio}")
        p_mean, p_std = MICRODIT_NOISE_LEVELS[512 if resolution >= 512 else 256]
        self.objective = EDM(sigma_data=MICRODIT_SIGMA_DATA, p_mean=p_mean, p_std=p_std)
        self.family = engine_family.of_config(config)
        self.train = TrainSection(mask_ratio=self.mask_ratio)  # and a run's default caption dropout

    def flops(self, model: nn.Module) -> float:
        return model.flops_per_sample(self.resolution, self.resolution, self.mask_ratio)

    def inputs(self, model: nn.Module, batch: int, device: torch.device) -> tuple[dict, dict]:
        c = self.config
        g = torch.Generator(device=device).manual_seed(0)
        side = latent_size(self.resolution)
        x0 = torch.randn(batch, c.in_channels, side, side, generator=g, device=device)  # (B, C, h, w)
        caption = torch.randn(batch, c.text_len, c.caption_channels, generator=g, device=device)  # (B, L, Ct)
        # micro_batch_loss's order of draws: caption drop and kept tokens, then σ
        fixed = self.family.training_conditions(model, {"latent": x0, "caption": caption}, g, self.train)
        static = {"x0": x0, "level": self.objective.sample_noise_level(batch, g, device)}  # level: σ (B,)
        if "keep" in fixed:
            static.update(keep=fixed.pop("keep"), loss_mask=fixed.pop("loss_mask"))  # (B, K), (B, T)
        return static, fixed

    def loss(self, forward, static: dict, fixed: dict) -> torch.Tensor:
        kwargs = dict(fixed, keep=static["keep"]) if "keep" in static else fixed
        losses = self.objective.training_losses(forward, static["x0"], static["level"], kwargs,
                                                mask=static.get("loss_mask"))
        return losses["loss"].mean()


FAMILY_STEPS = {"pixart": PixArtStep, "microdit": MicroDiTStep}


def family_step(config, resolution: int, mask_ratio: float | None = None) -> FamilyStep:
    """The step of ``config``'s family; ValueError for a family not measured here or a mask ratio
    it cannot take."""
    name = engine_family.of_config(config).name
    if name not in FAMILY_STEPS:
        raise ValueError(f"this benchmark measures the {' and '.join(FAMILY_STEPS)} families, not {name!r}")
    return FAMILY_STEPS[name](config, resolution, mask_ratio)


def check_variant(step: FamilyStep, variant: Variant) -> None:
    """ValueError when the family has no model of the variant's kind (diffusers for MicroDiT)."""
    if variant.model not in step.models:
        rows = ", ".join(v.name for v in VARIANTS.values() if v.model in step.models)
        raise ValueError(f"variant {variant.name}: there is no {variant.model} {step.title} model "
                         f"({step.title} rows: {rows})")


def default_variants(preset_name: str, listed: str) -> list[str]:
    """The comma-separated ``listed`` variants that exist for the preset's family."""
    try:
        step_class = FAMILY_STEPS.get(engine_family.of_preset(preset_name).name)
    except ValueError:
        step_class = None
    if step_class is None:  # a preset this benchmark cannot measure: measurement_plan says so
        return listed.split(",")
    return [v for v in listed.split(",") if VARIANTS[v].model in step_class.models]


def flops_per_image(config, resolution: int, mask_ratio: float | None = None) -> float:
    """Training FLOPs per image from the engine model itself (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_model(config)
    return family_step(config, resolution, mask_ratio).flops(model)


def _build(variant: Variant, config, device: torch.device) -> nn.Module:
    with torch.device(device):  # initialise on the device: no host copy of the fp32 weights
        model = build_model(config) if variant.model == "engine" else DiffusersPixArt(config)
    return model.to(device).train()


OPTIMIZER_CHOICES = ("auto", "torch")
_HYPER = dict(lr=2e-5, weight_decay=0.03, eps=1e-10)


def make_optimizer(name: str, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """``name`` "engine": engine.optim.AdamW with bf16 copies (the step's autocast dtype) attached to
    the model's Linears; "torch": torch's AdamW, fused on CUDA. Same hyperparameters."""
    if name == "engine":
        optimizer = AdamW(model.parameters(), **_HYPER)
        optimizer.attach_copies(model, torch.bfloat16)
        return optimizer
    return torch.optim.AdamW(model.parameters(), fused=device.type == "cuda", **_HYPER)


def optimizer_name(variant: Variant, choice: str) -> str:
    """The optimizer a row runs: its own with --optimizer auto, torch's with --optimizer torch."""
    return variant.optimizer if choice == "auto" else choice


def make_train_step(variant: Variant, config, resolution: int, batch: int, device: torch.device,
                    optimizer: str = "auto", mask_ratio: float | None = None):
    """(train_step, losses): one training step of a freshly built ``variant`` on the fixed synthetic
    batch of the config's family (FamilyStep; ``mask_ratio`` for MicroDiT), under bf16 autocast,
    with the variant's AdamW unless ``optimizer`` is "torch"; and the list each step's loss is
    appended to.

    Call inside ``engine_backend(variant.backend)``: the ops read ENGINE_BACKEND at call time.
    """
    step = family_step(config, resolution, mask_ratio)
    check_variant(step, variant)
    model = _build(variant, config, device)
    static, fixed = step.inputs(model, batch, device)
    forward = torch.compile(model) if variant.compiled else model
    optimizer = make_optimizer(optimizer_name(variant, optimizer), model, device)
    losses = []

    def forward_backward(inputs: dict) -> dict:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step.loss(forward, inputs, fixed)
        loss.backward()
        return {"loss": loss.detach()}

    if variant.graphed:
        if device.type != "cuda":
            raise ValueError(f"variant {variant.name} needs a CUDA device (CUDA graphs)")
        graph = StepGraph(device, model.parameters())

        def train_step():
            losses.append(graph.run(forward_backward, static)["loss"].clone())
            optimizer.step()  # the graph releases nothing: gradients stay where it writes them
        return train_step, losses

    def train_step():
        losses.append(forward_backward(static)["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step, losses


def measure_variant(variant: Variant, config, resolution: int, batch: int, device: torch.device,
                    steps: int, warmup: int, optimizer: str = "auto", mask_ratio: float | None = None) -> dict:
    """Time training steps of one freshly built variant; raises on any failure."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.utils.counters.clear()
    with engine_backend(variant.backend), single_cpu_thread(device):
        train_step, losses = make_train_step(variant, config, resolution, batch, device, optimizer, mask_ratio)
        start = time.perf_counter()
        train_step()  # compiles, for the compile variants
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_step_s = time.perf_counter() - start
        for _ in range(warmup):
            train_step()
        counter = hardware.open_energy_counter(device)
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start_mj, start = counter.read_mj(), time.perf_counter()
            step_s = hardware.median_seconds(train_step, device, repeats=steps)  # synchronises at its end
            end_mj, window_s = counter.read_mj(), time.perf_counter() - start
        finally:
            counter.close()
        if not torch.isfinite(torch.stack(losses)).all():
            raise FloatingPointError(f"non-finite training loss: {[round(x, 4) for x in torch.stack(losses).tolist()]}")
    return dict(
        step_ms=step_s * 1e3,
        img_per_s=batch / step_s,
        first_step_s=first_step_s,
        peak_mem_gib=torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        graph_breaks=sum(torch._dynamo.utils.counters["graph_break"].values()) if variant.compiled else None,
        **energy_fields(start_mj, end_mj, steps, batch, window_s, counter.reason),
    )


ENERGY_FIELDS = ("energy_j_per_step", "energy_kwh_per_image", "avg_power_w", "energy_window_s", "energy_note")


def energy_fields(start_mj: int | None, end_mj: int | None, steps: int, batch: int, window_s: float,
                  reason: str | None) -> dict:
    """A row's energy from the counter read before and after its ``steps`` timed steps of ``batch``
    images: joules per step, kWh per image, the mean board power over the window. Where there is no
    reading, every figure is None and ``energy_note`` says why."""
    fields = dict.fromkeys(ENERGY_FIELDS)
    fields["energy_window_s"] = window_s
    if start_mj is None or end_mj is None:
        fields["energy_note"] = reason or "no energy reading"
        return fields
    joules = (end_mj - start_mj) / 1e3
    if joules <= 0:  # a counter that did not move (too short a window for its update rate) or wrapped
        fields["energy_note"] = (f"the energy counter moved by {joules:g} J over {steps} steps ({window_s:.3f} s): "
                                 "time more steps")
        return fields
    fields.update(energy_j_per_step=joules / steps, energy_kwh_per_image=joules / steps / batch / JOULES_PER_KWH,
                  avg_power_w=joules / window_s if window_s > 0 else None)
    return fields


def describe_error(exc: BaseException) -> str:
    """One line for the table: the exception type and the first line of its message."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}"[:300]


def _release_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # drops compiled graphs, which hold their own buffers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_or_error(name: str, preset_name: str, resolution: int, batch: int, device: torch.device, steps: int,
                     warmup: int, optimizer: str = "auto", mask_ratio: float | None = None) -> dict:
    """measure_variant's figures, or {"error": ...}: one variant failing (OOM, compile error) must not end the run."""
    try:
        measured = measure_variant(VARIANTS[name], preset(preset_name, resolution), resolution, batch, device,
                                   steps, warmup, optimizer, mask_ratio)
    except Exception as exc:
        measured = dict(error=describe_error(exc))
    try:
        _release_memory(device)
    except Exception as exc:  # an asynchronous CUDA error (a faulting kernel) can first surface here
        measured = dict(error=measured.get("error") or describe_error(exc))
    return measured


def run_isolated(fn, *args, **kwargs) -> dict:
    """fn(*args, **kwargs) in a fresh (spawned) process.

    On the GPU each variant runs this way: a kernel that faults (an illegal memory access
    poisons the CUDA context for the rest of the process) or crashes the interpreter then
    ends only its own row, and the process exit hands all its memory back before the next
    variant is built.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(fn, *args, **kwargs).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            return dict(error=f"worker process died: {exc}")


def add_rates(row: dict, flops: float, peaks: dict) -> None:
    """tflops and MFU from img/s; speed-ups are filled in once every variant of a resolution ran."""
    row["flops_per_sample"] = flops
    rate = row.get("img_per_s")
    tflops = rate * flops / 1e12 if rate is not None else None
    row["tflops"] = tflops
    row["mfu"] = {
        kind: (tflops / peak if tflops is not None and peak else None)
        for kind, peak in (("measured", peaks["measured"]), ("datasheet", peaks["datasheet"]))
    }


def add_speedups(rows: list[dict]) -> None:
    """Speed-up of each row over the eager and diffusers rows of the same resolution (None where missing)."""
    for row in rows:
        for baseline in ("eager", "diffusers"):
            ref = next((r for r in rows if r["variant"] == baseline and r["resolution"] == row["resolution"]), None)
            ok = row.get("img_per_s") is not None and ref is not None and ref.get("img_per_s")
            row[f"speedup_vs_{baseline}"] = row["img_per_s"] / ref["img_per_s"] if ok else None


def stage_shape(stage: dict):
    """The key of the shape a schedule stage is measured at: its resolution, or (resolution, mask
    ratio) for a stage that names a mask ratio (MicroDiT's; PixArt-α's stages name none)."""
    return stage["resolution"] if stage.get("mask_ratio") is None else (stage["resolution"], float(stage["mask_ratio"]))


@dataclasses.dataclass(frozen=True)
class CostBasis:
    """What a kWh emits and what a GPU-hour costs: the user's figures (defaults with their sources above)."""

    grid_gco2_per_kwh: float = GRID_GCO2_PER_KWH
    usd_per_gpu_hour: float = USD_PER_GPU_HOUR


def published_cost(schedule: dict) -> dict | None:
    """The paper's own cost of the schedule (the file's ``published_cost``) with the price per GPU-hour
    it implies where the paper states none, and the dense bf16 peak of the paper's GPU."""
    published = schedule.get("published_cost")
    if not published:
        return None
    rate = published.get("usd_per_gpu_hour")
    implied = rate is None and published.get("usd") is not None
    if implied:
        rate = published["usd"] / (published["gpu_days"] * 24)
    return dict(gpu=published["gpu"], gpu_days=published["gpu_days"], usd=published.get("usd"),
                usd_per_gpu_hour=rate, usd_per_gpu_hour_implied=implied,
                gpu_peak_tflops=hardware.datasheet_peak_tflops(published["gpu"]),
                summary=published.get("summary"))


def _total(values):
    return sum(values) if all(v is not None for v in values) else None


def project_schedule(schedule: dict, img_per_s: dict, datasheet_peak: float | None,
                     kwh_per_image: dict | None = None, basis: CostBasis | None = None) -> dict:
    """The schedule's cost on this GPU from the measured rate (and energy) of each stage's shape.

    ``img_per_s`` and ``kwh_per_image`` are keyed by ``stage_shape``. Per stage: images = steps x
    global batch, GPU-days = images / (img/s) / 86400, kWh = images x kWh per image. In total also
    GPU-hours, A100-equivalent GPU-days (x this GPU's datasheet peak / 312, docs/design.md §10), the
    same scaled to the published GPU's peak instead (``published_gpu_equivalent_gpu_days``), kg CO2e =
    kWh x g/kWh / 1000, dollars = GPU-hours x $/GPU-hour, and the published-GPU-equivalent hours at the
    paper's own $/GPU-hour (``usd_at_published_rate``). A figure that cannot be had (a shape not
    measured or failed, no energy reading, no datasheet peak) is None, and so is every total it is in.
    """
    kwh_per_image = kwh_per_image or {}
    basis = basis or CostBasis()
    stages = []
    for stage in schedule["stages"]:
        key = stage_shape(stage)
        rate, energy = img_per_s.get(key), kwh_per_image.get(key)
        images = stage["steps"] * stage["global_batch"]
        stages.append(dict(name=stage["name"], resolution=stage["resolution"], mask_ratio=stage.get("mask_ratio"),
                           images=images, img_per_s=rate, gpu_days=images / rate / SECONDS_PER_DAY if rate else None,
                           kwh_per_image=energy, kwh=images * energy if energy is not None else None))
    days = _total([s["gpu_days"] for s in stages])
    kwh = _total([s["kwh"] for s in stages])
    a100 = days * datasheet_peak / hardware.A100_DENSE_BF16_TFLOPS if days is not None and datasheet_peak else None
    published = published_cost(schedule)
    equivalent = usd_published_rate = None
    if published and published["gpu_peak_tflops"] and days is not None and datasheet_peak:
        equivalent = days * datasheet_peak / published["gpu_peak_tflops"]
        if published["usd_per_gpu_hour"] is not None:
            usd_published_rate = equivalent * 24 * published["usd_per_gpu_hour"]
    return dict(stages=stages, gpu_days=days, gpu_hours=days * 24 if days is not None else None,
                a100_equivalent_gpu_days=a100, published_gpu_equivalent_gpu_days=equivalent,
                kwh=kwh, kg_co2e=kwh * basis.grid_gco2_per_kwh / 1e3 if kwh is not None else None,
                usd=days * 24 * basis.usd_per_gpu_hour if days is not None else None,
                usd_at_published_rate=usd_published_rate)


def _parse_batches(text: str, count: int) -> list[int]:
    try:
        batches = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--schedule-batches must be comma-separated integers, got {text!r}") from None
    if len(batches) != count or min(batches) < 1:
        raise SystemExit(f"--schedule-batches needs {count} positive batch sizes (one per shape of the schedule, "
                         f"in the order they first appear), got {text!r}")
    return batches


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--preset", default=None, help="model preset (default: pixart-xl2 on GPU, tiny on CPU)")
    p.add_argument("--res", type=int, default=None, help="image side in pixels (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 64 on GPU, 4 on CPU)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {','.join(VARIANTS)} "
                        "(default: all on GPU; eager,engine,diffusers on CPU; no diffusers for MicroDiT)")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="MicroDiT presets: share of patch tokens dropped after the patch-mixer, the loss on the "
                        "kept ones (stage 1: 0.75; default 0)")
    p.add_argument("--optimizer", choices=OPTIMIZER_CHOICES, default="auto",
                   help="auto: each row's own AdamW (engine.optim.AdamW on engine and engine+graph, torch's fused "
                        "elsewhere); torch: torch's fused AdamW on every row (an A/B of the optimizer)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default: 10 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after the first (compiling) step (default: 3 GPU, 1 CPU)")
    p.add_argument("--schedule", action="store_true",
                   help="measure each shape of the preset family's training schedule once and project the whole "
                        "schedule: GPU-days, A100-equivalent GPU-days, kWh, kg CO2e and dollars (docs/cost.md)")
    p.add_argument("--schedule-batches", default=None,
                   help="per-GPU batch for each shape of the schedule, in the order the shapes first appear in it "
                        "(default on GPU: PixArt-α 64,32,8 for 256,512,1024 px; MicroDiT 256,64,64,16 for 256 px "
                        "masked, 256 unmasked, 512 masked, 512 unmasked; on CPU 4,2,1 and 2,2,1,1)")
    p.add_argument("--schedule-file", type=Path, default=None,
                   help="stages (resolution, steps, global_batch, micro_conditions, mask_ratio) to project "
                        f"(default: by the preset's family, {SCHEDULE_PATH.name} or {MICRODIT_SCHEDULE_PATH.name})")
    p.add_argument("--grid-gco2-per-kwh", type=float, default=GRID_GCO2_PER_KWH,
                   help=f"grid carbon intensity for the schedule's CO2e, g per kWh (default {GRID_GCO2_PER_KWH:g}: "
                        f"{GRID_SOURCE})")
    p.add_argument("--usd-per-gpu-hour", type=float, default=USD_PER_GPU_HOUR,
                   help=f"price of one hour of this GPU for the schedule's dollars (default {USD_PER_GPU_HOUR:g}: "
                        f"{PRICE_SOURCE}); the paper's own price is applied too, to its GPU's equivalent hours")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each variant in its own process (default: on GPU yes, on CPU no)")
    p.add_argument("--git-commit", default=None,
                   help="commit to record when the tree is not a git checkout (e.g. a copy on a GPU machine)")
    p.add_argument("--resume", type=Path, default=None,
                   help="reuse the error-free rows of an earlier --json result of the same GPU and settings and "
                        "measure only the others (a missing file is fine): for a run split by a time limit, repeat "
                        "the same command with --resume X --json X until it completes")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--csv", type=Path, default=None, help="write one CSV row per measurement here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    defaults = GPU_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS
    for name in ("preset", "batch", "steps", "warmup"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    try:
        owner = engine_family.of_preset(args.preset).name
    except ValueError:
        owner = None  # an unknown preset: measurement_plan says so
    if args.schedule_batches is None:
        args.schedule_batches = SCHEDULE_BATCHES.get(owner, SCHEDULE_BATCHES["pixart"])[args.device.type != "cuda"]
    if args.schedule_file is None:
        args.schedule_file = SCHEDULE_FILES.get(owner, SCHEDULE_PATH)
    if args.grid_gco2_per_kwh < 0 or args.usd_per_gpu_hour < 0:
        raise SystemExit(f"--grid-gco2-per-kwh and --usd-per-gpu-hour must be >= 0, got {args.grid_gco2_per_kwh} "
                         f"and {args.usd_per_gpu_hour}")
    if args.variants is None:
        args.variants = ",".join(default_variants(args.preset, defaults["variants"]))
    args.matmul_n, args.copy_bytes = defaults["matmul_n"], defaults["copy_bytes"]
    if args.isolate is None:
        args.isolate = args.device.type == "cuda"
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        raise SystemExit(f"--variants: unknown {unknown or 'empty list'}; choose from {','.join(VARIANTS)}")
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    return args


def measurement_plan(args, schedule: dict | None) -> list[tuple[str, int, int, float | None]]:
    """(preset, resolution, batch, mask ratio) to measure, in order: --res, or each distinct shape of
    the schedule in the order it first appears. The mask ratio is the family step's: --mask-ratio, or
    the stage's ``mask_ratio``, for MicroDiT (0 when not given); None for PixArt, which drops no tokens.

    A schedule stage with micro_conditions is measured with the "-ms" twin of --preset. A schedule file
    that names its ``family`` is measured only with a preset of that family.
    """
    if schedule is None:
        try:
            resolution = args.res if args.res is not None else preset(args.preset).input_size * 8
            step = family_step(preset(args.preset, resolution), resolution, args.mask_ratio)
        except ValueError as exc:
            raise SystemExit(f"--preset {args.preset!r} --res {args.res}: {exc}") from None
        return [(args.preset, resolution, args.batch, step.mask_ratio)]
    try:
        owner = engine_family.of_preset(args.preset).name
    except ValueError as exc:
        raise SystemExit(f"--preset {args.preset!r}: {exc}") from None
    if owner not in FAMILY_STEPS:
        raise SystemExit(f"--schedule --preset {args.preset!r}: this benchmark measures the "
                         f"{' and '.join(FAMILY_STEPS)} families, not {owner!r}")
    if schedule.get("family", owner) != owner:
        raise SystemExit(f"--schedule --preset {args.preset!r}: {args.schedule_file.name} is the {schedule['family']} "
                         f"schedule and the preset a {owner} model (--schedule-file picks another)")
    if args.mask_ratio:
        raise SystemExit(f"--mask-ratio {args.mask_ratio}: with --schedule each stage's mask_ratio is measured")
    shapes = []  # (resolution, micro_conditions, mask ratio), first appearance first
    for stage in schedule["stages"]:
        shape = (stage["resolution"], bool(stage.get("micro_conditions")), stage.get("mask_ratio"))
        if shape not in shapes:
            shapes.append(shape)
    micro = {res: m for res, m, _ in shapes}
    if any(micro[res] != m for res, m, _ in shapes):
        raise SystemExit(f"{args.schedule_file}: a resolution appears with and without micro_conditions")
    batches = _parse_batches(args.schedule_batches, len(shapes))
    plan = []
    for (resolution, micro_conditions, mask_ratio), batch in zip(shapes, batches):
        name = args.preset + "-ms" if micro_conditions else args.preset
        try:
            step = family_step(preset(name, resolution), resolution, mask_ratio)
        except ValueError as exc:
            raise SystemExit(f"--schedule cannot measure {resolution} px"
                             f"{'' if mask_ratio is None else f' mask {mask_ratio:g}'} with preset {name!r}: "
                             f"{exc}") from None
        plan.append((name, resolution, batch, step.mask_ratio))
    return plan


def load_schedule(args) -> dict | None:
    """The --schedule-file's stages (None without --schedule); a missing or malformed file is a clear error."""
    if not args.schedule:
        return None
    try:
        schedule = json.loads(args.schedule_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"--schedule-file {args.schedule_file}: {exc}") from None
    for i, stage in enumerate(schedule.get("stages", [])):
        missing = [k for k in ("name", "resolution", "steps", "global_batch") if k not in stage]
        if missing:
            raise SystemExit(f"--schedule-file {args.schedule_file}: stage {i} has no {', '.join(missing)}")
    if not schedule.get("stages"):
        raise SystemExit(f"--schedule-file {args.schedule_file}: no stages")
    return schedule


def earlier_rows(args, gpu_name: str | None) -> dict[tuple, dict]:
    """The measured fields of --resume's error-free rows, keyed by (preset, resolution, batch, mask
    ratio, variant)."""
    if args.resume is None or not args.resume.exists():
        return {}
    earlier = json.loads(args.resume.read_text())
    if earlier["hardware"]["gpu_name"] != gpu_name:
        raise SystemExit(f"--resume {args.resume} was measured on {earlier['hardware']['gpu_name']!r}, "
                         f"this run is on {gpu_name!r}")
    settings = {k: earlier["settings"].get(k, "auto") for k in ("steps", "warmup", "optimizer")}
    if settings != dict(steps=args.steps, warmup=args.warmup, optimizer=args.optimizer):
        raise SystemExit(f"--resume {args.resume} was measured with {settings}; this run has steps={args.steps}, "
                         f"warmup={args.warmup}, optimizer={args.optimizer}")
    measured_fields = ("img_per_s", "step_ms", "first_step_s", "peak_mem_gib", "graph_breaks", "measured_at",
                       *ENERGY_FIELDS)
    return {(r["preset"], r["resolution"], r["batch"], r.get("mask_ratio"), r["variant"]):
            {k: r.get(k) for k in measured_fields} for r in earlier["rows"] if r["error"] is None}


def measure_hardware(args) -> dict:
    device = args.device
    matmul = hardware.measure_matmul_tflops(device, n=args.matmul_n)
    copy = hardware.measure_copy_bandwidth(device, nbytes=args.copy_bytes)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the copy buffers (2 GiB) go back before the variants are built
    counter = hardware.open_energy_counter(device)  # the GPU as NVML sees it: name, power limit, driver
    counter.close()
    return dict(device=str(device), gpu_name=gpu_name, matmul_n=args.matmul_n, matmul_dtype="bfloat16",
                matmul_tflops_measured=matmul, copy_bytes=args.copy_bytes, copy_bytes_per_s=copy,
                datasheet_peak_tflops=hardware.datasheet_peak_tflops(gpu_name), energy_counter=counter.info)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_speedup(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


# (header, width: negative = left-aligned, cell text of a row)
_TABLE_COLUMNS = (
    ("preset", -14, lambda r: r["preset"]),
    ("res", 5, lambda r: str(r["resolution"])),
    ("batch", 5, lambda r: str(r["batch"])),
    ("mask", 4, lambda r: _fmt(r.get("mask_ratio"), ".2f")),
    ("variant", -18, lambda r: r["variant"]),
    ("img/s", 9, lambda r: _fmt(r["img_per_s"], ".2f")),
    ("vs eager", 8, lambda r: _fmt_speedup(r["speedup_vs_eager"])),
    ("vs diff", 8, lambda r: _fmt_speedup(r["speedup_vs_diffusers"])),
    ("TFLOP/s", 8, lambda r: _fmt(r["tflops"], ".1f")),
    ("MFU meas", 8, lambda r: _fmt(r["mfu"]["measured"], ".1%")),
    ("MFU sheet", 9, lambda r: _fmt(r["mfu"]["datasheet"], ".1%")),
    ("peak GiB", 8, lambda r: _fmt(r["peak_mem_gib"], ".1f")),
    ("J/img", 7, lambda r: _fmt(r.get("energy_j_per_step") and r["energy_j_per_step"] / r["batch"], ".2f")),
    ("W", 5, lambda r: _fmt(r.get("avg_power_w"), ".0f")),
    ("1st step s", 10, lambda r: _fmt(r["first_step_s"], ".1f")),
    ("error", -1, lambda r: r["error"] or ""),
)


def format_table(rows: list[dict]) -> str:
    def line(cells):
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, _TABLE_COLUMNS)).rstrip()

    header = line([name for name, _, _ in _TABLE_COLUMNS])
    lines = [header, "-" * len(header), *(line([cell(r) for _, _, cell in _TABLE_COLUMNS]) for r in rows)]
    notes = sorted({r["energy_note"] for r in rows if r.get("energy_note") and not r["error"]})
    lines += [f"J/img, W: no energy reading: {note}" for note in notes]
    return "\n".join(lines)


def _money(value) -> str:
    return "-" if value is None else f"${value:,.0f}"


def format_schedule(schedule: dict) -> str:
    published = schedule.get("published")
    lines = [f"{schedule['name']} projected to this GPU ({schedule['source']}):"]
    if published:
        rate = published["usd_per_gpu_hour"]
        lines.append("  published: " + (published.get("summary") or f"{published['gpu_days']:g} {published['gpu']} "
                                                                      f"GPU-days, {_money(published['usd'])}")
                     + (f"; {published['gpu_days']:g} {published['gpu']} GPU-days" if published.get("summary") else "")
                     + (f", implied price ${rate:.2f} per {published['gpu']}-hour"
                        if published["usd_per_gpu_hour_implied"] else ""))
    lines.append("  GPU-days = sum over stages of steps x global batch / (img/s per GPU) / 86400; kWh = sum of "
                 "images x kWh per image")
    other = published["gpu"] if published and published["gpu"] != "A100" else None
    columns = [("GPU-days", "gpu_days", ".2f", 9), ("A100-eq", "a100_equivalent_gpu_days", ".2f", 9),
               *([(other + "-eq", "published_gpu_equivalent_gpu_days", ".2f", 9)] if other else []),
               ("kWh", "kwh", ",.0f", 10), ("kg CO2e", "kg_co2e", ",.0f", 10), ("dollars", "usd", None, 11),
               *([("$ at paper rate", "usd_at_published_rate", None, 15)] if published else [])]
    lines.append(f"  {'variant':<18}" + "".join(f" {title:>{width}}" for title, _, _, width in columns))
    for variant, projection in schedule["variants"].items():
        cells = [_money(projection[key]) if spec is None else _fmt(projection[key], spec) for _, key, spec, _ in columns]
        lines.append(f"  {variant:<18}" + "".join(f" {cell:>{width}}" for cell, (_, _, _, width) in zip(cells, columns)))
        per_stage = ", ".join(f"{s['name'].split()[0]}: {_fmt(s['gpu_days'], '.2f')}" for s in projection["stages"])
        lines.append(f"  {'':<18} GPU-days by stage: {per_stage}")
    basis = schedule["cost_basis"]
    lines += [f"  {A100_NOTE}.",
              *([f"  {other}-eq: the same scaling to the {other}'s datasheet peak, the GPU the paper's figure is in; "
                 "$ at paper rate: those GPU-hours at the paper's price."] if other else
                ["  $ at paper rate: the A100-equivalent GPU-hours at the paper's price."] if published else []),
              f"  dollars: GPU-hours on this GPU x ${basis['usd_per_gpu_hour']:g} per GPU-hour "
              f"({'default: ' + PRICE_SOURCE if basis['usd_per_gpu_hour_is_default'] else 'given'})",
              f"  kg CO2e: kWh x {basis['grid_gco2_per_kwh']:g} g/kWh "
              f"({'default: ' + GRID_SOURCE if basis['grid_gco2_per_kwh_is_default'] else 'given'})",
              f"  kWh: {ENERGY_SCOPE}",
              *(f"  kWh not measured: {note}" for note in schedule["energy_notes"]),
              *(f"  stage {note}" for note in schedule["stage_notes"])]
    return "\n".join(lines)


def schedule_result(rows: list[dict], variants: list[str], schedule: dict, schedule_path: Path,
                    datasheet_peak: float | None, basis: CostBasis | None = None) -> dict:
    basis = basis or CostBasis()
    projections, notes = {}, []
    for variant in variants:
        rates, energy = {}, {}
        for stage in schedule["stages"]:
            row = next((r for r in rows if r["variant"] == variant and r["resolution"] == stage["resolution"]
                        and (r.get("mask_ratio") or 0.0) == (stage.get("mask_ratio") or 0.0)), None)
            if row is not None:
                rates[stage_shape(stage)] = row.get("img_per_s")
                energy[stage_shape(stage)] = row.get("energy_kwh_per_image")
                if row.get("energy_note") and not row.get("error") and row["energy_note"] not in notes:
                    notes.append(row["energy_note"])
        projections[variant] = project_schedule(schedule, rates, datasheet_peak, energy, basis)
    return dict(
        source=str(schedule_path.name),
        name=schedule.get("name", "schedule"),
        paper=schedule.get("paper"),
        published=published_cost(schedule),
        published_a100_gpu_days={k: v for k, v in schedule.get("published_a100_gpu_days", {}).items()
                                 if k != "sources"},
        a100_equivalent_note=A100_NOTE,
        cost_basis=dict(grid_gco2_per_kwh=basis.grid_gco2_per_kwh,
                        grid_gco2_per_kwh_is_default=basis.grid_gco2_per_kwh == GRID_GCO2_PER_KWH,
                        grid_source=GRID_SOURCE if basis.grid_gco2_per_kwh == GRID_GCO2_PER_KWH else "given by the user",
                        usd_per_gpu_hour=basis.usd_per_gpu_hour,
                        usd_per_gpu_hour_is_default=basis.usd_per_gpu_hour == USD_PER_GPU_HOUR,
                        price_source=PRICE_SOURCE if basis.usd_per_gpu_hour == USD_PER_GPU_HOUR else "given by the user",
                        energy_scope=ENERGY_SCOPE),
        energy_notes=notes,
        stage_notes=[f"{s['name']}: {s['measured_with']}" for s in schedule["stages"] if "measured_with" in s],
        variants=projections,
    )


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)  # a reader never sees half a file, even if the run is killed mid-write


_CSV_ENV_FIELDS = ("gpu_name", "torch", "triton", "diffusers", "cuda", "date", "git_commit", "command")
_CSV_ROW_FIELDS = ("preset", "resolution", "batch", "mask_ratio", "variant", "img_per_s", "step_ms", "speedup_vs_eager",
                   "speedup_vs_diffusers", "flops_per_sample", "tflops", "mfu_measured", "mfu_datasheet",
                   "peak_mem_gib", "first_step_s", "graph_breaks", "error", "measured_at", *ENERGY_FIELDS)


def write_csv(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*_CSV_ROW_FIELDS, "matmul_tflops_measured", "copy_bytes_per_s",
                                               "datasheet_peak_tflops", *_CSV_ENV_FIELDS])
        writer.writeheader()
        for row in result["rows"]:
            flat = {k: row.get(k) for k in _CSV_ROW_FIELDS if not k.startswith("mfu_")}
            flat.update(mfu_measured=row["mfu"]["measured"], mfu_datasheet=row["mfu"]["datasheet"])
            flat.update({k: result["hardware"][k] for k in ("matmul_tflops_measured", "copy_bytes_per_s",
                                                           "datasheet_peak_tflops")})
            flat.update({k: result["environment"][k] for k in _CSV_ENV_FIELDS})
            writer.writerow(flat)
    tmp.replace(path)


def _bar_labels(ax, bars, labels) -> None:
    for bar, label in zip(bars, labels):
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)


def _cost_panels(axes, result: dict) -> None:
    """The schedule's projected GPU-days, dollars and energy beside the paper's published figures."""
    schedule = result["schedule"]
    published = schedule["published"]
    device = result["hardware"]["gpu_name"] or "CPU"
    paper_gpu = published["gpu"] if published else "A100"
    days_ax, usd_ax, energy_ax = axes
    names, days, colors = [], [], []
    usd_names, usd, usd_colors = [], [], []
    if published:
        names.append(f"paper: {paper_gpu}"); days.append(published["gpu_days"]); colors.append("tab:gray")
        if published["usd"] is not None:
            usd_names.append("paper"); usd.append(published["usd"]); usd_colors.append("tab:gray")
    for variant, projection in schedule["variants"].items():
        equivalent = (projection["published_gpu_equivalent_gpu_days"] if published
                      else projection["a100_equivalent_gpu_days"])
        names += [f"{variant}: this GPU", f"{variant}: {paper_gpu}-eq"]
        days += [projection["gpu_days"], equivalent]
        colors += ["tab:blue", "tab:orange"]
        usd_names += [f"{variant}: ${schedule['cost_basis']['usd_per_gpu_hour']:g}/h"]
        usd += [projection["usd"]]
        usd_colors += ["tab:blue"]
        if published:
            usd_names.append(f"{variant}: paper rate"); usd.append(projection["usd_at_published_rate"])
            usd_colors.append("tab:orange")
    for ax, labels, values, cols, title, fmt in (
            (days_ax, names, days, colors, f"{schedule['name']}: GPU-days", "{:,.1f}"),
            (usd_ax, usd_names, usd, usd_colors, "dollars", "${:,.0f}")):
        heights = [v or 0.0 for v in values]
        bars = ax.bar(range(len(values)), heights, color=cols)
        _bar_labels(ax, bars, ["n/a" if v is None else fmt.format(v) for v in values])
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        positive = [v for v in values if v]
        if positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")
        ax.margins(y=0.15)
    energy_ax.set_title(f"energy on {device} (GPU board, NVML)", fontsize=9)
    variants = list(schedule["variants"])
    kwh = [schedule["variants"][v]["kwh"] for v in variants]
    bars = energy_ax.bar(range(len(variants)), [k or 0.0 for k in kwh], color="tab:green")
    co2 = [schedule["variants"][v]["kg_co2e"] for v in variants]
    _bar_labels(energy_ax, bars, ["n/a" if k is None else f"{k:,.0f} kWh\n{c:,.0f} kg CO2e" for k, c in zip(kwh, co2)])
    energy_ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=7)
    energy_ax.set_ylabel("kWh for the schedule", fontsize=8)
    energy_ax.margins(y=0.2)
    if schedule["energy_notes"]:
        energy_ax.text(0.5, 0.7, "not measured:\n" + "\n".join(schedule["energy_notes"])[:200], ha="center",
                       va="center", wrap=True, fontsize=7, transform=energy_ax.transAxes)


def write_plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["resolution"], r.get("mask_ratio")) for r in result["rows"]))
    cost = result.get("schedule") is not None
    columns = max(len(shapes), 3 if cost else 1)
    fig, axes = plt.subplots(2 if cost else 1, columns, figsize=(5 * columns, 8.5 if cost else 4), squeeze=False)
    for ax, (res, mask) in zip(axes[0], shapes):
        rows = [r for r in result["rows"] if (r["resolution"], r.get("mask_ratio")) == (res, mask)]
        rates = [r["img_per_s"] or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), rates, color=["tab:gray" if r["error"] else "tab:blue" for r in rows])
        _bar_labels(ax, bars, ["failed" if r["error"] else (f"{r['mfu']['measured']:.0%}"
                                                           if r["mfu"]["measured"] is not None else "") for r in rows])
        ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{rows[0]['preset']} {res}px, batch {rows[0]['batch']}" + (f", mask {mask:g}" if mask else ""),
                     fontsize=9)
        ax.set_ylabel("images/s (labels: MFU vs measured matmul)", fontsize=8)
    for ax in axes[0][len(shapes):]:
        ax.axis("off")
    if cost:
        _cost_panels(axes[1][:3], result)
        for ax in axes[1][3:]:
            ax.axis("off")
    env = result["environment"]
    device = env["gpu_name"] or "CPU (not representative)"
    fig.suptitle(f"Training throughput on {device}, torch {env['torch']}, {env['date'][:10]}, "
                 f"{(env['git_commit'] or 'no commit')[:12]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    command = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    result = dict(
        benchmark="training throughput",
        representative=device.type == "cuda",
        note=None if device.type == "cuda" else CPU_NOTE,
        environment=hardware.environment(command, git_commit=args.git_commit),
        hardware=None,
        settings=dict(steps=args.steps, warmup=args.warmup, optimizer=args.optimizer, variants=args.variants,
                      isolate=args.isolate,
                      timing="median step time by CUDA events (perf_counter on CPU), first step + warmup untimed",
                      flops="model.flops_per_sample of the engine model: PixArt (res, res, text_len), text_len = "
                            "padded length, used for the diffusers rows too; MicroDiT (res, res, mask_ratio), "
                            "routing not counted",
                      energy="NVML total energy counter read before and after the timed steps (synchronised): "
                             "joules per step, kWh per image; " + ENERGY_SCOPE),
        rows=[],
        schedule=None,
    )
    schedule = load_schedule(args)
    plan = measurement_plan(args, schedule)  # argument errors surface before anything is measured
    if device.type != "cuda":
        print(f"NOTE: {CPU_NOTE}.", flush=True)
    result["hardware"] = measure_hardware(args)
    hw = result["hardware"]
    print(f"device {hw['gpu_name'] or 'cpu'}: bf16 matmul {hw['matmul_n']}^3 {hw['matmul_tflops_measured']:.2f} "
          f"TFLOP/s measured, datasheet {_fmt(hw['datasheet_peak_tflops'], '.0f')} TFLOP/s; "
          f"copy {hw['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)", flush=True)
    peaks = dict(measured=hw["matmul_tflops_measured"], datasheet=hw["datasheet_peak_tflops"])

    def save():
        if args.json is not None:
            write_json(args.json, result)
        if args.csv is not None:
            write_csv(args.csv, result)

    earlier = earlier_rows(args, hw["gpu_name"])
    for preset_name, resolution, batch, mask_ratio in plan:
        flops = flops_per_image(preset(preset_name, resolution), resolution, mask_ratio)
        masked = f" mask {mask_ratio:g}" if mask_ratio is not None else ""
        options = {} if mask_ratio is None else dict(mask_ratio=mask_ratio)  # PixArt steps take none
        resolution_rows = []
        for name in args.variants:
            row = dict(preset=preset_name, resolution=resolution, batch=batch, mask_ratio=mask_ratio, variant=name,
                       backend=VARIANTS[name].backend,
                       optimizer=optimizer_name(VARIANTS[name], args.optimizer), img_per_s=None, step_ms=None, first_step_s=None,
                       peak_mem_gib=None, graph_breaks=None, **dict.fromkeys(ENERGY_FIELDS), error=None,
                       measured_at=result["environment"]["date"])
            if (preset_name, resolution, batch, mask_ratio, name) in earlier:
                row.update(earlier[preset_name, resolution, batch, mask_ratio, name])
            else:
                job = (name, preset_name, resolution, batch, device, args.steps, args.warmup, args.optimizer)
                row.update(run_isolated(measure_or_error, *job, **options) if args.isolate
                           else measure_or_error(*job, **options))
            add_rates(row, flops, peaks)
            resolution_rows.append(row)
            result["rows"].append(row)
            add_speedups(resolution_rows)
            print(f"  {preset_name} {resolution}px batch {batch}{masked} {name}: "
                  f"{_fmt(row['img_per_s'], '.2f')} img/s {row['error'] or ''}", flush=True)
            save()

    if schedule is not None:
        result["schedule"] = schedule_result(result["rows"], args.variants, schedule, args.schedule_file,
                                             hw["datasheet_peak_tflops"],
                                             CostBasis(args.grid_gco2_per_kwh, args.usd_per_gpu_hour))
    save()
    print()
    print(format_table(result["rows"]))
    print("MFU meas: against the bf16 matmul rate measured in this run; MFU sheet: against the datasheet dense peak; "
          "J/img and W: the GPU's energy per image and mean power over the timed steps (NVML).")
    if result["schedule"] is not None:
        print()
        print(format_schedule(result["schedule"]))
    if device.type != "cuda":
        print(f"\nNOTE: {CPU_NOTE}.")
    if args.plot is not None:
        write_plot(args.plot, result)
    return result


if __name__ == "__main__":
    main()
