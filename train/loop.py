"""The training loop: one optimizer step per global batch, with accumulation, EMA, skipping of
non-finite steps, logs, sample grids and checkpoints.

Randomness. Every micro-batch draws its condition dropout, noise level (timesteps or EDM σ) and noise,
in that order, from a generator seeded with (seed, step, global micro-batch index), where the
index is ``micro * world + rank``. The draws therefore depend only on the position in the run,
not on the number of ranks or on where the run was resumed: one process with accumulation 2 and
two processes without accumulation see the same noise for the same samples, and a resumed run
repeats the uninterrupted one exactly. Data order and latent sampling belong to the loader.

Checkpoints hold full (unsharded) state dicts keyed by parameter name, so a run can resume under
another parallel layout (DDP <-> FSDP2) as long as the number of ranks, which fixes the loader's
sharding, is the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from engine.family import Family
from engine.hardware import open_energy_counter
from engine.optim import AdamW, clip_coefficient
from train.checkpoint import debug_kill, load_training_state, load_weights, save_checkpoint
from train.config import OptimSection, RunConfig
from train.metrics import EnergyMeter, Interval, MetricsLog, interval_record

EXIT_NONFINITE = 3


@dataclass
class Progress:
    """Counters a checkpoint restores."""

    step: int = 0            # steps done (applied or skipped)
    skipped_total: int = 0
    nonfinite_run: int = 0   # skipped steps in a row, up to the last one
    gpu_seconds: float = 0.0  # wall time of the loop x ranks, over all segments of the run


def micro_seed(seed: int, step: int, index: int) -> int:
    """Seed of the generator for micro-batch ``index`` (global over ranks) of ``step``."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def lr_at(step: int, peak: float, warmup: int, schedule: str = "constant", end: int = 0, floor: float = 0.0,
          from_zero: bool = False) -> float:
    """The learning rate of step ``step`` (counted from 0): a pure function of the step, so a
    resumed run repeats the uninterrupted one.

    Warm-up, steps s < ``warmup``: peak (s + 1) / warmup, or peak s / warmup with ``from_zero``
    (the first step at lr 0). Then "constant": the peak; "cosine": with x = (s - warmup) /
    (end - warmup) clipped to [0, 1],

        peak (floor + (1 - floor) (1 + cos(pi x)) / 2)

    from the peak at the warm-up's end down to ``floor`` x peak at step ``end``, which no step
    of a run of ``end`` steps reaches (its last step is end - 1). With ``from_zero`` this is
    composer's CosineAnnealingWithWarmupScheduler (t_max = the run's duration, alpha_f =
    floor) at the batch count before the step, which MicroDiT's official stage 1 uses
    (train/configs/microdit.toml)."""
    if step < warmup:
        return peak * (step if from_zero else step + 1) / warmup
    if schedule == "constant":
        return peak
    x = min(1.0, (step - warmup) / (end - warmup)) if end > warmup else 1.0
    return peak * (floor + (1.0 - floor) * (1.0 + math.cos(math.pi * x)) / 2.0)


def step_lr(config: RunConfig, step: int) -> float:
    """lr_at with the run config's optim section and peak (RunConfig.lr)."""
    o = config.optim
    return lr_at(step, config.lr(), o.warmup_steps, o.schedule, o.decay_steps or config.train.steps, o.lr_floor,
                 o.warmup_from_zero)


def ema_decay_at(step: int, decay: float, start: int) -> float:
    """The EMA decay of step ``step`` (from 0): 0 (the EMA becomes a copy of the weights) while the
    step is one of the first ``start``, ``decay`` after. As composer's EMA with ema_start = start
    batches (MicroDiT's 512 px configs), which starts by copying the weights at the end of the
    batch that brings the count to ``start``; start = 0 averages from the first step, beginning
    at the initial weights."""
    return decay if step >= start else 0.0


def optimizer_name(optim: OptimSection, device: torch.device, parallel: str, compiled: bool) -> str:
    """optim.name with "auto" resolved (train.config.OptimSection)."""
    if optim.name != "auto":
        return optim.name
    return "engine" if device.type == "cuda" and parallel != "fsdp2" and not compiled else "adamw"


def build_optimizer(module: nn.Module, optim: OptimSection, lr: float, device: torch.device, name: str,
                    copy_dtype: torch.dtype | None = None):
    """The optimizer ``name`` (optimizer_name's choice); engine's gives the module's engine Linears
    copies of their parameters in ``copy_dtype`` (the step's autocast dtype; AdamW.attach_copies)."""
    params = [p for p in module.parameters() if p.requires_grad]
    kwargs = dict(lr=lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if name == "engine":
        optimizer = AdamW(params, **kwargs)
        if copy_dtype is not None:
            optimizer.attach_copies(module, copy_dtype)
        return optimizer
    if name == "apex":
        from apex.optimizers import FusedAdam  # importability is checked before the run starts
        return FusedAdam(params, adam_w_mode=True, **kwargs)
    # fused: one kernel for the whole update on CUDA; on the CPU the default (foreach) path
    return torch.optim.AdamW(params, fused=True if device.type == "cuda" else None, **kwargs)


class EMA:
    """fp32 exponential moving average of the parameters, shaped like them (sharded under FSDP2)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        named = list(module.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self._own = list(range(len(self.params)))  # the shadows update() moves

    def hand_over(self, moved: set[int]) -> None:
        """The shadows of the parameters with these ids are moved by the optimizer's step from now
        on (engine AdamW: train.loop._fused_updates); update() leaves them alone."""
        self._own = [i for i, p in enumerate(self.params) if id(p) not in moved]

    @torch.no_grad()
    def update(self) -> None:
        if self._own:
            torch._foreach_lerp_([self.shadow[i] for i in self._own],
                                 [self.params[i].detach().float() for i in self._own], 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Unsharded copies on the CPU (a collective under FSDP2: call on every rank)."""
        from torch.distributed.tensor import DTensor

        return {name: (s.full_tensor() if isinstance(s, DTensor) else s).detach().cpu().clone()
                for name, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        missing = [name for name in self.names if name not in state]
        if missing:
            raise ValueError(f"EMA state lacks {missing}")
        for name, s in zip(self.names, self.shadow):
            full = state[name].to(device=s.device, dtype=torch.float32)
            s.copy_(distribute_tensor(full, s.device_mesh, s.placements) if isinstance(s, DTensor) else full)


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield


def rng_state() -> dict:
    """Global RNG states as plain Python values (bytes, ints, lists): they travel through
    all_gather_object and load with torch.load(weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    cuda = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state().numpy().tobytes(), "cuda": cuda, "python": random.getstate(),
            "numpy": (kind, keys.tolist(), position, has_gauss, cached)}


def set_rng_state(state: dict) -> None:
    def as_tensor(data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    torch.set_rng_state(as_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_tensor(s) for s in state["cuda"]])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def _forever(loader):
    while True:
        yield from loader  # the loader moves to the next epoch by itself


@dataclass
class Trainer:
    """Everything the loop needs; built by train/run.py."""

    config: RunConfig
    model: nn.Module              # what the forward is called on: DDP / FSDP2 / plain
    module: nn.Module             # the model itself (same parameters)
    family: Family                # what the model is: conditioning, FLOPs (engine.family)
    optimizer: torch.optim.Optimizer
    ema: EMA
    objective: object             # engine.diffusion: GaussianDiffusion or EDM, one interface
    loader: object                # engine.data.Loader
    device: torch.device
    rank: int
    world: int
    out: Path
    run_info: dict
    autocast_dtype: torch.dtype | None = None
    sample_grid: Callable[[int, dict], None] | None = None  # (step, EMA state) -> writes a grid, rank 0
    cuda_graph: bool = False      # forward + backward replayed as a CUDA graph (engine.step_graph)
    cuda_graph_off: str = ""      # why not, when not
    recompute: str = "off"        # the recompute policy applied (engine.recompute)
    progress: Progress = dataclasses.field(default_factory=Progress)

    @property
    def accumulation(self) -> int:
        micro = self.loader.batch_size
        return self.config.train.global_batch // (micro * self.world)


def micro_batch_loss(family: Family, model: nn.Module, module: nn.Module, objective, train_config,
                     autocast_dtype: torch.dtype | None, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """A micro-batch's mean loss through ``model`` (``module`` unwrapped); draws, in order: the
    family's condition dropout, the noise level, the noise (the module docstring's randomness
    contract)."""
    x0 = batch["latent"]  # (B, C, h, w)
    device = x0.device
    kwargs = family.training_conditions(module, batch, generator, train_config)
    mask = kwargs.pop("loss_mask", None)
    level = objective.sample_noise_level(x0.shape[0], generator, device)  # (B,): t or σ
    noise = torch.randn(x0.shape, generator=generator, device=device)  # (B, C, h, w)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        losses = objective.training_losses(model, x0, level, kwargs, noise=noise, mask=mask)
    return losses["loss"].mean()


def _micro_batch_loss(tr: Trainer, batch: dict, generator: torch.Generator) -> torch.Tensor:
    return micro_batch_loss(tr.family, tr.model, tr.module, tr.objective, tr.config.train, tr.autocast_dtype,
                            batch, generator)


def save(tr: Trainer) -> Path | None:
    """Write a checkpoint of the current step (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(tr.model, options=options)
    optimizer_state = get_optimizer_state_dict(tr.model, tr.optimizer, options=options)
    ema_state = tr.ema.full_state()
    mine = {"loader": tr.loader.state_dict(), "rng": rng_state()}
    ranks = [mine]
    if tr.world > 1:
        ranks = [None] * tr.world
        dist.all_gather_object(ranks, mine)
    folder = None
    if tr.rank == 0:
        train_state = {"progress": dataclasses.asdict(tr.progress), "world": tr.world, "ranks": ranks}
        folder = save_checkpoint(tr.out, tr.progress.step, model_state, ema_state, optimizer_state, train_state,
                                 tr.run_info, tr.config.checkpoint.keep)
    if tr.world > 1:
        dist.barrier()
    return folder


def restore(tr: Trainer, folder: Path, data_changed: bool = False) -> None:
    """Load a checkpoint's weights, EMA, optimizer, counters, loader position and RNG states.
    ``data_changed`` (resuming on another cache): the saved position names batches of the old
    cache, so the loader starts the next epoch of the new one instead."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    optimizer_state, train_state = load_training_state(folder)
    if train_state["world"] != tr.world:
        raise ValueError(f"checkpoint {folder} was written by {train_state['world']} ranks, this run has {tr.world}: "
                         f"the loader's sharding (and so the data order) depends on it; resume with "
                         f"{train_state['world']} ranks")
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(tr.model, load_weights(folder, ema=False), options=options)
    set_optimizer_state_dict(tr.model, tr.optimizer, optimizer_state, options=options)
    tr.ema.load_full_state(load_weights(folder, ema=True))
    mine = train_state["ranks"][tr.rank]
    if data_changed:
        tr.loader.epoch, tr.loader.batch = int(mine["loader"]["epoch"]) + 1, 0
    else:
        tr.loader.load_state_dict(mine["loader"])
    set_rng_state(mine["rng"])
    tr.progress = Progress(**train_state["progress"])


def take_optimizer_state(tr: Trainer, folder: Path) -> str:
    """Load the optimizer state of checkpoint ``folder`` (another run's, train.init_optimizer):
    Adam's moments and step counts carry over, the hyperparameters (lr, betas, eps, weight decay)
    stay this run's. Returns a line for the log; a state that does not fit this model's
    parameters is a ValueError."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer_state, _ = load_training_state(folder)
    ours = [{key: value for key, value in group.items() if key != "params"} for group in tr.optimizer.param_groups]
    try:
        set_optimizer_state_dict(tr.model, tr.optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as error:
        raise ValueError(f"--init {folder}: its optimizer state does not fit this model's parameters "
                         f"({type(error).__name__}: {error})") from None
    for group, hyper in zip(tr.optimizer.param_groups, ours):
        group.update(hyper)
    steps = {int(s["step"]) for s in tr.optimizer.state.values() if "step" in s}
    return f"optimizer state taken from {folder} (Adam step {max(steps) if steps else 0})"


def _step_summary(tr: Trainer, loss_sum: torch.Tensor, grad_norm: torch.Tensor,
                  params_bad: torch.Tensor) -> torch.Tensor:
    """A (4,) device tensor: the loss summed over ranks, the number of ranks whose loss or gradient
    norm is inf or NaN, the number whose earlier update left a parameter inf or NaN, and this
    rank's gradient norm; one all-reduce when distributed, no host sync."""
    bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
    packed = torch.stack([loss_sum.float(), bad, params_bad.float()])
    if tr.world > 1:
        dist.all_reduce(packed)
    return torch.cat([packed, grad_norm.float().reshape(1)])


def _step_outcome(tr: Trainer, summary: list[float]) -> tuple[bool, float, float, bool]:
    """(apply the step?, global mean loss, grad norm, did an earlier update leave a parameter inf
    or NaN?) from _step_summary's values read on the host."""
    loss, bad_ranks, corrupted_ranks, grad_norm = summary
    return bad_ranks == 0, loss / tr.world, grad_norm, corrupted_ranks > 0


class DeviceSkip:
    """The non-finite skip decided on the device, so that the host launches the optimizer before
    it reads the step's outcome: the GPU goes from the backward straight into the update while
    the host waits, instead of idling while the host reads, then launches the update (the
    optimizer's launch is milliseconds of Python for hundreds of tensors). engine AdamW only
    (set_apply / forget_step): its pass reads the flag and writes nothing where it is 0."""

    def __init__(self, optimizer: AdamW, device: torch.device):
        self.optimizer = optimizer
        self.apply = torch.ones(1, device=device)
        self.host = torch.empty(4, pin_memory=device.type == "cuda")
        self.ready = torch.cuda.Event() if device.type == "cuda" else None
        optimizer.set_apply(self.apply)

    def step(self, summary: torch.Tensor) -> list[float]:
        """Launch the update of the step ``summary`` (_step_summary) describes, applied on the device
        where no rank was bad, then read the summary (waiting for the backward, not the update)."""
        self.apply.copy_(summary[1:2] == 0)
        self.host.copy_(summary, non_blocking=True)
        if self.ready is not None:
            self.ready.record()
        self.optimizer.step()
        if self.ready is not None:
            self.ready.synchronize()
        values = self.host.tolist()
        if values[1] != 0:  # not applied: the update wrote nothing, its step counts go back
            self.optimizer.forget_step()
        return values


def _parameters_nonfinite(optimizer, params: list[torch.Tensor]) -> torch.Tensor:
    """A device scalar, nonzero when a parameter holds inf or NaN after the optimizer's update; no
    host sync. engine.optim.AdamW flags it in its update's own pass (no extra read of the
    parameters); other optimizers pay one read of the parameters (their norms)."""
    from torch.distributed.tensor import DTensor

    if isinstance(optimizer, AdamW) and optimizer.parameters_nonfinite() is not None:
        return optimizer.parameters_nonfinite()[0]
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]  # FSDP2: this rank's shards
    return ~torch.isfinite(torch.stack(torch._foreach_norm([p.detach() for p in local])).sum())


def _sample(tr: Trainer, step: int) -> None:
    ema_state = tr.ema.full_state()
    if tr.rank == 0:
        tr.sample_grid(step, ema_state)
    if tr.world > 1:
        dist.barrier()


def _forward_backward(tr: Trainer, batches: list[dict], generators: list[torch.Generator],
                      params: list[torch.nn.Parameter], max_norm: float, grad_scale: torch.Tensor | None) -> dict:
    """Forward and backward of one step's micro-batches (gradients accumulate), then the gradient
    clipping of ``params``: device tensors only, no host read, so it can be captured
    (engine.step_graph). With ``grad_scale`` (engine AdamW, _fused_updates) the clipping
    coefficient goes there and the optimizer applies it in its own pass over the gradients."""
    from torch.distributed.tensor import DTensor

    loss_sum = torch.zeros((), device=tr.device)
    for micro, (batch, generator) in enumerate(zip(batches, generators)):
        with _gradient_sync(tr.model, micro == len(batches) - 1):
            loss = _micro_batch_loss(tr, batch, generator) / len(batches)
            loss.backward()
        loss_sum += loss.detach()
    if grad_scale is not None:
        grad_norm, coefficient = clip_coefficient([p.grad for p in params if p.grad is not None], max_norm)
        grad_scale.copy_(coefficient)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    return {"loss_sum": loss_sum, "grad_norm": grad_norm}


def _fused_updates(tr: Trainer) -> torch.Tensor | None:
    """With engine AdamW, the gradient clipping and the EMA move into the optimizer's pass: the
    step then reads the gradients, parameters and EMA once instead of three passes (clip's
    multiply, the update, the EMA's lerp; bench/optimizer.py). Returns the clipping scale the
    step reads, or None with another optimizer (clip_grad_norm_ and EMA.update as they are)."""
    if not isinstance(tr.optimizer, AdamW):
        return None
    owned = {id(p) for group in tr.optimizer.param_groups for p in group["params"]}
    tr.optimizer.attach_ema({p: s for p, s in zip(tr.ema.params, tr.ema.shadow) if id(p) in owned}, tr.ema.decay)
    tr.ema.hand_over({id(p) for p in tr.optimizer.shadows})
    grad_scale = torch.ones((), dtype=torch.float32, device=tr.device)
    tr.optimizer.set_grad_scale(grad_scale)
    return grad_scale


def _graph_inputs(batches: list[dict]) -> dict[str, torch.Tensor]:
    """A step's micro-batches as one flat dict of tensors ("micro.field"), the graph's inputs."""
    return {f"{micro}.{name}": value for micro, batch in enumerate(batches) for name, value in batch.items()
            if isinstance(value, torch.Tensor)}


def _graph_batches(inputs: dict[str, torch.Tensor], count: int) -> list[dict]:
    batches = [{} for _ in range(count)]
    for key, value in inputs.items():
        micro, name = key.split(".", 1)
        batches[int(micro)][name] = value
    return batches


def _any_rank(tr: Trainer, flag: torch.Tensor) -> bool:
    """Whether ``flag`` (a device scalar) is nonzero on any rank (a collective when distributed)."""
    flag = flag.float().reshape(1)
    if tr.world > 1:
        dist.all_reduce(flag)
    return bool(flag.item())


def _graph_state(tr: Trainer, graph) -> tuple[bool, str]:
    """(the step replays a CUDA graph now, why not when not) for the log."""
    if graph is None:
        return False, tr.cuda_graph_off
    if not graph.captured:
        return False, f"the first {graph.warmup_steps} steps run eagerly before the capture"
    return True, ""


def _stop_corrupted(tr: Trainer, log: MetricsLog, step: int) -> int:
    from train.checkpoint import complete_checkpoints

    done = complete_checkpoints(tr.out)
    kept = f"the newest checkpoint, {done[-1][1]}, holds the last good weights" if done else "no checkpoint was saved"
    log.message(f"stopping at step {step}: an optimizer update left parameters inf or NaN although the loss and "
                f"gradient norm were finite (check optim.lr, optim.eps and optim.weight_decay); nothing from that "
                f"update on is saved, {kept}")
    return EXIT_NONFINITE


def train(tr: Trainer) -> int:
    """Run until the configured number of steps; returns the process exit code."""
    from engine.step_graph import StepGraph

    cfg, device = tr.config, tr.device
    accumulation = tr.accumulation
    params = [p for p in tr.module.parameters() if p.requires_grad]
    max_norm = cfg.optim.grad_clip or float("inf")  # inf: measure the norm, clip nothing
    log = MetricsLog(tr.out, tr.rank, cfg.train.steps, tr.progress.step, cfg.log.tensorboard)
    batches = _forever(tr.loader)
    # One generator per micro-batch of a step, re-seeded every step (see the module docstring):
    # the same objects every step, so a CUDA graph can have them registered.
    generators = [torch.Generator(device) for _ in range(accumulation)]
    graph = StepGraph(device, params, generators=generators) if tr.cuda_graph else None
    grad_scale = _fused_updates(tr)
    skip = DeviceSkip(tr.optimizer, device) if grad_scale is not None else None
    interval = Interval()
    energy = EnergyMeter(open_energy_counter(device) if tr.rank == 0 else None)  # the logging rank's GPU
    params_bad = torch.zeros((), device=device)  # nonzero once an update leaves a parameter inf or NaN
    last_time = time.perf_counter()
    try:
        while tr.progress.step < cfg.train.steps:
            step = tr.progress.step
            step_start, wait = time.perf_counter(), 0.0
            lr = step_lr(cfg, step)
            for group in tr.optimizer.param_groups:
                group["lr"] = lr
            tr.ema.decay = ema_decay_at(step, cfg.train.ema_decay, cfg.train.ema_start)
            if grad_scale is not None:  # engine AdamW moves the EMA in its own pass (_fused_updates)
                tr.optimizer.ema_decay = tr.ema.decay
            fetch = time.perf_counter()
            step_batches = [next(batches) for _ in range(accumulation)]
            wait += time.perf_counter() - fetch
            for micro, generator in enumerate(generators):
                generator.manual_seed(micro_seed(cfg.train.seed, step, micro * tr.world + tr.rank))
            if graph is None:
                out = _forward_backward(tr, step_batches, generators, params, max_norm, grad_scale)
            else:
                out = graph.run(lambda inputs: _forward_backward(tr, _graph_batches(inputs, accumulation), generators,
                                                                 params, max_norm, grad_scale),
                                _graph_inputs(step_batches))
            summary = _step_summary(tr, out["loss_sum"], out["grad_norm"], params_bad)
            if skip is not None:  # the update is launched before the host reads the outcome
                applied, loss_value, norm_value, corrupted = _step_outcome(tr, skip.step(summary))
                params_bad = _parameters_nonfinite(tr.optimizer, params)
            else:
                applied, loss_value, norm_value, corrupted = _step_outcome(tr, summary.tolist())
            images = sum(batch["latent"].shape[0] for batch in step_batches) * tr.world
            flops = sum(tr.family.flops(tr.module, batch, cfg.train) for batch in step_batches) * tr.world
            if corrupted:  # an earlier update (read here, in the step's one sync) left inf or NaN
                return _stop_corrupted(tr, log, step)
            if applied:
                if skip is None:
                    tr.optimizer.step()
                    params_bad = _parameters_nonfinite(tr.optimizer, params)
                tr.ema.update()  # the shadows the optimizer's pass does not move (none with engine AdamW)
                tr.progress.nonfinite_run = 0
            else:
                tr.progress.skipped_total += 1
                tr.progress.nonfinite_run += 1
            if graph is None:  # under a graph the gradients stay where it writes them
                tr.optimizer.zero_grad(set_to_none=True)
            tr.progress.step = step = step + 1

            now = time.perf_counter()
            tr.progress.gpu_seconds += (now - last_time) * tr.world
            last_time = now
            interval.add(images, flops, now - step_start, wait, loss_value, norm_value, applied)
            log.step(loss_value if applied else None)
            stop = tr.progress.nonfinite_run >= cfg.train.max_nonfinite_steps
            if step % cfg.log.every == 0 or step == cfg.train.steps or stop:
                log.write(interval_record(step, interval, lr, tr.world, device, cfg.train.steps,
                                          cfg.train.global_batch, tr.progress.gpu_seconds, tr.progress.skipped_total,
                                          tr.recompute, *_graph_state(tr, graph), energy_j=energy.take()))
                interval = Interval()

            every = cfg.checkpoint.every
            if stop or (every and step % every == 0) or step == cfg.train.steps:
                if _any_rank(tr, params_bad):  # never save parameters an update made inf or NaN
                    return _stop_corrupted(tr, log, step)
                folder = save(tr)
                if folder is not None:
                    log.message(f"step {step}: checkpoint {folder}")
            if tr.sample_grid is not None and cfg.log.sample_every and step % cfg.log.sample_every == 0:
                _sample(tr, step)
            debug_kill("after-step", step)
            if stop:
                log.message(f"stopping at step {step}: {tr.progress.nonfinite_run} steps in a row had a non-finite "
                            f"loss or gradient norm (train.max_nonfinite_steps = {cfg.train.max_nonfinite_steps}); "
                            f"their updates were skipped and the last good weights are saved in the step-{step:07d} "
                            f"checkpoint. Lower the learning rate, check the data, or resume with --resume.")
                return EXIT_NONFINITE
            last_time = time.perf_counter()  # checkpoint and sample time count as used, not as step time
            tr.progress.gpu_seconds += (last_time - now) * tr.world
    finally:
        energy.close()
        log.close()
    return 0
