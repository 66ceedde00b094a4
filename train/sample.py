"""`python -m train sample`: images from a checkpoint; also the sample grids written during training.

    python -m train sample --ckpt CKPT --prompt TEXT [--steps 20] [--cfg 4.5]
        [--text-encoder PATH] [--vae PATH|pixels] [--out PNG] [--count N] [--seed S]
    python -m train sample --ckpt CKPT --label N ...          (a class-conditional model)

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
    what.add_argument("--prompt", metavar="TEXT", help="caption (text-conditioned checkpoints)")
    what.add_argument("--label", type=int, metavar="N", help="class id (class-conditional checkpoints)")
    parser.add_argument("--steps", type=int, help="solver steps (default: the run's log.sample_steps)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the run's log.sample_cfg)")
    parser.add_argument("--solver", choices=("dpm", "heun"),
                        help="DPM-Solver++, or Karras et al.'s Heun for EDM-trained models (default: the run's "
                             "log.sample_solver)")
    parser.add_argument("--text-encoder", metavar="PATH", help="default: the one the training cache was built with")
    parser.add_argument("--vae", metavar="PATH|pixels", help="default: the one the training cache was built with")
    parser.add_argument("--out", default="sample.png", metavar="PNG")
    parser.add_argument("--count", type=int, default=1, help="images (a grid when more than one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--device", help="default: cuda when available, else cpu")


# ------------------------------------------------------------------------------ generation

def generate(model, cond: dict, uncond: dict, count: int, steps: int, guidance: float, seed: int, device,
             objective: str = "iddpm", sigma_data: float = 0.5, solver: str = "dpm"):
    """Latents (count, C, h, w) at the model's configured size with classifier-free guidance
    between ``cond`` and ``uncond`` (the family's sampling and null conditions), for the
    objective the model was trained with (train.objective: "iddpm" or "edm", with
    train.edm_sigma_data's preconditioning), by ``solver`` (log.sample_solver): DPM-Solver++, or
    for EDM Karras et al.'s Heun sampler."""
    import torch

    from engine.diffusion import sample, sample_edm, sample_edm_heun

    c = model.config
    shape = (count, c.in_channels, c.input_size, c.input_size)
    generator = torch.Generator(device)
    generator.manual_seed(seed)
    if solver == "heun" and objective != "edm":
        raise ValueError(f"the heun solver samples EDM-trained models; this one was trained with {objective!r}")
    if objective == "edm":
        solve = sample_edm_heun if solver == "heun" else sample_edm
        return solve(model, shape, cond, uncond, guidance_scale=guidance, steps=steps, generator=generator,
                     device=device, sigma_data=sigma_data)
    return sample(model, shape, cond, uncond, guidance_scale=guidance, steps=steps, generator=generator, device=device)


def draw(model_family, model, condition: list, steps: int, guidance: float, seed: int, device,
         downsample: int = 8, objective: str = "iddpm", sigma_data: float = 0.5, solver: str = "dpm"):
    """Latents for one image per entry of ``condition`` (caption features or class ids, as the
    family conditions). downsample: image pixels per latent pixel (8 for sd-vae, 1 for pixel
    caches), for conditions given in pixels."""
    count = len(condition)
    cond = model_family.sampling_conditions(model, count, condition, downsample, device)
    return generate(model, cond, model_family.null_conditions(model, count), count, steps, guidance, seed, device,
                    objective, sigma_data, solver)


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


LABELLED_TILE = 128  # a labelled grid shows each image at least this wide (integer upscale, nearest)


def save_grid(images: list, path: Path, labels: list[str] | None = None) -> None:
    """A near-square grid of equally sized PIL images, written to ``path``. With ``labels`` (one
    per image, e.g. its caption) every tile is enlarged to at least LABELLED_TILE pixels and its
    label is written, word-wrapped, under it."""
    from PIL import Image

    if labels is not None:
        if len(labels) != len(images):
            raise ValueError(f"save_grid: {len(labels)} labels for {len(images)} images")
        images = [_labelled_tile(image, label) for image, label in zip(images, labels)]
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = max(i.size[0] for i in images), max(i.size[1] for i in images)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _labelled_tile(image, label: str):
    """``image`` enlarged to at least LABELLED_TILE wide, over ``label`` in black on white, wrapped
    to the tile's width; a 4-pixel white margin on the right and below separates tiles."""
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, math.ceil(LABELLED_TILE / image.size[0]))
    picture = image.convert("RGB").resize((image.size[0] * scale, image.size[1] * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(picture)
    lines, line = [], ""
    for word in label.split():
        trial = f"{line} {word}".strip()
        if line and measure.textlength(trial, font=font) > picture.size[0] - 4:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    top, bottom = measure.textbbox((0, 0), "Ag", font=font)[1::2]
    line_height = bottom - top + 3
    tile = Image.new("RGB", (picture.size[0] + 4, picture.size[1] + line_height * len(lines) + 8), "white")
    tile.paste(picture, (0, 0))
    draw = ImageDraw.Draw(tile)
    for k, text in enumerate(lines):
        draw.text((2, picture.size[1] + 3 + k * line_height - top), text, fill="black", font=font)
    return tile


def training_grid_writer(model_family, model_config, condition: list, decoder: Decoder, out: Path, steps: int,
                         guidance: float, device, downsample: int, objective: str, sigma_data: float = 0.5,
                         solver: str = "dpm"):
    """The callback the training loop calls with (step, EMA state) to write OUT/samples/step-N.png."""

    def write(step: int, ema_state: dict) -> None:
        model = model_family.build(model_config)
        model.load_state_dict(ema_state)
        model.to(device).eval()
        latents = draw(model_family, model, condition, steps, guidance, seed=0, device=device, downsample=downsample,
                       objective=objective, sigma_data=sigma_data, solver=solver)
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


def _condition(model_family, model, args, run_info: dict, folder: Path, device) -> list:
    """One condition per image from --prompt (encoded with the cache's text encoder) or --label."""
    if model_family.condition == "label":
        if args.label is None:
            raise ValueError(f"{folder} holds a class-conditional model: pass --label N, not --prompt")
        return [args.label] * args.count
    if args.prompt is None:
        raise ValueError(f"{folder} holds a text-conditioned model: pass --prompt TEXT, not --label")
    from engine.data.encode import TextEncoder

    encoder_path = _default(args.text_encoder, run_info, "text_encoder", "--text-encoder PATH")
    cache = run_info.get("cache", {})
    max_tokens = cache.get("max_tokens", model_family.text_len(model.config))
    # the prompt encoded as the training captions were (all positions of a padded cache)
    encoder = TextEncoder(encoder_path, device, max_tokens, padded=cache.get("padded_captions", False))
    features = encoder.encode([args.prompt])[0]
    return [features] * args.count


def main(args: argparse.Namespace) -> int:
    import torch

    from engine import family
    from train.checkpoint import find_checkpoint, load_model, read_run_info

    try:
        folder = find_checkpoint(args.ckpt)
        run_info = read_run_info(folder)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(folder, ema=not args.raw).to(device).eval()
        model_family = family.of_model(model)
        condition = _condition(model_family, model, args, run_info, folder, device)
        decoder = Decoder(_default(args.vae, run_info, "vae", "--vae PATH|pixels"), device)
        downsample = run_info.get("cache", {}).get("latent_downsample", 8)
        config = run_info.get("config", {})
        trained, logged = config.get("train", {}), config.get("log", {})
        steps = args.steps if args.steps is not None else logged.get("sample_steps", 20)
        guidance = args.cfg if args.cfg is not None else logged.get("sample_cfg", 4.5)
        solver = args.solver or logged.get("sample_solver", "dpm")
        latents = draw(model_family, model, condition, steps, guidance, args.seed, device, downsample,
                       trained.get("objective", "iddpm"), trained.get("edm_sigma_data", 0.5), solver)
        save_grid(decoder(latents), Path(args.out))
    except (FileNotFoundError, ValueError) as error:
        print(f"sample: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
