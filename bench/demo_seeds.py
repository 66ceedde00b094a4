"""When does the demo's PixArt stage 2 learn position? Stage 2 of `python -m train demo` trained
once per (seed, precision) for --steps steps with a checkpoint every --every, and each checkpoint
from --eval-from on scored as the demo scores its stages (train.demo.evaluate_stage: the EMA
weights draw one image per held-out caption; colour and position accuracy against the
shuffled-caption level).

    python bench/demo_seeds.py --out DIR [--base DEMO_RUN] [--text-encoder PATH]
                               [--runs 1:fp32,2:fp32] [--steps 1600] [--every 200] [--eval-from 800]
                               [--set KEY=VALUE ...] [--stage1-set KEY=VALUE ...]

--base: the output folder of an earlier `train demo` (its cache/main and stage-1 are reused);
without it the demo's data, caches and stage 1 are made under --out. --set overrides stage 2's
config as `train run --set` does; --stage1-set stage 1's, when it is trained here (no --base).
One JSON line per scored checkpoint is appended to OUT/seeds.jsonl and printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run as a script, this folder is first on sys.path, where its kernels.py would shadow the
# installed `kernels` package that transformers imports when present: move it behind them.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]


def parse_runs(text: str) -> list[tuple[int, str]]:
    """"1:fp32,2:bf16" -> [(1, "fp32"), (2, "bf16")]."""
    runs = []
    for item in text.split(","):
        seed, _, precision = item.partition(":")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"--runs {text!r}: {item!r} is not SEED:fp32 or SEED:bf16")
        runs.append((int(seed), precision))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, help="an earlier `train demo` output folder to reuse")
    parser.add_argument("--text-encoder", help="a local transformers encoder folder (default: the demo's)")
    parser.add_argument("--runs", type=parse_runs, default=parse_runs("1:fp32,2:fp32,3:fp32"))
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--eval-from", type=int, default=800)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a stage-2 config override, as `train run --set`")
    parser.add_argument("--stage1-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a stage-1 config override (only without --base: stage 1 is trained here)")
    args = parser.parse_args()
    if args.base and args.stage1_set:
        parser.error("--stage1-set needs stage 1 trained here: leave out --base")

    import torch

    from engine.data import open_cache
    from engine.data.encode import TextEncoder
    from train import demo
    from train.config import load_run_config

    settings = demo.DemoSettings()
    encoder_path = demo.find_text_encoder(args.text_encoder)
    configs = {stage: load_run_config(demo.CONFIG, stage) for stage in demo.STAGES}
    text_len = max(demo.stage_family(stage).text_len(c.model_config()) for stage, c in configs.items())
    base = args.base or args.out
    data = demo.make_data(args.out / "data", settings)  # deterministic: the held-out records of any demo run
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.base:
        main_cache = args.base / "cache" / "main"
    else:
        main_cache = demo.build_caches(args.out, data, settings, encoder_path, text_len)["main"]
    encoder = TextEncoder(str(encoder_path), device, text_len)
    records, condition = demo.stage_conditions(data, open_cache(main_cache).classes, encoder, settings)["2"]
    if not args.base:
        demo.train_stage("1", main_cache, args.out / "stage-1", None, encoder.width, tuple(args.stage1_set))

    with open(args.out / "seeds.jsonl", "a", encoding="utf-8") as log:
        for seed, precision in args.runs:
            start = time.perf_counter()
            overrides = (f"train.seed={seed}", f"train.steps={args.steps}", f'train.precision="{precision}"',
                         f"checkpoint.every={args.every}", "checkpoint.keep=1000", *args.set)
            run_dir = args.out / f"stage-2_{precision}_seed{seed}"
            demo.train_stage("2", main_cache, run_dir, base / "stage-1", encoder.width, overrides)
            for checkpoint in sorted((run_dir / "checkpoints").iterdir()):
                step = int(checkpoint.name.split("-")[-1])
                if step < args.eval_from:
                    continue
                scores = demo.evaluate_stage(checkpoint, records, condition, settings, configs["2"].train)
                row = {"seed": seed, "precision": precision, "step": step, "set": args.set,
                       "stage1_set": args.stage1_set, **{k: round(v, 3) for k, v in scores.items()}}
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
                log.flush()
            print(f"seed {seed} {precision}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
