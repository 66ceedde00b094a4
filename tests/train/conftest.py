"""Tiny pixel caches and a subprocess runner for the training-driver tests (nothing downloaded).

Caches are built with the real `prepare` code path (engine.data.build) from engine.data.demo
images: 16px pixels ("--vae pixels"), captions encoded by a tiny random T5 saved to disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.data import demo
from engine.data.build import build_cache
from tests.data.conftest import save_tiny_text_encoder

REPO = Path(__file__).resolve().parents[2]
TEXT_WIDTH = 16  # save_tiny_text_encoder's d_model
CAPTIONED = ["--set", f"model.fields.caption_channels={TEXT_WIDTH}"]


@pytest.fixture(scope="session")
def text_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("text_encoder")
    words = [*demo.COLOURS, *demo.SHAPES, *demo.SIZES, *demo.POSITIONS, *demo.BACKGROUNDS]
    save_tiny_text_encoder(path, [" ".join(words), "a in the on and background , top left"])
    return path


def build_pixel_cache(tmp_path_factory, name, count, resolution, text_encoder=None, labels=False, max_tokens=120):
    """A `prepare --vae pixels` cache of ``count`` demo images (captioned, or class-labelled),
    captions cut at ``max_tokens``."""
    images = tmp_path_factory.mktemp(f"{name}_images")
    demo.generate(images, count, resolution=resolution, seed=len(name), layout="imagenet" if labels else "folder")
    out = tmp_path_factory.mktemp(name) / "cache"
    build_cache(images, out, "pixels", str(text_encoder) if text_encoder else None, resolution=resolution,
                labels=labels, max_tokens=max_tokens, progress=False, workers=1, device="cpu")
    return out


@pytest.fixture(scope="session")
def captioned_cache(tmp_path_factory, text_encoder):
    return build_pixel_cache(tmp_path_factory, "captioned16", 48, 16, text_encoder)


@pytest.fixture(scope="session")
def labelled_cache(tmp_path_factory):
    return build_pixel_cache(tmp_path_factory, "labelled16", 32, 16, labels=True)


def cli_env(**extra) -> dict:
    """Environment of a CLI subprocess: one CPU thread (CI has 2 shared cores), this checkout on
    the path; TRITON_INTERPRET comes from tests/conftest.py when there is no GPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("ENGINE_DEBUG_KILL", None)
    env.update(extra)
    return env


def run_cli(*args, check: bool = True, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """`python -m train ARGS...` in a subprocess; returns the completed process."""
    result = subprocess.run([sys.executable, "-m", "train", *map(str, args)], cwd=REPO, env=cli_env(**env),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"python -m train {' '.join(map(str, args))} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    return result


def run_in_process(*args) -> int:
    """`python -m train ARGS...` in this process (for runs whose bit pattern does not matter)."""
    from train.__main__ import main

    return main([str(a) for a in args])


def load_weights(run_dir: Path, step: int, which: str = "model") -> dict:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "checkpoints" / f"step-{step:07d}" / f"{which}.safetensors")
