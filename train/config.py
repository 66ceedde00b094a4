"""Typed run configs for `python -m train run`, loaded from TOML or JSON files.

A config file holds the settings shared by all stages at its top level and, under
``[stages.<name>]``, what each stage changes (same tables, deep-merged over the top level)::

    [model]
    preset = "tiny"                # a model preset (engine.family)
    [train]
    global_batch = 256
    [stages.2.train]
    steps = 150_000

``load_run_config(path, stage)`` merges the stage over the base and builds a RunConfig; an
unknown key anywhere is an error that names it and suggests the closest valid key. What a stage
trains is what its tables say: the model preset (and so the model family, engine.family), the
resolution, the data settings; the code gives stage names no meaning. Run presets are the files
in train/configs/ (``--preset NAME`` reads train/configs/NAME.toml).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from engine import family
from engine.config import preset
from engine.recompute import Recompute

CONFIG_DIR = Path(__file__).parent / "configs"
OBJECTIVES = ("iddpm", "edm")
SAMPLE_SOLVERS = ("dpm", "heun")  # DPM-Solver++ (any objective); Karras et al.'s Heun (EDM only)
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("auto", "none", "ddp", "fsdp2")
CUDA_GRAPH = ("auto", "on", "off")
OPTIMIZERS = ("auto", "adamw", "engine", "apex")
LR_SCALING = ("sqrt", "linear", "none")
LR_SCHEDULES = ("constant", "cosine")
LOADER_BACKENDS = ("auto", "torch", "dali")
_STAGE_NAME = re.compile(r"[A-Za-z0-9._-]+")


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the key."""


@dataclass
class ModelSection:
    preset: str = "tiny"                   # a model preset (engine.family: its family builds the model)
    resolution: int = 256                  # training image size in pixels (the cache's resolution)
    pe_interpolation: float | None = None  # None: the preset's rule (resolution / 512)
    fields: dict = field(default_factory=dict)  # further overrides of the preset's config fields


@dataclass
class DataSection:
    pixels: bool = False        # the cache holds pixels (`prepare --vae pixels`), not VAE latents
    multi_aspect: bool = False  # the cache has aspect-ratio buckets (stage 3)
    backend: str = "auto"       # loader: dali on CUDA where it is installed, torch otherwise
    workers: int = 2            # loader worker processes


@dataclass
class OptimSection:
    # adamw: torch's AdamW (fused on CUDA); engine: engine.optim.AdamW, the same update in one
    # Triton pass that also writes the bf16 weight copies the Linears read (not for FSDP2-sharded
    # parameters); apex: apex FusedAdam; auto: engine on CUDA unless the model is FSDP2-sharded or
    # compiled (compiled Linears cast themselves), adamw otherwise.
    name: str = "auto"
    lr: float = 2e-5             # before batch scaling
    lr_scaling: str = "sqrt"     # lr * sqrt(global_batch / lr_base_batch)
    lr_base_batch: int = 256
    warmup_steps: int = 1000     # linear warm-up to the peak lr (train.loop.lr_at)
    # warm-up step s (from 0) trains at peak (s + 1) / warmup_steps; true: peak s / warmup_steps, so
    # the first step has lr 0 and only fills Adam's moments (composer's and diffusers' warm-ups)
    warmup_from_zero: bool = False
    # after the warm-up: "constant" (the peak), or "cosine": half a cosine from the peak down to
    # lr_floor x peak, reached at step decay_steps (0: train.steps), the floor after it
    schedule: str = "constant"
    lr_floor: float = 0.0        # cosine: the lr it ends at, as a fraction of the peak
    decay_steps: int = 0         # cosine: the step it ends at; 0 = train.steps
    weight_decay: float = 0.03
    eps: float = 1e-10
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.01      # max global grad norm; 0 = off


@dataclass
class TrainSection:
    steps: int = 1000
    global_batch: int = 256      # images per optimizer step, all ranks and accumulation together
    micro_batch: int = 0         # images per rank per forward; 0 = global_batch / world (no accumulation)
    seed: int = 0
    objective: str = "iddpm"
    edm_p_mean: float = -1.2     # objective "edm": ln(sigma) ~ N(edm_p_mean, edm_p_std^2) in training (Karras et al.)
    edm_p_std: float = 1.2
    edm_sigma_data: float = 0.5  # objective "edm": the data's standard deviation in the preconditioning (EDM paper: 0.5)
    ema_decay: float = 0.9999
    # the EMA is a copy of the weights over the first ema_start steps, then averages with
    # ema_decay (0: it averages from the first step on, starting at the initial weights)
    ema_start: int = 0
    caption_dropout: float = 0.1  # caption-conditioned families: caption -> the model's null caption
    label_dropout: float = 0.1    # label-conditioned families: label -> the null class
    mask_ratio: float = 0.0       # families with deferred masking: share of patch tokens dropped after the mixer
    precision: str = "auto"       # bf16 on CUDA, fp32 on CPU
    parallel: str = "auto"        # under torchrun: ddp; alone: none
    # recompute in the backward (engine.recompute): "auto" = the least that fits the GPU's memory
    # at the micro-batch, measured before training; "off" / 0; k = whole blocks, every k-th;
    # "PART[,PART][/k]" = those submodules of every (k-th) block, e.g. "mlp" or "block/2"
    activation_checkpointing: int | str = "auto"
    # GiB of GPU memory the run may allocate (the caching allocator enforces it, "auto" recompute
    # plans for it); 0 = the whole device. E.g. 79 to hold an 80 GB card's limit on a larger one.
    memory_limit_gib: float = 0.0
    compile: bool = False
    cuda_graph: str = "auto"      # forward + backward replayed as one CUDA graph; auto: where train/run.py allows
    max_nonfinite_steps: int = 20  # this many skipped steps in a row save and stop the run
    init_ema: bool = True          # --init from an engine checkpoint takes its EMA weights
    # a stage that continues an earlier one: --init is required, and an engine checkpoint given
    # to it must come from a run of this stage name ("" = --init optional, from any stage)
    init_from_stage: str = ""
    # --init from an engine checkpoint of the same model also takes its optimizer state (Adam's
    # moments and step counts; the lr, betas, eps and weight decay stay this config's)
    init_optimizer: bool = False


@dataclass
class CheckpointSection:
    every: int = 1000  # steps; 0 = only at the end
    keep: int = 3      # complete checkpoints kept (the newest)


@dataclass
class LogSection:
    every: int = 10          # steps per JSONL line
    tensorboard: bool = False  # also TensorBoard event files (the optional `tensorboard` extra)
    sample_every: int = 0    # steps per sample grid; 0 = off
    sample_count: int = 8    # images in a grid (fixed prompts / labels)
    sample_steps: int = 20
    sample_cfg: float = 4.5
    sample_solver: str = "dpm"  # SAMPLE_SOLVERS: the training grids' and `train sample`'s default


@dataclass
class RunConfig:
    stage: str = "2"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def model_config(self):
        """The engine model config this run trains."""
        m = self.model
        overrides = dict(m.fields)
        if self.data.pixels:  # the "latent" is the image: 3 channels, no 8x downsampling
            overrides.setdefault("in_channels", 3)
            overrides.setdefault("input_size", m.resolution)
        if m.pe_interpolation is not None:
            overrides["pe_interpolation"] = m.pe_interpolation
        try:
            owner = family.of_preset(m.preset)
            hints = typing.get_type_hints(owner.config_class)
            overrides = {key: _coerce(f"model.fields.{key}", value, hints[key]) if key in hints else value
                         for key, value in overrides.items()}
            return preset(m.preset, m.resolution, **overrides)
        except ConfigError:
            raise
        except (ValueError, TypeError) as error:
            raise ConfigError(f"model: {error}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lr(self) -> float:
        """Peak learning rate after batch scaling: optim.lr x (global_batch / lr_base_batch) to the
        power 1/2 ("sqrt"), 1 ("linear") or 0 ("none"); each run config in train/configs gives the
        source of the rule it uses."""
        o, ratio = self.optim, self.train.global_batch / self.optim.lr_base_batch
        return o.lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[o.lr_scaling]


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r}: choose one of {list(choices)}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(f"{name} = {value!r}: expected an integer >= {0 if allow_zero else 1}")


def _fraction(name: str, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} = {value!r}: expected a value in [0, 1]")


def validate(config: RunConfig) -> RunConfig:
    """Check value ranges and cross-field rules; returns the config."""
    if not _STAGE_NAME.fullmatch(config.stage):
        raise ConfigError(f"stage {config.stage!r}: stage names are letters, digits, '.', '_' and '-'")
    t, o, d = config.train, config.optim, config.data
    for name, value in (("train.steps", t.steps), ("train.global_batch", t.global_batch),
                        ("train.max_nonfinite_steps", t.max_nonfinite_steps),
                        ("model.resolution", config.model.resolution),
                        ("optim.lr_base_batch", o.lr_base_batch), ("checkpoint.keep", config.checkpoint.keep),
                        ("log.every", config.log.every), ("log.sample_count", config.log.sample_count),
                        ("log.sample_steps", config.log.sample_steps)):
        _positive(name, value)
    for name, value in (("train.micro_batch", t.micro_batch),
                        ("optim.warmup_steps", o.warmup_steps), ("optim.decay_steps", o.decay_steps),
                        ("train.ema_start", t.ema_start), ("checkpoint.every", config.checkpoint.every),
                        ("log.sample_every", config.log.sample_every), ("data.workers", d.workers),
                        ("train.seed", t.seed)):
        _positive(name, value, allow_zero=True)
    _choice("train.objective", t.objective, OBJECTIVES)
    _choice("log.sample_solver", config.log.sample_solver, SAMPLE_SOLVERS)
    if config.log.sample_solver == "heun" and t.objective != "edm":
        raise ConfigError(f'log.sample_solver = "heun" samples EDM-trained models; train.objective is {t.objective!r}')
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.parallel", t.parallel, PARALLEL)
    _choice("train.cuda_graph", t.cuda_graph, CUDA_GRAPH)
    _choice("optim.name", o.name, OPTIMIZERS)
    _choice("optim.lr_scaling", o.lr_scaling, LR_SCALING)
    _choice("optim.schedule", o.schedule, LR_SCHEDULES)
    _choice("data.backend", d.backend, LOADER_BACKENDS)
    if t.activation_checkpointing != "auto":
        try:
            Recompute.parse(t.activation_checkpointing)
        except ValueError as error:
            raise ConfigError(f"train.activation_checkpointing: {error} (or \"auto\")") from None
    _finite_floats(config, "")
    for name, value in (("train.ema_decay", t.ema_decay), ("train.caption_dropout", t.caption_dropout),
                        ("train.label_dropout", t.label_dropout), ("optim.lr_floor", o.lr_floor)):
        _fraction(name, value)
    if not 0.0 <= t.mask_ratio < 1.0:
        raise ConfigError(f"train.mask_ratio = {t.mask_ratio!r}: expected a value in [0, 1)")
    for name, value, low, inclusive in (("optim.lr", o.lr, 0.0, False), ("optim.eps", o.eps, 0.0, False),
                                        ("train.edm_p_std", t.edm_p_std, 0.0, False),
                                        ("train.edm_sigma_data", t.edm_sigma_data, 0.0, False),
                                        ("optim.weight_decay", o.weight_decay, 0.0, True),
                                        ("train.memory_limit_gib", t.memory_limit_gib, 0.0, True),
                                        ("optim.grad_clip", o.grad_clip, 0.0, True),
                                        ("log.sample_cfg", config.log.sample_cfg, 0.0, True)):
        if not (value >= low if inclusive else value > low):
            raise ConfigError(f"{name} = {value!r}: expected a value {'>=' if inclusive else '>'} {low:g}")
    if t.init_from_stage and not _STAGE_NAME.fullmatch(t.init_from_stage):
        raise ConfigError(f"train.init_from_stage = {t.init_from_stage!r}: a stage name (letters, digits, '.', '_', "
                          f"'-') or \"\" for none")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas = {list(o.betas)}: expected two values in [0, 1)")
    if config.model.pe_interpolation is not None and not config.model.pe_interpolation > 0:
        raise ConfigError(f"model.pe_interpolation = {config.model.pe_interpolation!r}: expected a value > 0")
    config.model_config()  # the preset exists and takes the fields
    return config


def _finite_floats(section, where: str) -> None:
    """Every float of the config, model.fields' included, is finite (nan / inf pass TOML and JSON)."""
    items = dataclasses.asdict(section).items() if dataclasses.is_dataclass(section) else section.items()
    for key, value in items:
        name = f"{where}{key}"
        if isinstance(value, dict):
            _finite_floats(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{name}[{i}] = {v!r}: expected a finite number")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} = {value!r}: expected a finite number")


# ------------------------------------------------------------------------------------ loading

def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: invalid JSON: {error}") from None
    if path.suffix == ".toml":
        import tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML: {error}") from None
    raise ConfigError(f"{path}: config files are .toml or .json")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _unknown_key(where: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {where + close[0]!r}?" if close else f"; valid keys here: {sorted(valid)}"
    return ConfigError(f"unknown config key {where + key!r}{hint}")


def _coerce(name: str, value, annotation):
    """Check a TOML/JSON value against a dataclass field annotation (ints widen to floats)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        for option in options[:-1]:  # the first option the value passes, else the last one's error
            try:
                return _coerce(name, value, option)
            except ConfigError:
                pass
        annotation = options[-1]
        origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{name} = {value!r}: expected a finite number")
        return float(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        kinds = typing.get_args(annotation)
        if len(value) != len(kinds):
            raise ConfigError(f"{name} = {list(value)!r}: expected {len(kinds)} values")
        return tuple(_coerce(f"{name}[{i}]", v, kind) for i, (v, kind) in enumerate(zip(value, kinds)))
    expected = origin or annotation
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{name} = {value!r}: expected {getattr(expected, '__name__', expected)}")
    return value


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the config'} must be a table of keys and values, got "
                          f"{type(values).__name__} {values!r:.60}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            raise _unknown_key(where, key, valid)
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a table")
            kwargs[key] = _build(hints[key], value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(f"{where}{key}", value, hints[key])
    return cls(**kwargs)


def run_config_from_dict(values: dict) -> RunConfig:
    """A RunConfig from a plain dict (a merged config, or one saved in a checkpoint)."""
    return validate(_build(RunConfig, values, ""))


def stage_names(raw: dict) -> list[str]:
    return sorted(str(name) for name in raw.get("stages", {}))


def parse_setting(setting: str) -> tuple[list[str], object]:
    """``"train.steps=100"`` -> (["train", "steps"], 100); the value is read as a TOML value
    (numbers, true/false, "strings", [arrays], {tables}), or taken as a bare string."""
    import tomllib

    key, sep, text = setting.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {setting!r}: expected KEY=VALUE, e.g. train.micro_batch=32")
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip().split("."), value


def _nested(keys: list[str], value) -> dict:
    out = value
    for key in reversed(keys):
        out = {key: out}
    return out


def load_run_config(path: str | Path, stage: str, settings: list[str] = ()) -> RunConfig:
    """The run config of ``stage`` in the TOML/JSON file ``path``, with ``settings``
    ("section.key=value", e.g. from --set) applied last."""
    path = Path(path)
    raw = _read(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a table of sections ([model], [train], ...), got a "
                          f"{type(raw).__name__}")
    if not isinstance(raw.get("stages", {}), dict):
        raise ConfigError(f"{path}: 'stages' must be a table of stage tables")
    stages = {str(name): value for name, value in raw.pop("stages", {}).items()}
    if "stage" in raw:
        raise ConfigError(f"{path}: the stage comes from --stage, not from the file's 'stage' key")
    if stages and stage not in stages:
        subs = [name for name in stages if name.startswith(stage)]
        hint = f" (stage {stage} has sub-stages {subs}: pass one)" if subs else ""
        raise ConfigError(f"{path} has no stage {stage!r}{hint}; its stages: {sorted(stages)}")
    merged = _merge(raw, stages.get(stage, {}))
    for setting in settings:
        merged = _merge(merged, _nested(*parse_setting(setting)))
    merged["stage"] = stage
    try:
        return run_config_from_dict(merged)
    except ConfigError as error:
        raise ConfigError(f"{path} (stage {stage}): {error}") from None


def preset_path(name: str) -> Path:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown run preset {name!r}{hint}; presets: {names} (files in {CONFIG_DIR})")
    return CONFIG_DIR / f"{name}.toml"
