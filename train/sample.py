"""`python -m train sample`: images from a checkpoint; also the sample grids written during training.

    python -m train sample --ckpt CKPT --prompt TEXT [--steps 20] [--cfg 4.5]
        [--text-encoder PATH] [--vae PATH|pixels] [--out PNG] [--count N] [--seed S]
    python -m train sample --ckpt CKPT --label N ...          (a stage-1 class-conditional DiT)

The prompt is encoded with the text encoder the training cache was built with (its path is in
the checkpoint's run.json; --text-encoder overrides it), and latents are decoded with the
cache's VAE (--vae overrides; ``pixels`` for a pixel cache maps [-1, 1] to 8-bit RGB).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="CKPT", help="checkpoint folder, or a run folder (newest)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="caption (text-to-image checkpoints)")
    what.add_argument("--label", type=int, metavar="N", help="class id (stage-1 class-conditional checkpoints)")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    parser.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale")
    parser.add_argument("--text-encoder", metavar="PATH", help="default: the one the training cache was built with")
    parser.add_argument("--vae", metavar="PATH|pixels", help="default: the one the training cache was built with")
    parser.add_argument("--out", default="sample.png", metavar="PNG")
    parser.add_argument("--count", type=int, default=1, help="images (a grid when more than one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--device", help="default: cuda when available, else cpu")


# ------------------------------------------------------------------------------ conditions

def pad_captions(features: list, text_len: int, device) -> dict:
    """Caption features (L_i, Ct) of true length -> caption (B, text_len, Ct) fp32 zero-padded + caption_lens (B,)."""
    import numpy as np
    import torch

    lens = [min(f.shape[0], text_len) for f in features]
    width = features[0].shape[1]
    caption = torch.zeros(len(features), text_len, width)  # (B, L, Ct)
    for i, (f, n) in enumerate(zip(features, lens)):
        caption[i, :n] = torch.from_numpy(np.asarray(f[:n], dtype=np.float32))
    return {"caption": caption.to(device), "caption_lens": torch.tensor(lens, dtype=torch.int64, device=device)}


def cache_prompts(cache, count: int, text_len: int) -> tuple[list, list[str]]:
    """Fixed prompts for training grids: the caption features and texts of the cache's first
    ``count`` samples of sample 0's bucket (so the grid needs no text encoder)."""
    import numpy as np

    same_bucket = np.flatnonzero(cache.sample_buckets == cache.sample_buckets[0])[:count]
    arrays = cache.read(same_bucket, text_len)
    return arrays["text"], [cache.caption(int(i)) for i in same_bucket]


# ------------------------------------------------------------------------------ generation

def generate(model, conditions: dict, count: int, steps: int, guidance: float, seed: int,
             device, downsample: int = 8):
    """Latents (count, C, h, w) at the model's configured size, by DPM-Solver++ with CFG.

    conditions: {"labels": (count,)} for a DiT, {"caption", "caption_lens"} for PixArt.
    downsample: image pixels per latent pixel (8 for sd-vae, 1 for pixel caches), for the
    size micro-condition.
    """
    import torch

    from engine.diffusion import null_caption_kwargs, null_class_kwargs, sample
    from engine.model import DiT

    c = model.config
    side = c.input_size
    if isinstance(model, DiT):
        cond, uncond = dict(conditions), null_class_kwargs(model, count)
    else:
        cond, uncond = dict(conditions), null_caption_kwargs(model, count)
        if c.micro_conditions:  # a square image of the configured size; micro-conditions in pixels
            pixels = float(side * downsample)
            cond["resolution"] = torch.tensor([[pixels, pixels]] * count, device=device)  # (count, 2)
            cond["aspect_ratio"] = torch.ones(count, 1, device=device)  # (count, 1)
    generator = torch.Generator(device)
    generator.manual_seed(seed)
    return sample(model, (count, c.in_channels, side, side), cond, uncond, guidance_scale=guidance, steps=steps,
                  generator=generator, device=device)


class Decoder:
    """Latents -> 8-bit RGB images: a diffusers AutoencoderKL from a local folder, or ``pixels``."""

    def __init__(self, vae: str, device):
        import torch

        self.vae, self.device = None, device
        if vae != "pixels":
            from diffusers import AutoencoderKL

            if not Path(vae).is_dir():
                raise FileNotFoundError(f"VAE folder {vae} does not exist (pass --vae PATH or --vae pixels)")
            self.vae = AutoencoderKL.from_pretrained(vae, torch_dtype=torch.float32).to(device).eval()

    def __call__(self, latents) -> list:
        import torch
        from PIL import Image

        x = latents.float()  # (B, C, h, w)
        if self.vae is not None:
            with torch.no_grad():
                x = self.vae.decode(x.to(self.device) / self.vae.config.scaling_factor).sample  # (B, 3, H, W)
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(image) for image in pixels]  # (H, W, 3) each


def save_grid(images: list, path: Path) -> None:
    from PIL import Image

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def training_grid_writer(model_config, conditions: dict, count: int, decoder: Decoder, out: Path, steps: int,
                         guidance: float, device, downsample: int):
    """The callback the training loop calls with (step, EMA state) to write OUT/samples/step-N.png."""
    from engine.model import build_model

    def write(step: int, ema_state: dict) -> None:
        model = build_model(model_config)
        model.load_state_dict(ema_state)
        model.to(device).eval()
        latents = generate(model, conditions, count, steps, guidance, seed=0, device=device, downsample=downsample)
        save_grid(decoder(latents), out / f"step-{step:07d}.png")

    return write


# ------------------------------------------------------------------------------ command

def _default(value: str | None, run_info: dict, key: str, flag: str) -> str:
    if value is not None:
        return value
    identity = run_info.get("cache", {}).get(key)
    if not identity:
        raise ValueError(f"the checkpoint does not record the training cache's {key}: pass {flag}")
    return identity["path"]


def main(args: argparse.Namespace) -> int:
    import torch

    from engine.model import DiT
    from train.checkpoint import find_checkpoint, load_model, read_run_info

    try:
        folder = find_checkpoint(args.ckpt)
        run_info = read_run_info(folder)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(folder, ema=not args.raw).to(device).eval()
        if isinstance(model, DiT):
            if args.label is None:
                raise ValueError(f"{folder} holds a class-conditional DiT: pass --label N, not --prompt")
            if not 0 <= args.label < model.config.num_classes:
                raise ValueError(f"--label {args.label} is outside [0, {model.config.num_classes})")
            conditions = {"labels": torch.full((args.count,), args.label, dtype=torch.int64, device=device)}
        else:
            if args.prompt is None:
                raise ValueError(f"{folder} holds a text-to-image PixArt: pass --prompt TEXT, not --label")
            from engine.data.encode import TextEncoder

            encoder_path = _default(args.text_encoder, run_info, "text_encoder", "--text-encoder PATH")
            max_tokens = run_info.get("cache", {}).get("max_tokens", model.config.text_len)
            features = TextEncoder(encoder_path, device, max_tokens).encode([args.prompt])[0]
            if features.shape[1] != model.config.caption_channels:
                raise ValueError(f"text encoder {encoder_path} gives {features.shape[1]}-wide features, the model "
                                 f"takes {model.config.caption_channels}")
            conditions = pad_captions([features] * args.count, model.config.text_len, device)
        decoder = Decoder(_default(args.vae, run_info, "vae", "--vae PATH|pixels"), device)
        downsample = run_info.get("cache", {}).get("latent_downsample", 8)
        latents = generate(model, conditions, args.count, args.steps, args.cfg, args.seed, device, downsample)
        save_grid(decoder(latents), Path(args.out))
    except (FileNotFoundError, ValueError) as error:
        print(f"sample: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
