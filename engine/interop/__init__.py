"""Checkpoint interop: diffusers, the official PixArt-α and MicroDiT code, facebookresearch/DiT, and DiT -> PixArt.

Submodules (import the one you need; reading a ``.pth`` does not import diffusers):

    engine.interop.diffusers        diffusers_kwargs, from_diffusers, to_diffusers
    engine.interop.pixart_official  load / save of official PixArt-α checkpoints (.pth, .safetensors)
    engine.interop.dit              load / save of facebookresearch/DiT checkpoints (.pt)
    engine.interop.microdit         load / save of official MicroDiT checkpoints (.pt, .safetensors)
    engine.interop.reparam          dit_to_pixart: PixArt-α's DiT -> PixArt re-parameterisation

This module holds what the formats share. Every format stores

- the patch embedding as a Conv2d weight (D, C, p, p); the engine's Linear on (c, i, j)-ordered
  patch vectors has the same numbers as a (D, C*p*p) matrix;
- the output head with each token's p*p*C outputs ordered (i, j, c) (their unpatchify reshapes
  to (h, w, p, p, c)); the engine's unpatchify reads them as (c, i, j), so the head's weight rows
  and bias are permuted on conversion;
- position embeddings as fixed sin-cos tables, which the engine computes instead of storing.

A conversion is described by a table ``engine key -> tuple of foreign keys`` whose tensors are
concatenated along dim 0 to give the engine tensor (one key: a rename; several: a fused
projection such as QKV), plus the patch and head layout rules above.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import re

import torch

PATCH_KEY = "patch_embed.weight"
HEAD_KEYS = ("final.linear.weight", "final.linear.bias")

# Attention heads of the published widths, from the model definitions of facebookresearch/DiT
# (models.py: DiT-S 384/6, B 768/12, L 1024/16, XL 1152/16) and PixArt-α (PixArt-XL/2 1152/16).
# No checkpoint tensor records the head count, so other widths must be told it.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}


def head_to_engine(t: torch.Tensor, patch_size: int, out_channels: int) -> torch.Tensor:
    """Head weight (p*p*C, D) or bias (p*p*C,) with rows (i, j, c) -> rows (c, i, j)."""
    p, C, rest = patch_size, out_channels, t.shape[1:]
    return t.reshape(p, p, C, *rest).movedim(2, 0).reshape(p * p * C, *rest)


def head_from_engine(t: torch.Tensor, patch_size: int, out_channels: int) -> torch.Tensor:
    """Inverse of head_to_engine: rows (c, i, j) -> rows (i, j, c)."""
    p, C, rest = patch_size, out_channels, t.shape[1:]
    return t.reshape(C, p, p, *rest).movedim(0, 2).reshape(p * p * C, *rest)


def linear_keys(linears: dict) -> dict[str, tuple[str, ...]]:
    """Expand ``engine Linear -> foreign Linear name (or tuple of names, fused)`` to weight and bias keys."""
    table = {}
    for engine_name, foreign in linears.items():
        names = (foreign,) if isinstance(foreign, str) else foreign
        for suffix in ("weight", "bias"):
            table[f"{engine_name}.{suffix}"] = tuple(f"{name}.{suffix}" for name in names)
    return table


def to_engine(foreign: dict, table: dict[str, tuple[str, ...]], patch_size: int, out_channels: int) -> dict:
    """A foreign state dict (keys already checked) -> the engine's names and layouts."""
    out = {}
    for engine_key, keys in table.items():
        out[engine_key] = foreign[keys[0]] if len(keys) == 1 else torch.cat([foreign[k] for k in keys], dim=0)
    out[PATCH_KEY] = out[PATCH_KEY].reshape(out[PATCH_KEY].shape[0], -1)  # (D, C, p, p) -> (D, C*p*p)
    for key in HEAD_KEYS:
        out[key] = head_to_engine(out[key], patch_size, out_channels)
    return out


def from_engine(engine: dict, table: dict[str, tuple[str, ...]], patch_size: int, in_channels: int,
                out_channels: int) -> dict:
    """The engine's state dict -> a foreign one (fused tensors split into equal row blocks, copied)."""
    engine = dict(engine)
    D, p = engine[PATCH_KEY].shape[0], patch_size
    engine[PATCH_KEY] = engine[PATCH_KEY].reshape(D, in_channels, p, p)
    for key in HEAD_KEYS:
        engine[key] = head_from_engine(engine[key], patch_size, out_channels)
    out = {}
    for engine_key, keys in table.items():
        for key, part in zip(keys, engine[engine_key].chunk(len(keys), dim=0)):
            out[key] = part.detach().clone()  # own storage: a saved view would carry the whole fused tensor
    return out


def check_state_dict(state_dict: dict, expected: dict[str, torch.Size], source: str, optional=()) -> None:
    """Raise one error naming every missing, unexpected and wrongly shaped key of ``state_dict``."""
    problems = []
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: {tuple(state_dict[k].shape)} (expected {tuple(expected[k])})"
             for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes {wrong}")
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def load_converted(model_cls, config, foreign: dict, table: dict[str, tuple[str, ...]], source: str,
                   optional_shapes: dict | None = None, fill: dict | None = None):
    """Check ``foreign`` against the layout ``config`` implies, convert it and return the model.

    The model is built on the meta device and takes the converted tensors themselves (no random
    init of a 600M-parameter model only to overwrite it), on their device, in the dtype of the
    patch embedding. ``optional_shapes``: foreign keys that may be absent and are not loaded
    (stored position embeddings), only shape-checked. ``fill``: engine tensors with no foreign
    counterpart.
    """
    with torch.device("meta"):
        model = model_cls(config)
    p, C, out = config.patch_size, config.in_channels, config.out_channels
    expected = {k: v.shape for k, v in from_engine(model.state_dict(), table, p, C, out).items()}
    expected.update(optional_shapes or {})
    check_state_dict(foreign, expected, source, optional=tuple(optional_shapes or ()))
    engine_sd = to_engine(foreign, table, p, out)
    engine_sd.update(fill or {})
    dtype = engine_sd[PATCH_KEY].dtype
    model.load_state_dict({k: v.to(dtype) for k, v in engine_sd.items()}, strict=True, assign=True)
    model.pos_embed.reset_table(engine_sd[PATCH_KEY].device)  # the only buffer, not in checkpoints
    return model


def read_checkpoint(path) -> dict:
    """A checkpoint file -> dict, on the CPU. ``.safetensors`` via safetensors; anything else via
    ``torch.load(weights_only=True)``, which also admits argparse.Namespace (DiT's train.py stores
    its command-line arguments under 'args')."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) (it pickles more than "
                         f"tensors and plain containers): {error}") from None
    except (RuntimeError, EOFError) as error:  # torch's messages for a truncated or foreign file omit the path
        raise ValueError(f"{path}: not a readable torch checkpoint: {error}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(checkpoint).__name__}")
    return checkpoint


def checkpoint_keys(path) -> set[str]:
    """Key set of a checkpoint file, the keys of nested training dicts (model, ema) included and
    DDP's "module." prefix dropped: enough to tell which format a file holds."""
    checkpoint = read_checkpoint(path)
    keys = set(checkpoint)
    for value in checkpoint.values():
        if isinstance(value, dict):
            keys |= set(value)
    return {k.removeprefix("module.") for k in keys}


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """Drop the prefix DistributedDataParallel adds to every key, when all keys carry it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def block_count(state_dict: dict, prefix: str) -> int:
    """Number of transformer blocks: 1 + the largest i among keys '<prefix><i>.'."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in state_dict if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def required(state_dict: dict, key: str, source: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"{source} has no {key!r}: cannot infer the model config (pass config=)")
    return state_dict[key]


def num_heads_for(hidden_size: int, source: str) -> int:
    if hidden_size not in HEADS_BY_WIDTH:
        raise ValueError(f"{source}: hidden size {hidden_size} is not a published width {sorted(HEADS_BY_WIDTH)}, "
                         f"so its head count is unknown: pass num_heads=")
    return HEADS_BY_WIDTH[hidden_size]


def grid_side(pos_embed: torch.Tensor, patch_size: int, source: str) -> int:
    """Latent side of a square (1, N, D) position-embedding table: sqrt(N) * patch_size."""
    side = math.isqrt(pos_embed.shape[-2])
    if side * side != pos_embed.shape[-2]:
        raise ValueError(f"{source}: pos_embed has {pos_embed.shape[-2]} tokens, not a square grid")
    return side * patch_size


def learn_sigma(head_rows: int, patch_size: int, in_channels: int, source: str) -> bool:
    """From the head's output rows: p*p*2C (epsilon and variance) -> True, p*p*C -> False."""
    out_channels = head_rows // (patch_size * patch_size)
    if out_channels not in (in_channels, 2 * in_channels) or head_rows % (patch_size * patch_size):
        raise ValueError(f"{source}: the output head has {head_rows} rows; expected {patch_size}*{patch_size} times "
                         f"{in_channels} or {2 * in_channels} channels")
    return out_channels == 2 * in_channels


def make_config(cls, inferred: dict, overrides: dict, source: str):
    """cls(**inferred) with ``overrides`` (config field names) taking precedence."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}")
    try:
        return cls(**{**inferred, **overrides})
    except ValueError as error:
        raise ValueError(f"{source}: inferred config is invalid: {error}") from None


def check_config(config, cls) -> None:
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
