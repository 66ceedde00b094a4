"""`python -m train run`: train one stage of a schedule on a latent cache.

    python -m train run (--config FILE | --preset NAME) --stage 1|2|3 --data CACHE --out DIR
        [--init CKPT] [--resume] [--max-steps N] [--ckpt-every K] [--set KEY=VALUE ...]

Under torchrun (WORLD_SIZE > 1) it trains data-parallel: DDP, or FSDP2 with
``train.parallel = "fsdp2"``; gloo on CPU, nccl on CUDA. Everything that can be wrong with the
arguments, the config or the cache is reported before any model is built.

``--init`` takes an engine checkpoint or run folder (of this model family, or of one the
family converts from), or a file in a format the model's family reads (engine.family).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# config fields (prefixes) that may change between the segments of one run (--resume)
_RESUMABLE_CHANGES = ("train.steps", "checkpoint.", "log.", "data.workers", "data.backend", "train.cuda_graph",
                      "train.activation_checkpointing", "train.memory_limit_gib")  # memory and time, not results


def _run_presets() -> list[str]:
    from train.config import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from engine import family

    parser.epilog = f"model families and their presets (model.preset):\n{family.catalogue()}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="run config (.toml or .json)")
    source.add_argument("--preset", metavar="NAME", help=f"a run config in train/configs: {', '.join(_run_presets())}")
    parser.add_argument("--stage", required=True, help="a stage of the config (its [stages.NAME] tables)")
    parser.add_argument("--data", required=True, metavar="CACHE", help="latent cache from `python -m train prepare`")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints, metrics.jsonl, samples")
    parser.add_argument("--init", metavar="CKPT", help="initial weights (see the module docstring)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out that verifies")
    parser.add_argument("--auto-resume", action="store_true",
                        help="--resume when --out holds a checkpoint, else start (with --init if given): the one "
                             "command an elastic restart (torchrun --max-restarts) runs again after a failure")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: continue on another latent cache than the checkpoint was trained on")
    parser.add_argument("--max-steps", type=int, metavar="N", help="override train.steps")
    parser.add_argument("--ckpt-every", type=int, metavar="K", help="override checkpoint.every")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config value, e.g. --set train.micro_batch=32 (repeatable)")


@dataclass
class Plan:
    """A checked run: nothing here touched a GPU."""

    config: object        # RunConfig
    family: object        # engine.family.Family of the model preset
    model_config: object  # the family's config
    cache: object         # engine.data.LatentCache
    out: Path
    world: int
    micro_batch: int
    init: Path | None
    resume_from: Path | None
    cuda_graph: bool = False  # forward + backward replayed as a CUDA graph (train.cuda_graph resolved)
    notes: list = None        # lines for the log: checkpoints --resume passed over, ...
    data_changed: bool = False  # --resume on another cache (--allow-data-change)
    cuda_graph_off: str = ""    # why the step is not a CUDA graph (empty when it is)


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


def check_cache(config, model_family, model_config, cache) -> None:
    """Reject a cache built for other settings, naming the field."""
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
    model_family.check_cache(model_config, cache)


def _dali_importable() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return False


def plan_run(args: argparse.Namespace) -> Plan:
    """Read and check everything (config, output folder, --init, cache) without touching a GPU."""
    import numpy as np
    import torch

    from engine import family
    from engine.data import open_cache
    from train.config import ConfigError, load_run_config, preset_path

    settings = list(args.set)
    if args.max_steps is not None:
        settings.append(f"train.steps={args.max_steps}")
    if args.ckpt_every is not None:
        settings.append(f"checkpoint.every={args.ckpt_every}")
    path = Path(args.config) if args.config else preset_path(args.preset)
    config = load_run_config(path, str(args.stage), settings)
    model_config = config.model_config()
    model_family = family.of_config(model_config)

    world = int(os.environ.get("WORLD_SIZE", 1))
    t = config.train
    micro = t.micro_batch or t.global_batch // world
    if micro < 1 or t.global_batch % (micro * world):
        raise ConfigError(f"train.global_batch = {t.global_batch} is not a multiple of train.micro_batch x ranks "
                          f"= {micro} x {world}")
    if config.data.backend == "dali" and not _dali_importable():
        raise ConfigError('data.backend = "dali" but nvidia.dali is not importable: `pip install nvidia-dali-cuda130`, '
                          'or set data.backend = "torch" (or "auto": DALI where it is installed)')
    if config.optim.name == "apex":
        try:
            import apex.optimizers  # noqa: F401
        except ImportError:
            raise ConfigError("optim.name = 'apex' but apex is not installed; use optim.name = 'adamw'") from None

    auto_notes = _auto_resume(args)
    init = Path(args.init) if args.init else None
    if init is not None and not init.exists():
        raise FileNotFoundError(f"--init {init} does not exist")
    _check_init(config, init, args.resume)
    cache = open_cache(args.data)
    check_cache(config, model_family, model_config, cache)
    bucket_sizes = np.unique(cache.sample_buckets, return_counts=True)[1]
    _check_batches(cache, bucket_sizes, t.global_batch, micro, world)
    out = Path(args.out)
    resume_from, notes, data_changed = _resume_point(args, out, config, cache)
    notes = auto_notes + notes
    cuda_graph, graph_off = use_cuda_graph(t.cuda_graph, torch.cuda.is_available(), world, t.compile,
                                           batch_shapes=int((bucket_sizes >= micro).sum()))  # partial batches dropped
    _check_recompute(t.activation_checkpointing, model_family, model_config)
    return Plan(config, model_family, model_config, cache, out, world, micro, init, resume_from, cuda_graph, notes,
                data_changed, graph_off)


def _auto_resume(args: argparse.Namespace) -> list[str]:
    """--auto-resume: set args.resume from whether --out holds a complete checkpoint (then --init,
    which seeded the run's first start, is not read again); notes for the log."""
    from train.checkpoint import complete_checkpoints

    if not args.auto_resume:
        return []
    if args.resume:
        raise ValueError("--auto-resume resumes by itself when --out holds a checkpoint: drop --resume")
    done = complete_checkpoints(Path(args.out))
    args.resume = bool(done)
    if not done:
        return []
    notes = [f"--auto-resume: {args.out} holds checkpoints (newest: step {done[-1][0]}), continuing the run"]
    if args.init:
        notes.append(f"--auto-resume: --init {args.init} seeded the run's first start and is not read again")
        args.init = None
    return notes


def _check_init(config, init: Path | None, resume: bool) -> None:
    """What train.init_from_stage and train.init_optimizer ask of --init, checked before anything
    is built: a stage that continues another has --init (unless it resumes its own run), an
    engine checkpoint given to it comes from a run of that stage, and the optimizer state comes
    from an engine checkpoint."""
    from train.checkpoint import find_checkpoint, is_engine_checkpoint, read_run_info
    from train.config import ConfigError

    t = config.train
    wanted = t.init_from_stage
    if resume:
        return  # the run's own checkpoint has the weights (--resume with --init is an error of its own)
    if init is None:
        if wanted:
            raise ConfigError(f"stage {config.stage} continues from stage {wanted}'s weights "
                              f"(train.init_from_stage = \"{wanted}\"): pass --init with stage {wanted}'s run folder "
                              f"or checkpoint")
        return
    if not is_engine_checkpoint(init):
        if t.init_optimizer:
            raise ConfigError(f"train.init_optimizer = true takes Adam's state from an engine checkpoint, and --init "
                              f"{init} is a file of another format: --set train.init_optimizer=false to start the "
                              f"optimizer afresh")
        return  # another format (an official release): the family reads it; its stage is not recorded
    folder = find_checkpoint(init)
    trained = read_run_info(folder).get("config", {}).get("stage")
    if wanted and trained != wanted:
        raise ConfigError(f"--init {init} is a checkpoint of stage {trained!r}, and stage {config.stage} continues "
                          f"from stage {wanted!r} (train.init_from_stage): pass stage {wanted}'s run folder or "
                          f"checkpoint")


def _check_recompute(setting, model_family, model_config) -> None:
    """A train.activation_checkpointing that names parts the model's blocks lack is an error
    before anything is built (checked on a model without storage)."""
    import torch

    from engine.recompute import Recompute
    from train.config import ConfigError

    if setting == "auto":
        return
    with torch.device("meta"):
        module = model_family.build(model_config)
    try:
        Recompute.parse(setting).check(module)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"train.activation_checkpointing: {error}") from None


def _check_batches(cache, bucket_sizes, global_batch: int, micro: int, world: int) -> None:
    """A cache that cannot fill the run's batches is an error before anything is built (the
    loader keeps full micro-batches of one bucket and drops the rest)."""
    from train.config import ConfigError

    if global_batch > cache.num_samples:
        raise ConfigError(f"train.global_batch = {global_batch} is larger than latent cache {cache.path}'s "
                          f"{cache.num_samples} samples: lower it (e.g. --set train.global_batch=N) or add data")
    if bucket_sizes.max() < micro * world:
        raise ConfigError(f"latent cache {cache.path}: its largest aspect-ratio bucket holds {bucket_sizes.max()} "
                          f"samples, fewer than one micro-batch of {micro} for each of {world} rank(s): lower "
                          f"train.micro_batch / train.global_batch or add data")


def _resume_point(args: argparse.Namespace, out: Path, config, cache) -> tuple[Path | None, list[str], bool]:
    """(the checkpoint --resume continues from, notes for the log, whether the cache changed): the
    newest checkpoint that verifies, trained with this config (up to what may change between
    segments) on this cache unless --allow-data-change."""
    from train.checkpoint import complete_checkpoints, newest_verified, read_run_info

    done = complete_checkpoints(out)
    if not args.resume:
        if done:
            raise FileExistsError(f"{out} already holds checkpoints (newest: step {done[-1][0]}): pass --resume to "
                                  f"continue that run, or choose another --out")
        return None, [], False
    if args.init:
        raise ValueError("--resume continues from the run's own checkpoint: drop --init")
    if not done:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {out / 'checkpoints'} to resume from")
    resume_from, skipped = newest_verified(out)
    notes = [f"--resume passes over {line}" for line in skipped]
    if resume_from is None:
        raise ValueError("--resume: no checkpoint under " + str(out / "checkpoints") + " verifies:\n  "
                         + "\n  ".join(skipped))
    run_info = read_run_info(resume_from)
    current = json.loads(json.dumps(config.to_dict()))  # as run.json stores it (tuples become lists)
    changed = [name for name in _differences(_with_defaults(run_info["config"]), current)
               if not name.startswith(_RESUMABLE_CHANGES)]
    if changed:
        raise ValueError(f"--resume: the config differs from the one {resume_from} was trained with in {changed}; "
                         f"only {list(_RESUMABLE_CHANGES)} may change between segments of a run")
    saved_steps = run_info["config"]["train"]["steps"]
    o = config.optim
    if o.schedule == "cosine" and not o.decay_steps and saved_steps != config.train.steps:
        raise ValueError(f"--resume: train.steps = {config.train.steps}, and {resume_from} was trained with "
                         f"{saved_steps}: the cosine schedule ends at train.steps (optim.decay_steps = 0), so every "
                         f"later step's lr would change; keep train.steps = {saved_steps} (a run that may stop early "
                         f"sets optim.decay_steps from its start)")
    saved, now = run_info.get("cache", {}), _cache_identity(cache)
    fields = ("index_sha256",) if "index_sha256" in saved else ("path", "num_samples")
    moved = [f for f in fields if saved.get(f) != now[f]]
    if moved and not args.allow_data_change:
        raise ValueError(f"--resume: {resume_from} was trained on latent cache {saved.get('path')} "
                         f"({saved.get('num_samples')} samples) and --data is {cache.path} ({cache.num_samples} "
                         f"samples; differs in {moved}): pass the same cache, or --allow-data-change to continue "
                         f"on this one (the data order then differs from an uninterrupted run)")
    if moved:
        notes.append(f"--allow-data-change: continuing on {cache.path}, not the checkpoint's {saved.get('path')}, "
                     f"from the start of the next epoch")
    return resume_from, notes, bool(moved)


def _with_defaults(saved: dict) -> dict:
    """A config from run.json with the fields added since it was written at their defaults, which
    is how that run trained (e.g. optim.schedule "constant"), as run.json stores a config now; a
    config this version cannot read is returned as it is."""
    from train.config import ConfigError, run_config_from_dict

    try:
        return json.loads(json.dumps(run_config_from_dict(saved).to_dict()))
    except (ConfigError, TypeError):
        return saved


def init_distributed(world: int):
    """(rank, device) from torchrun's environment; the process group is created when world > 1."""
    import torch
    import torch.distributed as dist

    if world == 1:
        on_gpu = torch.cuda.is_available()
        return 0, torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    # The store the elastic agent keeps across restarts still holds the previous attempt's keys
    # (a dead rank's address among them: the restarted ranks connected to it and failed or hung,
    # torch 2.13 with --standalone): each attempt rendezvous under its own prefix.
    store, rank, size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"engine/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # NCCL_NVLS_ENABLE and friends: as the environment sets them
        dist.init_process_group("nccl", store=store, rank=rank, world_size=size, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size)
    return dist.get_rank(), device


def _cache_identity(cache) -> dict:
    """What run.json records of the cache: its settings, where it is, and a hash of its index
    (which names every sample and shard, with their checksums)."""
    import hashlib

    meta = cache.meta
    index = Path(cache.path) / "index.json"
    return {key: meta.get(key) for key in ("resolution", "multi_aspect", "latent_channels", "latent_downsample", "vae",
                                           "text_encoder", "text_width", "max_tokens", "padded_captions", "labels",
                                           "classes")} | {
        "path": str(Path(cache.path).resolve()), "num_samples": cache.num_samples,
        "index_sha256": hashlib.sha256(index.read_bytes()).hexdigest()}


def use_cuda_graph(setting: str, cuda: bool, world: int, compile: bool, batch_shapes: int) -> tuple[bool, str]:
    """(whether the step's forward and backward run as a CUDA graph (engine.step_graph), why not
    when not), from train.cuda_graph: "off" never, "auto" wherever the conditions below hold,
    "on" the same or a ConfigError naming what stands in the way. Recompute (any
    train.activation_checkpointing) runs inside the graph."""
    from train.config import ConfigError

    if setting == "off":
        return False, 'train.cuda_graph = "off"'
    obstacles = []
    if not cuda:
        obstacles.append("there is no CUDA device")
    if world > 1:
        obstacles.append(f"the run has {world} ranks (graphs around DDP / FSDP2 collectives are not supported yet)")
    if compile:
        obstacles.append("train.compile is on (not supported together yet)")
    if batch_shapes > 1:
        obstacles.append(f"the cache's batches come in {batch_shapes} shapes (aspect-ratio buckets) and a graph "
                         f"replays one")
    if obstacles and setting == "on":
        raise ConfigError('train.cuda_graph = "on" but ' + "; ".join(obstacles))
    return not obstacles, "; ".join(obstacles)


def build_objective(plan: Plan):
    """The diffusion objective train.objective names (engine.diffusion; one interface for all)."""
    from engine.diffusion import EDM, GaussianDiffusion

    t = plan.config.train
    if t.objective == "edm":
        return EDM(sigma_data=t.edm_sigma_data, p_mean=t.edm_p_mean, p_std=t.edm_p_std)
    return GaussianDiffusion(learn_sigma=plan.family.learns_variance(plan.model_config))


def _parallel_layout(plan: Plan, device) -> tuple[str, torch.dtype | None]:
    """(data-parallel layout, compute dtype: bf16 or None for fp32) from train.parallel and
    train.precision."""
    import torch

    t = plan.config.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    parallel = t.parallel if t.parallel != "auto" else ("ddp" if plan.world > 1 else "none")
    if plan.world == 1:
        parallel = "none"  # one process: nothing to shard or reduce
    return parallel, torch.bfloat16 if bf16 else None


def build_model(plan: Plan, device, objective, parallel: str, compute_dtype, loader, optimizer_name: str) -> tuple:
    """(what the forward is called on, the model itself, the recompute policy, messages): the
    family's model seeded by train.seed (the same initial weights on every rank), --init loaded,
    then recompute (train.recompute.resolve, measured with ``loader``'s samples under "auto"),
    compile and data parallelism applied from outside."""
    import torch

    from engine.parallel import apply_compile, apply_ddp, apply_fsdp2
    from train import loop, recompute
    from train.checkpoint import load_init, read_init

    cfg = plan.config
    torch.manual_seed(cfg.train.seed)
    initialise = plan.init is not None and plan.resume_from is None
    # --init is read before the model is built: a checkpoint that does not load fails before a
    # large model is allocated
    source = read_init(plan.init, cfg.train.init_ema) if initialise else None
    module = plan.family.build(plan.model_config)
    messages = []
    if initialise:
        messages.append(load_init(module, plan.init, objective=objective, source=source))
    module.to(device)
    plan.family.prepare_training(module)

    def loss_of(batch, generator):
        return loop.micro_batch_loss(plan.family, module, module, objective, cfg.train, compute_dtype, batch,
                                     generator)

    later = recompute.later_static_bytes(module, optimizer_name, compute_dtype)
    policy, line = recompute.resolve(cfg.train.activation_checkpointing, module, device, plan.micro_batch,
                                     plan.cuda_graph, loss_of, lambda n: loader.peek(n), later,
                                     recompute.limit_memory(device, cfg.train.memory_limit_gib))
    messages.append(line)
    if cfg.train.compile:
        apply_compile(module)
    if parallel == "fsdp2":
        apply_fsdp2(module, mixed_precision=compute_dtype is not None)
        return module, module, policy, messages
    if parallel == "ddp":
        return apply_ddp(module, device), module, policy, messages
    return module, module, policy, messages


def build_trainer(plan: Plan, rank: int, device):
    """Loader, model (+ init weights, parallelism), optimizer, EMA and objective; returns the
    trainer and the lines to print before training."""
    from engine.data import make_loader
    from train import loop
    from train.checkpoint import find_checkpoint, model_info
    from train.config import ConfigError

    cfg = plan.config
    backend = cfg.data.backend
    notes = []
    if backend == "auto":
        backend = "dali" if device.type == "cuda" and _dali_importable() else "torch"
        if device.type == "cuda" and backend == "torch":
            notes.append("data.backend = \"auto\": DALI is not installed (pip install nvidia-dali-cuda130), "
                         "the torch loader feeds the GPU")
    loader = make_loader(plan.cache, plan.micro_batch, rank=rank, world=plan.world, seed=cfg.train.seed,
                         backend=backend, text_len=plan.family.text_len(plan.model_config), drop_last=True,
                         device=device, workers=cfg.data.workers)
    objective = build_objective(plan)
    parallel, compute_dtype = _parallel_layout(plan, device)
    optimizer_name = loop.optimizer_name(cfg.optim, device, parallel, cfg.train.compile)
    if optimizer_name == "engine" and parallel == "fsdp2":
        raise ConfigError("optim.name = 'engine' keeps plain parameter tensors, and train.parallel = 'fsdp2' shards "
                          "them: use optim.name = 'adamw' or 'auto' with FSDP2")
    model, module, policy, messages = build_model(plan, device, objective, parallel, compute_dtype, loader,
                                                  optimizer_name)
    autocast_dtype = None if parallel == "fsdp2" else compute_dtype  # FSDP2's MixedPrecisionPolicy casts instead
    run_info = {"config": cfg.to_dict(), "model": model_info(plan.family, plan.model_config),
                "cache": _cache_identity(plan.cache), "world": plan.world, "parallel": parallel,
                "recompute": str(policy)}
    trainer = loop.Trainer(
        config=cfg, model=model, module=module, family=plan.family,
        optimizer=loop.build_optimizer(module, cfg.optim, cfg.lr(), device, optimizer_name,
                                       copy_dtype=autocast_dtype if optimizer_name == "engine" else None),
        ema=loop.EMA(module, cfg.train.ema_decay), objective=objective, loader=loader, device=device, rank=rank,
        world=plan.world, out=plan.out, run_info=run_info, autocast_dtype=autocast_dtype, cuda_graph=plan.cuda_graph,
        cuda_graph_off=plan.cuda_graph_off, recompute=str(policy))
    if plan.init is not None and plan.resume_from is None and cfg.train.init_optimizer:
        messages.append(loop.take_optimizer_state(trainer, find_checkpoint(plan.init)))
    if plan.resume_from is not None:
        loop.restore(trainer, plan.resume_from, plan.data_changed)
        messages.append(f"resumed from {plan.resume_from} (step {trainer.progress.step})")
    if cfg.log.sample_every:
        vae = (plan.cache.meta.get("vae") or {}).get("path", "pixels")
        if vae == "pixels" or Path(vae).is_dir():
            # rank 0 draws; the other ranks only take part in gathering the EMA weights
            trainer.sample_grid = _grid_writer(plan, vae, device) if rank == 0 else (lambda step, state: None)
        else:
            messages.append(f"sample grids off: the cache's VAE {vae} is not on this machine")
    params = sum(p.numel() for p in module.parameters()) / 1e6
    settings = (f"stage {cfg.stage}: {plan.family.describe(plan.model_config)} {params:.2f}M "
                f"params, {plan.world} rank(s) x {plan.micro_batch} x {trainer.accumulation} accumulation = "
                f"{cfg.train.global_batch} per step, lr {cfg.lr():.3g}, {'bf16' if compute_dtype else 'fp32'}, "
                f"parallel {parallel}, {backend} loader, {device}, "
                f"{'CUDA graph' if plan.cuda_graph else 'no CUDA graph: ' + plan.cuda_graph_off}")
    return trainer, [settings, *(plan.notes or []), *notes, *messages]


def _grid_writer(plan: Plan, vae: str, device):
    """The sample-grid callback: the family's fixed preview conditions (caption features of the
    cache's first samples, or class ids; their names go to samples/prompts.txt), decoded with the
    cache's VAE."""
    from train import sample

    cfg = plan.config
    condition, names = plan.family.preview_conditions(plan.model_config, plan.cache, cfg.log.sample_count)
    samples = plan.out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    (samples / "prompts.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    return sample.training_grid_writer(plan.family, plan.model_config, condition, sample.Decoder(vae, device),
                                       samples, cfg.log.sample_steps, cfg.log.sample_cfg, device,
                                       plan.cache.meta["latent_downsample"], cfg.train.objective,
                                       cfg.train.edm_sigma_data, cfg.log.sample_solver)


def train_in_process(config: str | Path, stage: str, data: Path, out: Path, init: Path | None = None,
                     settings: list[str] = ()) -> tuple[Plan, object]:
    """Plan, build and train ``stage`` of the run config file ``config`` in this process, as
    `run --config CONFIG --stage STAGE --data DATA --out OUT [--init INIT] [--set ...]` would on one
    process (the demo's stages). Returns (plan, trainer) after the last step; a run that stops early
    is a RuntimeError naming its metrics file."""
    from train import loop

    args = argparse.Namespace(config=str(config), preset=None, stage=stage, data=str(data), out=str(out),
                              init=str(init) if init else None, resume=False, auto_resume=False,
                              allow_data_change=False, max_steps=None, ckpt_every=None, set=list(settings))
    plan = plan_run(args)
    rank, device = init_distributed(plan.world)
    plan.out.mkdir(parents=True, exist_ok=True)
    trainer, messages = build_trainer(plan, rank, device)
    for line in messages:
        print(line, flush=True)
    try:
        code = loop.train(trainer)
    finally:
        trainer.loader.close()
    if code != 0:
        raise RuntimeError(f"stage {stage} of {config} stopped with exit code {code} (see {plan.out / 'metrics.jsonl'})")
    return plan, trainer


def main(args: argparse.Namespace) -> int:
    try:
        plan = plan_run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # ConfigError is a ValueError
        print(f"run: {error}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from train import loop

    rank, device = init_distributed(plan.world)
    trainer = None
    try:
        try:
            trainer, messages = build_trainer(plan, rank, device)
        except (ValueError, FileNotFoundError) as error:  # --init that does not load or fit: no run folder made
            print(f"run: {error}", file=sys.stderr)
            return 2
        if rank == 0:
            plan.out.mkdir(parents=True, exist_ok=True)
            for line in messages:
                print(line, flush=True)
        try:
            return loop.train(trainer)
        finally:
            trainer.loader.close()  # its reading processes stop before the process group goes
    finally:
        # The DDP / FSDP2 wrappers hold the process group, and reference cycles could keep them to
        # the interpreter's exit, where a gloo group torn down during finalization can abort the
        # process ("terminate called without an active exception"): they are freed here, before
        # the group is destroyed.
        trainer = None
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
