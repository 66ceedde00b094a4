"""Training checkpoints: atomic save, keep-last-K, resume; and loading --init weights.

A checkpoint is a folder ``OUT/checkpoints/step-0000100/``::

    model.safetensors   raw weights (fp32 master copy)
    ema.safetensors     EMA weights
    optimizer.pt        optimizer state, keyed by parameter name (torch.save; read with weights_only=True)
    state.pt            step, counters, each rank's loader position and RNG states (same)
    run.json            the run config, the model's family and config, and the cache's metadata
    COMPLETE            written last

The files go to a hidden ``.step-0000100.tmp-<pid>`` folder, each fsynced; COMPLETE is written
last; then the folder is renamed into place and its parent fsynced. A folder named ``step-*``
therefore only exists complete, and resume also requires its COMPLETE marker, so a run killed
at any moment of a save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from engine import family

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def debug_kill(point: str, step: int) -> None:
    """Test hook: ``ENGINE_DEBUG_KILL=<point>:<step>`` makes this process SIGKILL itself there
    (``after-step`` once a step and its checkpoint are done, ``mid-checkpoint`` between the
    files of a checkpoint), so tests can interrupt a run at an exact place."""
    if os.environ.get("ENGINE_DEBUG_KILL") == f"{point}:{step}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ finding

def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:07d}"


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under OUT/checkpoints, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _STEP_DIR.match(folder.name)
        if match and (folder / MARKER).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a path to one, to a run's checkpoints/ folder or to a run's
    output folder (then its newest complete checkpoint)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if path.name == CHECKPOINTS:
        path = path.parent
    found = complete_checkpoints(path)
    if not found:
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        raise FileNotFoundError(f"{path} is neither a complete checkpoint (no {MARKER} file) nor a run folder "
                                f"with complete checkpoints in {path / CHECKPOINTS}")
    return found[-1][1]


# ------------------------------------------------------------------------------ writing

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(out: Path, step: int, model_state: dict, ema_state: dict, optimizer_state: dict,
                    train_state: dict, run_info: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (see the module docstring), then delete all but the
    newest ``keep`` complete checkpoints and any unfinished ones. Call on one rank only."""
    from safetensors.torch import save_file

    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out, step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    _fsync_file(tmp / "model.safetensors")
    debug_kill("mid-checkpoint", step)
    save_file({k: v.contiguous() for k, v in ema_state.items()}, tmp / "ema.safetensors")
    _fsync_file(tmp / "ema.safetensors")
    for name, obj in (("optimizer.pt", optimizer_state), ("state.pt", train_state)):
        torch.save(obj, tmp / name)
        _fsync_file(tmp / name)
    (tmp / "run.json").write_text(json.dumps(run_info, indent=1) + "\n", encoding="utf-8")
    _fsync_file(tmp / "run.json")
    (tmp / MARKER).write_text(f"{step}\n", encoding="utf-8")
    _fsync_file(tmp / MARKER)
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted segment
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(out, keep)
    return final


def _prune(out: Path, keep: int) -> None:
    for _, folder in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(folder)
    for leftover in (Path(out) / CHECKPOINTS).glob(".step-*.tmp-*"):  # from runs killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)


# ------------------------------------------------------------------------------ reading

def read_run_info(folder: Path) -> dict:
    return json.loads((Path(folder) / "run.json").read_text(encoding="utf-8"))


def load_weights(folder: Path, ema: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(folder) / ("ema.safetensors" if ema else "model.safetensors"))


def load_training_state(folder: Path) -> tuple[dict, dict]:
    """(optimizer state, train state) of a checkpoint, read with torch.load(weights_only=True)."""
    folder = Path(folder)
    optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    return optimizer, state


def model_info(model_family: family.Family, config) -> dict:
    """run.json's "model" entry: the family's name and the config it records."""
    return {"family": model_family.name, "config": model_family.config_to_dict(config)}


def model_config_of(run_info: dict):
    """(family, model config) a checkpoint's run.json records."""
    model = run_info["model"]
    if "family" in model:
        owner = family.get(model["family"])
    else:  # run.json files that name the config class instead of the family
        owner = family.of_config_class_name(model["class"])
    return owner, owner.config_from_dict(model["config"])


def load_model(folder: Path, ema: bool = True):
    """The model of a checkpoint folder (EMA or raw weights), fp32 on the CPU."""
    folder = find_checkpoint(folder)
    owner, config = model_config_of(read_run_info(folder))
    model = owner.build(config)
    model.load_state_dict(load_weights(folder, ema))
    return model


# ------------------------------------------------------------------------------ --init

def read_init(path: str | os.PathLike, use_ema: bool = True):
    """What --init names, read: an engine checkpoint or run folder becomes its model (its EMA
    weights unless ``use_ema`` is False, of whatever family it holds); any other path stays a Path
    for the module's family to read (official releases, diffusers folders: the family knows its
    formats)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--init {path} does not exist")
    if (path / MARKER).is_file() or (path / CHECKPOINTS).is_dir() or path.name == CHECKPOINTS:
        return load_model(path, ema=use_ema)
    return path


def load_init(module, path: str | os.PathLike, use_ema: bool = True, objective=None, source=None) -> str:
    """Initialise ``module`` from ``path`` (``source``: read_init(path) when already read) and
    return a line saying what was loaded. ``objective`` is the run's, for conversions between
    families that pin the two models together at a noise level (engine.family.Family.init)."""
    source = read_init(path, use_ema) if source is None else source
    try:
        how = family.of_model(module).init(module, source, objective)
    except ValueError as error:
        raise ValueError(f"--init {path}: {error}") from None
    return f"initialised from {path}: {how}"
