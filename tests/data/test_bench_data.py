"""bench/data.py on the CPU: a tiny synthetic cache, every backend measured or skipped with a reason."""

from __future__ import annotations

import json

import torch

import data as bench_data  # bench/data.py: tests/conftest.py puts bench/ on the path


def test_bench_data_reports_every_backend(tmp_path):
    out = tmp_path / "data.json"
    report = bench_data.main(["--samples", "24", "--text-width", "64", "--batch", "4", "--batches", "3",
                              "--warmup", "1", "--workers", "0", "--train-rate", "100", "--cache",
                              str(tmp_path / "cache"), "--json", str(out)])
    assert json.loads(out.read_text()) == report
    for field in ("date", "git_commit", "command", "torch", "dali", "gpu_name"):
        assert field in report["environment"]
    rows = {row["backend"]: row for row in report["results"]}
    assert set(rows) == {"dali-gpu", "dali-cpu", "torch"}
    measured = ["dali-cpu", "torch"] + (["dali-gpu"] if torch.cuda.is_available() else [])
    for name in measured:
        assert rows[name]["samples"] == 12 and rows[name]["samples_per_s"] > 0
        assert rows[name]["ratio_to_train_rate"] == rows[name]["samples_per_s"] / 100
    if not torch.cuda.is_available():
        assert rows["dali-gpu"]["skipped"] == "no CUDA GPU"
