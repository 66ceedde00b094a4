"""Model families as plug-ins: what `python -m train` needs to know about a model, in one object.

A family (PixArt-α's text-to-image transformer, the class-conditional DiT of its first stage, ...)
is a ``Family`` subclass registered under a name. It declares its config class and presets, how
to build the model, how a batch becomes the model's conditioning (and its null conditioning for
guidance), which noise-level input the model takes, its FLOPs, how it is initialised from
checkpoints in other formats, and how it exports. ``train/`` talks to families only through this
interface; which family a stage trains, at which resolution, on which data, is said by the run
config (train/configs/*.toml), never by train/ code.

Families come from three places: the built-in ones below, installed packages that declare an
entry point in the group ``engine.families`` (the entry point names a module to import, or a
``Family`` instance or subclass), and the modules named in the ``ENGINE_FAMILIES`` environment
variable (comma-separated, imported on first use, e.g. a family defined in a user's own file).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# No torch import at module level: `python -m train --help` lists the families and stays fast.
ENTRY_POINT_GROUP = "engine.families"
BUILTIN_MODULES = ("engine.family.pixart", "engine.family.dit", "engine.family.microdit")


@dataclass(frozen=True)
class Preset:
    """A named config: the fields it fixes and the image size (pixels) it is made for by default."""

    fields: dict
    resolution: int
    description: str = ""


class Family:
    """Base class of a model family; subclasses set the class attributes and override the methods
    that raise NotImplementedError. Instances are stateless: one per family, shared."""

    name: str = ""
    description: str = ""
    config_class: type = object
    presets: dict[str, Preset] = {}
    condition: str = "caption"     # what a sample is conditioned on: "caption" (text features) or "label"
    exporters: tuple[str, ...] = ()  # formats `train export --to FORMAT` writes (see export())

    # ---------------------------------------------------------------- configs and models

    def make_config(self, preset: str, resolution: int, overrides: dict):
        """The config of ``preset`` at ``resolution`` pixels with ``overrides`` (field -> value)."""
        from engine.config import latent_size

        fields = dict(self.presets[preset].fields, input_size=latent_size(resolution))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self.config_class)}
        if unknown:
            raise ValueError(f"unknown {self.config_class.__name__} field(s) {sorted(unknown)}")
        return self.config_class(**{**fields, **overrides})

    def config_from_dict(self, values: dict):
        """The config a checkpoint's run.json records (``config_to_dict``'s output)."""
        return self.config_class(**values)

    def config_to_dict(self, config) -> dict:
        return dataclasses.asdict(config)

    def build(self, config) -> torch.nn.Module:
        raise NotImplementedError

    def describe(self, config) -> str:
        """A few words for the run's first log line, e.g. the model class."""
        return type(config).__name__.removesuffix("Config")

    # ---------------------------------------------------------------- data

    def text_len(self, config) -> int:
        """Caption tokens a batch is padded to (1 for families without text: the loader's minimum)."""
        return 1

    def check_cache(self, config, cache) -> None:
        """Reject a latent cache this family cannot train on, naming the field (ValueError)."""

    # ---------------------------------------------------------------- training

    def prepare_training(self, module: torch.nn.Module) -> None:
        """Called once on the unwrapped model before parallelism and compile are applied."""

    def training_conditions(self, module: torch.nn.Module, batch: dict, generator: torch.Generator, train) -> dict:
        """The model's keyword arguments for one micro-batch, with the condition dropout drawn
        from ``generator`` (the step's per-micro-batch generator) first. ``train`` is the run
        config's train section (its dropout rates)."""
        raise NotImplementedError

    def learns_variance(self, config) -> bool:
        """Whether the model also predicts IDDPM's variance (twice the input channels out)."""
        return False

    def flops(self, module: torch.nn.Module, batch: dict, train) -> float:
        """Training FLOPs of one micro-batch (forward + backward, docs/design.md §10); ``train`` is
        the run config's train section (e.g. its mask ratio)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- sampling

    def preview_conditions(self, config, cache, count: int) -> tuple[list, list[str]]:
        """Fixed conditions for the sample grids written during training, and a name for each
        (at most ``count``): caption features taken from ``cache``, or class ids."""
        raise NotImplementedError

    def sampling_conditions(self, model: torch.nn.Module, count: int, condition, pixels_per_latent: int,
                            device) -> dict:
        """Keyword arguments to draw ``count`` images of ``condition``: a dict of caption features
        (``caption`` (B, L, C) zero-padded, ``caption_lens`` (B,)) or a (B,) tensor of labels."""
        raise NotImplementedError

    def null_conditions(self, model: torch.nn.Module, count: int) -> dict:
        """The unconditional keyword arguments classifier-free guidance contrasts with."""
        raise NotImplementedError

    # ---------------------------------------------------------------- checkpoints

    def init(self, module: torch.nn.Module, source, objective) -> str:
        """Initialise ``module`` in place from ``source`` and return how (a few words).

        ``source`` is a model of any registered family (read from an engine checkpoint) or a
        Path to a file or folder in a format this family reads (official releases, diffusers).
        ``objective`` is the run's objective (a conversion between families may need the noise
        level at which the two models should agree). Raise ValueError for what does not fit."""
        raise ValueError(f"family {self.name!r} cannot be initialised from {source}")

    @staticmethod
    def copy_weights(module: torch.nn.Module, weights: dict, may_stay_fresh=lambda key: False) -> list[str]:
        """Load ``weights`` into ``module`` after checking they fit: every key known, every shape
        equal, every missing key one that ``may_stay_fresh`` allows (it keeps its own init).
        Returns the keys left fresh; a misfit is a ValueError listing what differs."""
        mine = module.state_dict()
        fresh = [k for k in mine if k not in weights]
        missing = sorted(k for k in fresh if not may_stay_fresh(k))
        unexpected = [k for k in weights if k not in mine]
        wrong = [f"{k}: {tuple(weights[k].shape)} vs {tuple(mine[k].shape)}"
                 for k in weights if k in mine and weights[k].shape != mine[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"does not fit the model {module.config}: missing {missing}, unexpected {unexpected}, "
                             f"wrong shapes {wrong}")
        module.load_state_dict(weights, strict=False)
        return fresh

    def export(self, model: torch.nn.Module, fmt: str, path: Path) -> str:
        """Write ``model`` in format ``fmt`` (one of ``exporters``) to ``path``; returns what was written."""
        raise ValueError(f"family {self.name!r} exports no format {fmt!r}")


# ------------------------------------------------------------------------------ registry

_FAMILIES: dict[str, Family] = {}
_discovered = False


def register(family: Family | type) -> Family:
    """Register a family (an instance, or a subclass to instantiate); usable as a class decorator.
    A name or preset already taken by another family is an error."""
    instance = family() if isinstance(family, type) else family
    if not isinstance(instance, Family) or not instance.name:
        raise TypeError(f"register() takes a Family with a name, got {family!r}")
    current = _FAMILIES.get(instance.name)
    if current is not None and type(current) is not type(instance):
        raise ValueError(f"model family {instance.name!r} is already registered ({type(current).__qualname__})")
    for other in _FAMILIES.values():
        taken = set(other.presets) & set(instance.presets) if other.name != instance.name else set()
        if taken:
            raise ValueError(f"family {instance.name!r}: preset(s) {sorted(taken)} already belong to {other.name!r}")
    _FAMILIES[instance.name] = instance
    return family


def _discover() -> None:
    """Import the built-in families, the entry points and ENGINE_FAMILIES' modules, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()
        if isinstance(loaded, Family) or (isinstance(loaded, type) and issubclass(loaded, Family)):
            register(loaded)
    for module in filter(None, (m.strip() for m in os.environ.get("ENGINE_FAMILIES", "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(f"ENGINE_FAMILIES names module {module!r}, which does not import: {error}") from error


def names() -> list[str]:
    _discover()
    return sorted(_FAMILIES)


def get(name: str) -> Family:
    _discover()
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {names()}")
    return _FAMILIES[name]


def preset_names() -> list[str]:
    _discover()
    return sorted(p for family in _FAMILIES.values() for p in family.presets)


def of_preset(preset: str) -> Family:
    _discover()
    for family in _FAMILIES.values():
        if preset in family.presets:
            return family
    raise ValueError(f"unknown preset {preset!r}; choose one of {preset_names()}")


def of_config(config) -> Family:
    """The family whose config class ``config`` is an instance of."""
    _discover()
    for family in _FAMILIES.values():
        if type(config) is family.config_class:
            return family
    raise ValueError(f"no registered model family has config class {type(config).__name__}")


def of_model(model: torch.nn.Module) -> Family:
    """The family of a built model (its ``config`` attribute)."""
    return of_config(getattr(model, "config", None))


def of_config_class_name(class_name: str) -> Family:
    """The family whose config class is called ``class_name`` (run.json files that record the
    config class rather than the family)."""
    _discover()
    for family in _FAMILIES.values():
        if family.config_class.__name__ == class_name:
            return family
    raise ValueError(f"no registered model family has config class {class_name!r}; families: {names()}")


def catalogue() -> str:
    """Families and their presets, one line each (for --help)."""
    _discover()
    return "\n".join(f"  {family.name}: {family.description} (presets: {', '.join(sorted(family.presets))})"
                     for family in sorted(_FAMILIES.values(), key=lambda f: f.name))
