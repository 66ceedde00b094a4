"""`python -m train run`: train one stage of a schedule on a latent cache.

    python -m train run (--config FILE | --preset NAME) --stage 1|2|3 --data CACHE --out DIR
        [--init CKPT] [--resume] [--max-steps N] [--ckpt-every K] [--set KEY=VALUE ...]

Under torchrun (WORLD_SIZE > 1) it trains data-parallel: DDP, or FSDP2 with
``train.parallel = "fsdp2"``; gloo on CPU, nccl on CUDA. Everything that can be wrong with the
arguments, the config or the cache is reported before any model is built.

``--init`` takes a stage-1 engine checkpoint (re-parameterised into PixArt for stage 2), a
facebookresearch/DiT ``.pt``, an official PixArt-α ``.pth``, a diffusers PixArt transformer
folder, or an engine checkpoint of a PixArt (stage 3 from stage 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# config fields (prefixes) that may change between the segments of one run (--resume)
_RESUMABLE_CHANGES = ("train.steps", "checkpoint.", "log.", "data.workers", "data.backend", "train.cuda_graph")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="run config (.toml or .json)")
    source.add_argument("--preset", metavar="NAME", help="a config in train/configs (pixart-alpha, tiny, demo)")
    parser.add_argument("--stage", required=True, help="stage of the config: 1, 2, 3 (pixart-alpha: 3a, 3b, 3c)")
    parser.add_argument("--data", required=True, metavar="CACHE", help="latent cache from `python -m train prepare`")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints, metrics.jsonl, samples")
    parser.add_argument("--init", metavar="CKPT", help="initial weights (see the module docstring)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--max-steps", type=int, metavar="N", help="override train.steps")
    parser.add_argument("--ckpt-every", type=int, metavar="K", help="override checkpoint.every")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config value, e.g. --set train.micro_batch=32 (repeatable)")


@dataclass
class Plan:
    """A checked run: nothing here touched a GPU."""

    config: object        # RunConfig
    model_config: object  # PixArtConfig | DiTConfig
    cache: object         # engine.data.LatentCache
    out: Path
    world: int
    micro_batch: int
    init: Path | None
    resume_from: Path | None
    cuda_graph: bool = False  # forward + backward replayed as a CUDA graph (train.cuda_graph resolved)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        name = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict) and key != "fields":
            out += _differences(a[key], b[key], f"{name}.")
        elif a.get(key) != b.get(key):
            out.append(name)
    return out


def check_cache(config, model_config, cache) -> None:
    """Reject a cache built for other settings, naming the field."""
    from engine.config import DiTConfig

    vae = (cache.meta.get("vae") or {}).get("path")
    if config.data.pixels != (vae == "pixels"):
        built = "pixels (--vae pixels)" if vae == "pixels" else f"VAE latents ({vae})"
        raise ValueError(f"latent cache {cache.path} holds {built}, but data.pixels = {config.data.pixels}")
    cache.require(resolution=config.model.resolution, latent_channels=model_config.in_channels,
                  multi_aspect=config.data.multi_aspect)
    downsample = cache.meta["latent_downsample"]
    if model_config.input_size * downsample != config.model.resolution:
        raise ValueError(f"latent cache {cache.path} downsamples by {downsample}: {config.model.resolution}px images "
                         f"give {config.model.resolution // downsample}-pixel latents, the model expects "
                         f"input_size = {model_config.input_size}")
    if isinstance(model_config, DiTConfig):
        if not cache.has_labels:
            raise ValueError(f"latent cache {cache.path} has no class labels: stage 1 needs a cache made with "
                             f"`prepare --labels`")
        if len(cache.classes) > model_config.num_classes:
            raise ValueError(f"latent cache {cache.path} has {len(cache.classes)} classes, the model "
                             f"num_classes = {model_config.num_classes}")
    elif cache.text_width == 0:
        raise ValueError(f"latent cache {cache.path} has no text features (built without --text-encoder); "
                         f"stage {config.stage} trains on captions")
    else:
        cache.require(text_width=model_config.caption_channels)


def _dali_importable() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return False


def plan_run(args: argparse.Namespace) -> Plan:
    """Read and check everything (config, output folder, --init, cache) without touching a GPU."""
    import numpy as np
    import torch

    from engine.data import open_cache
    from train.checkpoint import complete_checkpoints, read_run_info
    from train.config import ConfigError, load_run_config, preset_path

    settings = list(args.set)
    if args.max_steps is not None:
        settings.append(f"train.steps={args.max_steps}")
    if args.ckpt_every is not None:
        settings.append(f"checkpoint.every={args.ckpt_every}")
    path = Path(args.config) if args.config else preset_path(args.preset)
    config = load_run_config(path, str(args.stage), settings)
    model_config = config.model_config()

    world = int(os.environ.get("WORLD_SIZE", 1))
    t = config.train
    micro = t.micro_batch or t.global_batch // world
    if micro < 1 or t.global_batch % (micro * world):
        raise ConfigError(f"train.global_batch = {t.global_batch} is not a multiple of train.micro_batch x ranks "
                          f"= {micro} x {world}")
    loader = config.data.backend
    if (loader == "dali" or (loader == "auto" and torch.cuda.is_available())) and not _dali_importable():
        raise ConfigError(f"data.backend = {loader!r} means the DALI loader here, and nvidia.dali is not importable: "
                          '`pip install nvidia-dali-cuda130`, or set data.backend = "torch"')
    if config.optim.name == "apex":
        try:
            import apex.optimizers  # noqa: F401
        except ImportError:
            raise ConfigError("optim.name = 'apex' but apex is not installed; use optim.name = 'adamw'") from None

    out = Path(args.out)
    done = complete_checkpoints(out)
    resume_from = None
    if args.resume:
        if args.init:
            raise ValueError("--resume continues from the run's own checkpoint: drop --init")
        if not done:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out / 'checkpoints'} to resume from")
        resume_from = done[-1][1]
        saved = read_run_info(resume_from)["config"]
        current = json.loads(json.dumps(config.to_dict()))  # as run.json stores it (tuples become lists)
        changed = [name for name in _differences(saved, current)
                   if not name.startswith(_RESUMABLE_CHANGES)]
        if changed:
            raise ValueError(f"--resume: the config differs from the one {resume_from} was trained with in {changed}; "
                             f"only {list(_RESUMABLE_CHANGES)} may change between segments of a run")
    elif done:
        raise FileExistsError(f"{out} already holds checkpoints (newest: step {done[-1][0]}): pass --resume to "
                              f"continue that run, or choose another --out")
    init = Path(args.init) if args.init else None
    if init is not None and not init.exists():
        raise FileNotFoundError(f"--init {init} does not exist")
    cache = open_cache(args.data)
    check_cache(config, model_config, cache)
    bucket_sizes = np.unique(cache.sample_buckets, return_counts=True)[1]
    cuda_graph = use_cuda_graph(t.cuda_graph, torch.cuda.is_available(), world, t.compile, t.activation_checkpointing,
                                batch_shapes=int((bucket_sizes >= micro).sum()))  # the loader drops partial batches
    return Plan(config, model_config, cache, out, world, micro, init, resume_from, cuda_graph)


def init_distributed(world: int):
    """(rank, device) from torchrun's environment; the process group is created when world > 1."""
    import torch
    import torch.distributed as dist

    if world == 1:
        on_gpu = torch.cuda.is_available()
        return 0, torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)  # NCCL_NVLS_ENABLE and friends: as the environment sets them
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), device


def _cache_identity(cache) -> dict:
    meta = cache.meta
    return {key: meta.get(key) for key in ("resolution", "multi_aspect", "latent_channels", "latent_downsample", "vae",
                                           "text_encoder", "text_width", "max_tokens", "labels", "classes")} | {
        "path": str(Path(cache.path).resolve()), "num_samples": cache.num_samples}


def use_cuda_graph(setting: str, cuda: bool, world: int, compile: bool, activation_checkpointing: int,
                   batch_shapes: int) -> bool:
    """Whether the step's forward and backward run as a CUDA graph (engine.step_graph), from
    train.cuda_graph: "off" never, "auto" wherever the conditions below hold, "on" the same or a
    ConfigError naming what stands in the way."""
    from train.config import ConfigError

    if setting == "off":
        return False
    obstacles = []
    if not cuda:
        obstacles.append("there is no CUDA device")
    if world > 1:
        obstacles.append(f"the run has {world} ranks (graphs around DDP / FSDP2 collectives are not supported yet)")
    if compile:
        obstacles.append("train.compile is on (not supported together yet)")
    if activation_checkpointing:
        obstacles.append("train.activation_checkpointing is on (not supported together yet)")
    if batch_shapes > 1:
        obstacles.append(f"the cache's batches come in {batch_shapes} shapes (aspect-ratio buckets) and a graph "
                         f"replays one")
    if obstacles and setting == "on":
        raise ConfigError('train.cuda_graph = "on" but ' + "; ".join(obstacles))
    return not obstacles


def build_trainer(plan: Plan, rank: int, device):
    """Loader, model (+ init weights, parallelism), optimizer, EMA and objective."""
    import torch

    from engine.config import DiTConfig
    from engine.data import make_loader
    from engine.diffusion import EDM, GaussianDiffusion
    from engine.model import build_model
    from engine.parallel import apply_activation_checkpointing, apply_compile, apply_ddp, apply_fsdp2
    from train import loop
    from train.checkpoint import load_init
    from train.config import ConfigError

    cfg, model_config = plan.config, plan.model_config
    text_len = 1 if isinstance(model_config, DiTConfig) else model_config.text_len
    backend = cfg.data.backend if cfg.data.backend != "auto" else ("dali" if device.type == "cuda" else "torch")
    loader = make_loader(plan.cache, plan.micro_batch, rank=rank, world=plan.world, seed=cfg.train.seed,
                         backend=backend, text_len=text_len, drop_last=True, device=device, workers=cfg.data.workers)

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    module = build_model(model_config)
    messages = []
    if plan.init is not None and plan.resume_from is None:
        messages.append(load_init(module, plan.init, cfg.train.init_ema))
    module.to(device)
    if not isinstance(model_config, DiTConfig):
        loop.install_caption_dropout(module)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(module, every=cfg.train.activation_checkpointing)
    if cfg.train.compile:
        apply_compile(module)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    parallel = cfg.train.parallel if cfg.train.parallel != "auto" else ("ddp" if plan.world > 1 else "none")
    if parallel != "none" and plan.world == 1:
        parallel = "none"  # one process: nothing to shard or reduce
    autocast_dtype = torch.bfloat16 if bf16 else None
    if parallel == "fsdp2":
        apply_fsdp2(module, mixed_precision=bf16)
        model, autocast_dtype = module, None  # FSDP2's MixedPrecisionPolicy casts instead of autocast
    elif parallel == "ddp":
        model = apply_ddp(module, device)
    else:
        model = module

    optimizer_name = loop.optimizer_name(cfg.optim, device, parallel, cfg.train.compile)
    if optimizer_name == "engine" and parallel == "fsdp2":
        raise ConfigError("optim.name = 'engine' keeps plain parameter tensors, and train.parallel = 'fsdp2' shards "
                          "them: use optim.name = 'adamw' or 'auto' with FSDP2")
    objective = (EDM(p_mean=cfg.train.edm_p_mean, p_std=cfg.train.edm_p_std) if cfg.train.objective == "edm"
                 else GaussianDiffusion(learn_sigma=model_config.learn_sigma))
    run_info = {"config": cfg.to_dict(),
                "model": {"class": type(model_config).__name__, "config": dataclasses.asdict(model_config)},
                "cache": _cache_identity(plan.cache), "world": plan.world, "parallel": parallel}
    trainer = loop.Trainer(
        config=cfg, model=model, module=module,
        optimizer=loop.build_optimizer(module, cfg.optim, cfg.lr(), device, optimizer_name,
                                       copy_dtype=autocast_dtype if optimizer_name == "engine" else None),
        ema=loop.EMA(module, cfg.train.ema_decay), objective=objective, loader=loader, device=device, rank=rank,
        world=plan.world, out=plan.out, run_info=run_info, autocast_dtype=autocast_dtype, cuda_graph=plan.cuda_graph)
    if plan.resume_from is not None:
        loop.restore(trainer, plan.resume_from)
        messages.append(f"resumed from {plan.resume_from} (step {trainer.progress.step})")
    if cfg.log.sample_every:
        vae = (plan.cache.meta.get("vae") or {}).get("path", "pixels")
        if vae == "pixels" or Path(vae).is_dir():
            # rank 0 draws; the other ranks only take part in gathering the EMA weights
            trainer.sample_grid = _grid_writer(plan, vae, device) if rank == 0 else (lambda step, state: None)
        else:
            messages.append(f"sample grids off: the cache's VAE {vae} is not on this machine")
    params = sum(p.numel() for p in module.parameters()) / 1e6
    settings = (f"stage {cfg.stage}: {type(model_config).__name__.removesuffix('Config')} {params:.2f}M "
                f"params, {plan.world} rank(s) x {plan.micro_batch} x {trainer.accumulation} accumulation = "
                f"{cfg.train.global_batch} per step, lr {cfg.lr():.3g}, {'bf16' if bf16 else 'fp32'}, "
                f"parallel {parallel}, {backend} loader, {device}{', CUDA graph' if plan.cuda_graph else ''}")
    return trainer, [settings, *messages]


def _grid_writer(plan: Plan, vae: str, device):
    """The sample-grid callback: fixed class labels (stage 1) or the caption features of the
    cache's first samples (their texts go to samples/prompts.txt), decoded with the cache's VAE."""
    import torch

    from engine.config import DiTConfig
    from train import sample

    cfg, model_config = plan.config, plan.model_config
    count = cfg.log.sample_count
    if isinstance(model_config, DiTConfig):
        conditions = {"labels": torch.arange(count, device=device) % model_config.num_classes}
        names = [f"class {i % model_config.num_classes}" for i in range(count)]
    else:
        features, names = sample.cache_prompts(plan.cache, count, model_config.text_len)
        conditions = sample.pad_captions(features, model_config.text_len, device)
        count = len(features)
    samples = plan.out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    (samples / "prompts.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    return sample.training_grid_writer(model_config, conditions, count, sample.Decoder(vae, device), samples,
                                       cfg.log.sample_steps, cfg.log.sample_cfg, device,
                                       plan.cache.meta["latent_downsample"])


def main(args: argparse.Namespace) -> int:
    try:
        plan = plan_run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # ConfigError is a ValueError
        print(f"run: {error}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from train import loop

    rank, device = init_distributed(plan.world)
    try:
        if rank == 0:
            plan.out.mkdir(parents=True, exist_ok=True)
        trainer, messages = build_trainer(plan, rank, device)
        if rank == 0:
            for line in messages:
                print(line, flush=True)
        return loop.train(trainer)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
