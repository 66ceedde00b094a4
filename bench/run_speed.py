"""`python -m train run` against the benchmark: img/s of a training run over a window of steps,
read from its metrics.jsonl, beside bench/throughput.py's row measured in the same device call.

    python bench/run_speed.py --bench THROUGHPUT.json [--variant engine+graph]
                              --run NAME=RUN_DIR [--run NAME=RUN_DIR ...]
                              [--from-step 50] [--to-step 300] [--json PATH]

Each JSONL line of a run covers the ``log.every`` steps before its step; the window takes the
lines with from-step < step <= to-step and divides their images by their step time (the loop's
own clock: data wait, optimizer, EMA and the host's work included, checkpoints and sample grids
not). A run's ratio is that img/s over the benchmark row's: issue 20's bar is >= 0.95 with a
data wait <= 2% at 256 px, batch 64. A run whose micro-batch differs from the benchmark's (the
official 176 per GPU) is reported beside it, its ratio against the same row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BAR_RATIO, BAR_DATA_WAIT = 0.95, 0.02


def window(records: list[dict], first: int, last: int, global_batch: int) -> dict:
    """Figures of the lines with first < step <= last (needs each line's step_ms)."""
    picked = [r for r in records if first < r["step"] <= last]
    if not picked:
        raise ValueError(f"no metrics line with {first} < step <= {last}")
    steps, seconds, wait = 0, 0.0, 0.0
    previous = max([r["step"] for r in records if r["step"] <= first], default=0)
    for record in picked:
        count = record["step"] - previous
        previous = record["step"]
        steps += count
        seconds += record["step_ms"] * count / 1e3
        wait += record["data_wait_ms"] * count / 1e3
    return {"steps": steps, "img_per_s": steps * global_batch / seconds, "step_ms": seconds / steps * 1e3,
            "data_wait": wait / seconds, "mem_gib": max(r["mem_gib"] or 0.0 for r in picked),
            "recompute": sorted({r["recompute"] for r in picked}),
            "cuda_graph": all(r["cuda_graph"] for r in picked),
            "cuda_graph_off": sorted({r["cuda_graph_off"] for r in picked if r["cuda_graph_off"]})}


def read_run(folder: Path) -> tuple[list[dict], dict]:
    """(metrics.jsonl lines, the run's config as its newest checkpoint's run.json saved it)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    infos = sorted((folder / "checkpoints").glob("step-*/run.json"))
    config = json.loads(infos[-1].read_text())["config"] if infos else {}
    return records, config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, required=True, help="bench/throughput.py --json output of the same call")
    p.add_argument("--variant", default="engine+graph")
    p.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR")
    p.add_argument("--from-step", type=int, default=50)
    p.add_argument("--to-step", type=int, default=300)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    bench = json.loads(args.bench.read_text())
    row = next((r for r in bench["rows"] if r["variant"] == args.variant and not r.get("error")), None)
    if row is None:
        print(f"{args.bench} has no error-free {args.variant} row", file=sys.stderr)
        return 1
    reference = row["img_per_s"]
    out = {"bench": {"file": str(args.bench), "variant": args.variant, "img_per_s": reference,
                     "environment": bench["environment"]},
           "window": [args.from_step, args.to_step], "runs": {}}
    print(f"bench/throughput.py {args.variant}: {reference:.1f} img/s")
    for spec in args.run:
        name, _, folder = spec.partition("=")
        records, config = read_run(Path(folder))
        global_batch = config.get("train", {}).get("global_batch") or row["batch"]
        figures = window(records, args.from_step, args.to_step, global_batch)
        figures["global_batch"] = global_batch
        figures["loader"] = config.get("data", {}).get("backend")
        figures["ratio"] = figures["img_per_s"] / reference
        figures["meets_bar"] = figures["ratio"] >= BAR_RATIO and figures["data_wait"] <= BAR_DATA_WAIT
        out["runs"][name] = figures
        print(f"{name}: {figures['img_per_s']:.1f} img/s ({figures['ratio']:.1%} of the benchmark), "
              f"{figures['step_ms']:.1f} ms/step, data wait {figures['data_wait']:.2%}, batch {global_batch}, "
              f"recompute {','.join(figures['recompute'])}, graph {'on' if figures['cuda_graph'] else 'off'}"
              f"{' (' + '; '.join(figures['cuda_graph_off']) + ')' if figures['cuda_graph_off'] else ''}, "
              f"peak {figures['mem_gib']:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
