"""The MicroDiT part of `python -m train demo`: deferred masking against no masking at equal FLOPs.

MicroDiT (Sehwag et al., arXiv 2407.15811) trains most of its budget with 75% of the patch tokens
dropped after a patch-mixer that sees them all, then fine-tunes briefly without masking. This
part trains one small MicroDiT that way and the same model unmasked from the first step, both
for the same training FLOPs (MicroDiT.flops_per_sample, counted per image), on the PixArt demo's
main cache (CONFIG: train/configs/demo-masking.toml). At checkpoints spread over the budget it
measures, for each system:

- the held-out denoising loss: EDM's weighted loss of the unmasked model on the held-out images
  and their captions, at fixed noise levels and noise (the same numbers for both systems, so the
  losses compare; the training losses do not: the masked one counts only the kept patches);
- alignment: one image per held-out caption, scored as the PixArt stages are (train.alignment).

It writes DIR/masking/<system>/grid.png (labelled with the captions), DIR/masking.png (held-out
loss and alignment against training FLOPs) and returns the report's "masking" entry.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

CONFIG = Path(__file__).parent / "configs" / "demo-masking.toml"
SYSTEMS = {"masked": ("masked", "finetune"), "unmasked": ("unmasked",)}  # each system's stages, in order
CURVE_POINTS = 3       # checkpoints of a system's first stage scored for the curves (the last at its end)
LOSS_LEVELS = 8        # held-out loss: noise levels at these many quantiles of the training distribution
LOSS_SEED = 1234
GRID_COUNT = 16        # samples in each system's grid, as in the PixArt stages' (demo.DemoSettings.grid_count)


def stage_config(stage: str, settings: list[str] = ()):
    from train.config import load_run_config

    return load_run_config(CONFIG, stage, settings)


def flops_per_image(config) -> float:
    """Training FLOPs of one image of ``config``'s run (its model, resolution and mask ratio)."""
    from engine import family

    model_config = config.model_config()
    model = family.of_config(model_config).build(model_config)
    side = config.model.resolution * 8  # flops_per_sample takes VAE pixels (8 per latent pixel); the cache holds pixels
    return model.flops_per_sample(side, side, config.train.mask_ratio)


def unmasked_steps(caption_width: int) -> int:
    """Steps of the unmasked run that spend the masked system's FLOPs (same global batch)."""
    settings = [f"model.fields.caption_channels={caption_width}"]
    configs = [stage_config(stage, settings) for stage in SYSTEMS["masked"]]
    spent = sum(c.train.steps * c.train.global_batch * flops_per_image(c) for c in configs)
    unmasked = stage_config("unmasked", settings)
    return round(spent / (unmasked.train.global_batch * flops_per_image(unmasked)))


def _train(stage: str, cache: Path, out: Path, init: Path | None, settings: list[str]) -> dict:
    from train import run

    start = time.perf_counter()
    plan, _ = run.train_in_process(CONFIG, stage, cache, out, init, settings)
    return {"steps": plan.config.train.steps, "mask_ratio": plan.config.train.mask_ratio,
            "flops_per_image": flops_per_image(plan.config), "global_batch": plan.config.train.global_batch,
            "train_wall_s": round(time.perf_counter() - start, 2)}


def held_out_batch(folder: Path, records: list[dict], features: list, config) -> dict:
    """The held-out images in [-1, 1], their padded caption features, and fixed noise levels and
    noise: LOSS_LEVELS quantiles of the training distribution ln σ ~ N(p_mean, p_std²), cycled
    over the images."""
    import numpy as np
    import torch
    from PIL import Image

    from engine import family
    from engine.family.pixart import padded_conditions

    images = np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in records])  # (N, H, W, 3)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)
    model_config = config.model_config()
    caption = padded_conditions(features, model_config.caption_channels, family.of_config(model_config).text_len(
        model_config), torch.device("cpu"))["caption"]  # (N, L, C)
    quantiles = (torch.arange(LOSS_LEVELS, dtype=torch.float64) + 0.5) / LOSS_LEVELS
    normal = torch.distributions.Normal(0.0, 1.0).icdf(quantiles).float()  # (LOSS_LEVELS,)
    sigma = torch.exp(config.train.edm_p_mean + config.train.edm_p_std * normal).repeat(
        -(-len(records) // LOSS_LEVELS))[:len(records)]  # (N,)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(LOSS_SEED))
    return {"x0": x0, "caption": caption, "sigma": sigma, "noise": noise}


def held_out_loss(model, batch: dict, config, device) -> float:
    """EDM's weighted denoising loss of ``model`` (unmasked) on the held-out batch."""
    import torch

    from engine.diffusion.edm import EDM

    objective = EDM(config.train.edm_sigma_data, config.train.edm_p_mean, config.train.edm_p_std)
    with torch.no_grad():
        losses = objective.training_losses(model, batch["x0"].to(device), batch["sigma"].to(device),
                                           {"caption": batch["caption"].to(device)}, batch["noise"].to(device))["loss"]
    return float(losses.mean())


def score_checkpoint(folder: Path, records: list[dict], features: list, batch: dict, config, seed: int,
                     grid: Path | None = None) -> dict:
    """Held-out loss and alignment of a checkpoint's EMA weights; the labelled grid when ``grid``."""
    import torch

    from engine import family
    from train import alignment, sample
    from train.checkpoint import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(folder, ema=True).to(device).eval()
    loss = held_out_loss(model, batch, config, device)
    log, train = config.log, config.train
    pixels = sample.draw(family.of_model(model), model, features, log.sample_steps, log.sample_cfg, seed, device,
                         downsample=1, objective=train.objective, sigma_data=train.edm_sigma_data,
                         solver=log.sample_solver)
    images = sample.Decoder("pixels", device)(pixels)
    if grid is not None:
        sample.save_grid(images[:GRID_COUNT], grid, [r["caption"] for r in records[:GRID_COUNT]])
    scores = alignment.alignment([alignment.analyse(image) for image in images], records, ("colour", "position"))
    return {"held_out_loss": loss, **scores}


def checkpoint_every(steps: int, points: int) -> int:
    return max(1, -(-steps // points))


def run_masking(out: Path, cache: Path, held_out: tuple[Path, list[dict]], encoder, seed: int) -> dict:
    """Both systems trained and scored (module docstring); returns the report's "masking" entry."""
    from train.checkpoint import complete_checkpoints

    folder, records = held_out
    features = encoder.encode([r["caption"] for r in records])
    width = [f"model.fields.caption_channels={encoder.width}"]
    steps = {"unmasked": unmasked_steps(encoder.width)}
    batch = held_out_batch(folder, records, features, stage_config("masked", width))
    systems = {}
    for system, stages in SYSTEMS.items():
        flops, init, curve, facts = 0.0, None, [], {}
        for stage in stages:
            stage_steps = steps.get(stage, stage_config(stage, width).train.steps)
            points = CURVE_POINTS if stage == stages[0] else 1  # the fine-tune: its end
            settings = [*width, f"train.steps={stage_steps}", f"checkpoint.every={checkpoint_every(stage_steps, points)}"]
            run_dir = out / system / stage
            facts[stage] = _train(stage, cache, run_dir, init, settings)
            config = stage_config(stage, settings)
            per_step = facts[stage]["global_batch"] * facts[stage]["flops_per_image"]
            found = complete_checkpoints(run_dir)
            for number, (step, checkpoint) in enumerate(found):
                last = stage == stages[-1] and number == len(found) - 1
                point = score_checkpoint(checkpoint, records, features, batch, config, seed,
                                         grid=out / system / "grid.png" if last else None)
                curve.append({"stage": stage, "step": step, "train_flops": flops + step * per_step, **point})
            flops += stage_steps * per_step
            init = run_dir
        systems[system] = {"stages": facts, "train_flops": flops, "curve": curve, "final": curve[-1]}
        print(f"MicroDiT {system}: {flops:.3g} training FLOPs; held-out loss {curve[-1]['held_out_loss']:.4f}; "
              f"colour {curve[-1]['colour']:.2f}, position {curve[-1]['position']:.2f}", flush=True)
    plot_curves(systems, out.parent / "masking.png")
    return {"config": str(CONFIG), "systems": systems,
            "flops_ratio": systems["unmasked"]["train_flops"] / systems["masked"]["train_flops"],
            "files": {"plot": "masking.png", "grids": [f"masking/{s}/grid.png" for s in systems]}}


def plot_curves(systems: dict, path: Path) -> None:
    """Held-out loss, colour and position accuracy against training FLOPs, one line per system;
    the shuffled-caption level dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("held_out_loss", "held-out denoising loss"), ("colour", "colour accuracy"),
              ("position", "position accuracy"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3))
    for axis, (key, title) in zip(axes, panels):
        for system, facts in systems.items():
            flops = [p["train_flops"] for p in facts["curve"]]
            line, = axis.plot(flops, [p[key] for p in facts["curve"]], marker="o", label=system)
            if key != "held_out_loss":
                axis.plot(flops, [p[f"{key}_shuffled"] for p in facts["curve"]], linestyle=":",
                          color=line.get_color(), label=f"{system}, shuffled captions")
        axis.set_title(title)
        axis.set_xlabel("training FLOPs")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summary(masking: dict) -> str:
    """One line per system for the console."""
    return json.dumps({system: {k: round(v, 3) if isinstance(v, float) else v for k, v in facts["final"].items()}
                       for system, facts in masking["systems"].items()})
