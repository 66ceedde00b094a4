"""The frozen encoders `prepare` runs once per image: the VAE and the text encoder.

Both load from local folders only (``from_pretrained(path)``); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

PIXELS = "pixels"


def fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for a model folder: sha256 over its config files' bytes and every
    file's name and size. It tells two different models apart without reading gigabytes of
    weights; it is not a content hash of the weights."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root).as_posix()
        digest.update(f"{relative}\0{file.stat().st_size}\n".encode("utf-8"))
        if file.suffix == ".json":
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _to_pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] on ``device``."""
    x = torch.from_numpy(images).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)


class PixelEncoder:
    """``--vae pixels``: the "latent" is the image itself scaled to [-1, 1], with zero std."""

    channels = 3
    downsample = 1

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.identity = {"path": PIXELS, "fingerprint": PIXELS, "scaling_factor": 1.0}

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = _to_pixels(images, self.device).half().cpu().numpy()  # (B, 3, H, W)
        return mean, np.zeros_like(mean)


class VaeEncoder:
    """A diffusers AutoencoderKL: stores latent_dist mean and std times the VAE's scaling factor,
    so a training latent is mean + std * noise, already scaled as the model sees it."""

    def __init__(self, path: str, device: torch.device):
        from diffusers import AutoencoderKL

        self.device = torch.device(device)
        # fp32: sd-vae-ft-ema is known to overflow in fp16, and encoding is a one-off cost
        self.vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32, low_cpu_mem_usage=False)
        self.vae = self.vae.to(self.device).eval()
        config = self.vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.identity = {"path": str(Path(path).resolve()), "fingerprint": fingerprint(path),
                         "scaling_factor": self.scaling_factor}

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dist = self.vae.encode(_to_pixels(images, self.device)).latent_dist
        mean = (dist.mean * self.scaling_factor).half().cpu().numpy()  # (B, C, h, w)
        std = (dist.std * self.scaling_factor).half().cpu().numpy()  # (B, C, h, w)
        return mean, std


def load_vae(spec: str, device: torch.device) -> PixelEncoder | VaeEncoder:
    if spec == PIXELS:
        return PixelEncoder(device)
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"--vae {spec!r}: expected a local diffusers AutoencoderKL folder or 'pixels'")
    return VaeEncoder(spec, device)


# T5-family checkpoints hold encoder and decoder; these classes load the encoder alone.
_ENCODER_ONLY_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class TextEncoder:
    """A transformers encoder + tokenizer. Features are the last hidden states of the caption's
    real tokens (attention mask = 1), at most ``max_tokens`` of them, kept at their true length.

    ``padded``: every caption is padded to ``max_tokens`` and encoded without an attention mask,
    and all ``max_tokens`` hidden states are kept, padding positions included: what a model
    without a caption mask reads (MicroDiT takes OpenCLIP's 77 positions after ln_final,
    MICRODIT.md), rather than zeros after the caption's last token."""

    def __init__(self, path: str, device: torch.device, max_tokens: int = 120, dtype: torch.dtype | None = None,
                 padded: bool = False):
        import transformers

        if not Path(path).is_dir():
            raise FileNotFoundError(f"--text-encoder {path!r}: expected a local transformers model folder")
        if max_tokens < 1:
            raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
        self.device = torch.device(device)
        # bf16 on GPU (T5-XXL's fp16 activations overflow), fp32 on CPU where bf16 is slow
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        config = transformers.AutoConfig.from_pretrained(path)
        class_name = _ENCODER_ONLY_CLASSES.get(config.model_type, "AutoModel")
        model = getattr(transformers, class_name).from_pretrained(path, torch_dtype=dtype)
        if class_name == "AutoModel" and config.is_encoder_decoder:
            model = model.get_encoder()
        self.model = model.to(self.device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:  # padded positions are masked out, so any token will do
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_tokens = max_tokens
        self.padded = padded
        self.width = int(config.d_model if hasattr(config, "d_model") else config.hidden_size)
        self.identity = {"path": str(Path(path).resolve()), "fingerprint": fingerprint(path),
                         "class": type(self.model).__name__}

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> list[np.ndarray]:
        """One (L_i, width) fp16 array per caption (L_i = max_tokens when padded); an empty caption
        gets zero tokens."""
        out = [np.zeros((0, self.width), np.float16) for _ in captions]
        todo = [i for i, caption in enumerate(captions) if caption]
        if not todo:
            return out
        if self.padded:
            tokens = self.tokenizer([captions[i] for i in todo], max_length=self.max_tokens, truncation=True,
                                    padding="max_length", return_tensors="pt").to(self.device)
            hidden = self.model(input_ids=tokens.input_ids).last_hidden_state.half().cpu()  # (B, max_tokens, width)
            for row, i in enumerate(todo):
                out[i] = hidden[row].numpy()
            return out
        tokens = self.tokenizer([captions[i] for i in todo], max_length=self.max_tokens, truncation=True,
                                padding="longest", return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        hidden = hidden.half().cpu()  # (B, L, width)
        keep = tokens.attention_mask.bool().cpu()  # (B, L): real tokens, whichever side the padding is on
        for row, i in enumerate(todo):
            out[i] = hidden[row][keep[row]].numpy()  # (L_i, width)
        return out
