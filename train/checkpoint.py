"""Training checkpoints: atomic, verified saves, keep-last-K, resume; and loading --init weights.

A checkpoint is a folder ``OUT/checkpoints/step-0000100/``::

    model.safetensors   raw weights (fp32 master copy)
    ema.safetensors     EMA weights
    optimizer.pt        optimizer state, keyed by parameter name (torch.save; read with weights_only=True)
    state.pt            step, counters, each rank's loader position and RNG states (same)
    run.json            the run config, the model's family and config, and the cache's metadata
    manifest.json       each file's size and SHA-256, and whether the weights are all finite
    COMPLETE            written last

The files go to a hidden ``.step-0000100.tmp-<pid>`` folder, each fsynced; COMPLETE is written
last; then the folder is renamed into place and its parent fsynced. A folder named ``step-*``
therefore only exists complete, and resume also requires its COMPLETE marker, so a run killed
at any moment of a save resumes from the previous checkpoint. Every file is checked against the
manifest before it is loaded (a flipped byte or a truncated file is an error naming the file),
resume takes the newest checkpoint that verifies and says which ones it passed over and why, and
rotation never deletes the newest checkpoint whose weights are finite.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from engine import family

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
MANIFEST = "manifest.json"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def debug_kill(point: str, step: int) -> None:
    """Test hook: ``ENGINE_DEBUG_KILL=<point>:<step>`` makes this process SIGKILL itself there
    (``after-step`` once a step and its checkpoint are done, ``mid-checkpoint`` between the
    files of a checkpoint), so tests can interrupt a run at an exact place. ``<point>:<step>@<rank>``
    kills that rank only (torchrun's RANK), and only in the first attempt of an elastic job
    (TORCHELASTIC_RESTART_COUNT 0 or unset): one fault, which the restart then recovers from."""
    wanted = os.environ.get("ENGINE_DEBUG_KILL")
    if wanted is None:
        return
    spot, _, rank = wanted.partition("@")
    if spot != f"{point}:{step}":
        return
    if rank and (rank != os.environ.get("RANK", "0") or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        return
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


class CheckpointError(ValueError):
    """A checkpoint that does not verify: the message names the folder, the file and what is wrong."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def _remove_unfinished(root: Path) -> None:
    """Temporary folders of saves that never finished (a kill, a full disk)."""
    for leftover in root.glob(".step-*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _check_free_space(root: Path, step: int, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"checkpoint step {step} needs about {needed / 2**30:.2f} GiB and {root} has "
                                    f"{free / 2**30:.2f} GiB free: free space there or lower checkpoint.keep", str(root))


def save_checkpoint(out: Path, step: int, model_state: dict, ema_state: dict, optimizer_state: dict,
                    train_state: dict, run_info: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (see the module docstring), then delete all but the
    newest ``keep`` complete checkpoints (keeping the newest finite one) and any unfinished ones.
    The free space is checked first; a failed write leaves no temporary folder behind. Call on
    one rank only."""
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_unfinished(root)
    # the tensors' bytes, plus room for headers, pickling and the small files
    needed = _tensor_bytes([model_state, ema_state, optimizer_state, train_state]) + (64 << 20)
    _check_free_space(root, step, needed)
    final = checkpoint_dir(out, step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        _write_files(tmp, step, model_state, ema_state, optimizer_state, train_state, run_info)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(error.errno, f"writing checkpoint {final}: {error.strerror or error}", str(tmp)) from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted segment
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(out, keep)
    return final


def _write_files(tmp: Path, step: int, model_state: dict, ema_state: dict, optimizer_state: dict,
                 train_state: dict, run_info: dict) -> None:
    from safetensors.torch import save_file

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
    files = ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.pt", "run.json")
    manifest = {"step": step, "finite": all_finite(model_state) and all_finite(ema_state),
                "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                          for name in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    _fsync_file(tmp / MANIFEST)
    (tmp / MARKER).write_text(f"{step}\n", encoding="utf-8")
    _fsync_file(tmp / MARKER)
    _fsync_dir(tmp)


def _prune(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, except the newest one whose
    weights are finite and whose files are all there at their recorded sizes: after a run that
    ended in inf / NaN it is the one to go back to."""
    done = complete_checkpoints(out)
    protected = next((folder for _, folder in reversed(done) if _finite_and_whole(folder)), None)
    for _, folder in done[:-keep]:
        if folder != protected:
            shutil.rmtree(folder)
    _remove_unfinished(Path(out) / CHECKPOINTS)


def _finite_and_whole(folder: Path) -> bool:
    try:
        manifest = read_manifest(folder)
        verify(folder, hashes=False)
    except CheckpointError:
        return False
    return manifest is not None and manifest["finite"]


# ------------------------------------------------------------------------------ reading

def read_run_info(folder: Path) -> dict:
    return json.loads((Path(folder) / "run.json").read_text(encoding="utf-8"))


def read_manifest(folder: Path) -> dict | None:
    """The checkpoint's manifest; None for a checkpoint written before manifests existed."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("finite"), bool):
            raise ValueError("no 'files' table or 'finite' flag")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is unreadable ({error})") from None
    return manifest


_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files hashed in this process


def verify(folder: Path, names=None, hashes: bool = True) -> None:
    """Check the files ``names`` (default all) of a checkpoint against its manifest: present, of the
    recorded size and (``hashes``) SHA-256. Raises CheckpointError naming the file and the fault.
    A file is hashed once per process (resume checks everything, then loads it)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for name in names or manifest["files"]:
        entry = manifest["files"].get(name)
        path = folder / name
        if entry is None:
            raise CheckpointError(f"checkpoint {folder}: {name} is not in its {MANIFEST}")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {folder}: {name} has {size} bytes, {entry['bytes']} were written "
                                  f"(truncated or overwritten)")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if hashes and key not in _VERIFIED:
            if _sha256(path) != entry["sha256"]:
                raise CheckpointError(f"checkpoint {folder}: {name} does not match its SHA-256 in {MANIFEST} (its "
                                      f"bytes changed after it was written)")
            _VERIFIED.add(key)


def newest_verified(out: Path) -> tuple[Path | None, list[str]]:
    """(the newest complete checkpoint under OUT whose files all verify, one line per newer one
    passed over, saying why)."""
    skipped = []
    for _, folder in reversed(complete_checkpoints(out)):
        try:
            verify(folder)
        except CheckpointError as error:
            skipped.append(str(error))
            continue
        return folder, skipped
    return None, skipped


def load_weights(folder: Path, ema: bool) -> dict[str, torch.Tensor]:
    """A checkpoint's raw or EMA weights, verified against the manifest first."""
    from safetensors.torch import load_file

    name = "ema.safetensors" if ema else "model.safetensors"
    verify(folder, [name])
    return load_file(Path(folder) / name)


def load_training_state(folder: Path) -> tuple[dict, dict]:
    """(optimizer state, train state) of a checkpoint, verified, read with torch.load(weights_only=True)."""
    folder = Path(folder)
    verify(folder, ["optimizer.pt", "state.pt"])
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
    """The model of a checkpoint folder (EMA or raw weights), fp32 on the CPU; weights that are
    not all finite are an error (they would only draw noise or black images)."""
    folder = find_checkpoint(folder)
    verify(folder, ["run.json"])
    owner, config = model_config_of(read_run_info(folder))
    model = owner.build(config)
    weights = load_weights(folder, ema)
    bad = [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint {folder} has inf or NaN in its {'EMA' if ema else 'raw'} weights "
                              f"({len(bad)} tensors, e.g. {bad[0]}): use an earlier checkpoint of the run")
    model.load_state_dict(weights)
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
    if is_engine_checkpoint(path):
        return load_model(path, ema=use_ema)
    return path


def is_engine_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an engine checkpoint, a run's checkpoints/ folder or a run folder
    (find_checkpoint then picks the checkpoint), rather than a file in another format."""
    path = Path(path)
    return (path / MARKER).is_file() or (path / CHECKPOINTS).is_dir() or path.name == CHECKPOINTS


def load_init(module, path: str | os.PathLike, use_ema: bool = True, objective=None, source=None) -> str:
    """Initialise ``module`` from ``path`` (``source``: read_init(path) when already read) and
    return a line saying what was loaded. ``objective`` is the run's, for conversions between
    families that pin the two models together at a noise level (engine.family.Family.init)."""
    source = read_init(path, use_ema) if source is None else source
    try:
        how = family.of_model(module).init(module, source, objective)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--init {path}: {error}") from None
    except ValueError as error:  # subclasses such as UnicodeDecodeError take other arguments: re-raise as ValueError
        raise ValueError(f"--init {path}: {error}") from None
    except Exception as error:  # a file the family's reader cannot parse (pickle, safetensors, JSON errors)
        raise ValueError(f"--init {path}: cannot be read as a checkpoint ({type(error).__name__}: {error})") from error
    return f"initialised from {path}: {how}"
