"""Training checkpoints: atomic save, keep-last-K, resume; and loading --init weights.

A checkpoint is a folder ``OUT/checkpoints/step-0000100/``::

    model.safetensors   raw weights (fp32 master copy)
    ema.safetensors     EMA weights
    optimizer.pt        optimizer state, keyed by parameter name (torch.save; read with weights_only=True)
    state.pt            step, counters, each rank's loader position and RNG states (same)
    run.json            the run config, the model config and the cache's metadata
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

from engine.config import DiTConfig, PixArtConfig
from engine.model import DiT, PixArt, build_model

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


def model_config_of(run_info: dict) -> PixArtConfig | DiTConfig:
    """The model config a checkpoint's run.json records."""
    classes = {"PixArtConfig": PixArtConfig, "DiTConfig": DiTConfig}
    kind = run_info["model"]["class"]
    if kind not in classes:
        raise ValueError(f"unknown model config class {kind!r} in run.json")
    return classes[kind](**run_info["model"]["config"])


def load_model(folder: Path, ema: bool = True) -> PixArt | DiT:
    """The model of a checkpoint folder (EMA or raw weights), fp32 on the CPU."""
    folder = find_checkpoint(folder)
    model = build_model(model_config_of(read_run_info(folder)))
    model.load_state_dict(load_weights(folder, ema))
    return model


# ------------------------------------------------------------------------------ --init

def _keys(path: Path) -> set[str]:
    """Key set of a foreign checkpoint file, the keys of nested training dicts included."""
    from engine.interop import read_checkpoint

    checkpoint = read_checkpoint(path)
    keys = set(checkpoint)
    for value in checkpoint.values():
        if isinstance(value, dict):
            keys |= set(value)
    return {k.removeprefix("module.") for k in keys}  # DDP-saved files prefix every key


def _source_model(path: Path, target: PixArtConfig | DiTConfig, use_ema: bool) -> tuple[PixArt | DiT, str]:
    """Read --init into an engine model of whatever kind the file holds; returns (model, format)."""
    if (path / "config.json").is_file() or (path / "transformer" / "config.json").is_file():
        from diffusers import PixArtTransformer2DModel

        from engine.interop.diffusers import from_diffusers
        folder = path if (path / "config.json").is_file() else path / "transformer"
        return from_diffusers(PixArtTransformer2DModel.from_pretrained(folder)), "diffusers"
    if path.is_dir():
        return load_model(path, ema=use_ema), "engine"  # an engine checkpoint or run folder
    if not path.is_file():
        raise FileNotFoundError(f"--init {path} does not exist")
    keys = _keys(path)
    if "y_embedder.embedding_table.weight" in keys:
        from engine.interop import dit
        overrides = {"num_heads": target.num_heads}
        if "pos_embed" not in keys:
            overrides["input_size"] = target.input_size
        return dit.load(path, **overrides), "facebookresearch/DiT"
    if "y_embedder.y_proj.fc1.weight" in keys:
        from engine.interop import pixart_official
        overrides = {"num_heads": target.num_heads}
        if "pos_embed" not in keys:
            overrides["input_size"] = target.input_size
        return pixart_official.load(path, **overrides), "official PixArt-α"
    raise ValueError(f"--init {path}: not a facebookresearch/DiT checkpoint (no y_embedder.embedding_table) nor an "
                     f"official PixArt-α one (no y_embedder.y_proj); other accepted inits: an engine checkpoint "
                     f"folder or run folder, a diffusers PixArtTransformer2DModel folder")


def load_init(model: PixArt | DiT, path: str | os.PathLike, use_ema: bool = True) -> str:
    """Initialise ``model`` from ``path`` and return a line saying what was loaded.

    DiT -> DiT and PixArt -> PixArt copy every tensor (position embeddings are computed, so a
    checkpoint trained at another resolution loads unchanged). DiT -> PixArt goes through
    PixArt-α's re-parameterisation (engine.interop.reparam). A PixArt without micro-conditions
    loaded into one with them keeps fresh size / aspect embedders whose output layers start at
    zero, so the loaded model's predictions are unchanged at the start of stage 3. A diffusers
    model has no learned null caption: the model keeps its own.
    """
    from engine.interop.reparam import dit_to_pixart

    path = Path(path)
    source, fmt = _source_model(path, model.config, use_ema)
    target = model.config
    if isinstance(target, DiTConfig) and not isinstance(source, DiT):
        raise ValueError(f"--init {path} holds a {type(source).__name__}; stage 1 trains a class-conditional DiT")
    how = f"{fmt} weights copied"
    if isinstance(source, DiT) and isinstance(target, PixArtConfig):
        source = dit_to_pixart(source.float(), target)
        how = f"{fmt} weights re-parameterised into PixArt (engine.interop.reparam.dit_to_pixart)"
    weights = {k: v.float() for k, v in source.state_dict().items()}
    if fmt == "diffusers":
        del weights["null_caption"]  # from_diffusers made up a random one
    mine = model.state_dict()
    fresh = [k for k in mine if k not in weights]
    allowed_fresh = [k for k in fresh if k.startswith(("size_embed.", "aspect_embed.")) or k == "null_caption"]
    unexpected = [k for k in weights if k not in mine]
    wrong = [f"{k}: {tuple(weights[k].shape)} vs {tuple(mine[k].shape)}"
             for k in weights if k in mine and weights[k].shape != mine[k].shape]
    if unexpected or wrong or len(allowed_fresh) != len(fresh):
        missing = sorted(set(fresh) - set(allowed_fresh))
        raise ValueError(f"--init {path} does not fit the model {target}: missing {missing}, unexpected {unexpected}, "
                         f"wrong shapes {wrong}")
    model.load_state_dict(weights, strict=False)
    if any(k.startswith("size_embed.") for k in allowed_fresh):
        with torch.no_grad():
            for embedder in (model.size_embed, model.aspect_embed):
                embedder.fc2.weight.zero_()
                embedder.fc2.bias.zero_()
        how += "; new micro-condition embedders start with zero output"
    return f"initialised from {path}: {how}"
