"""bench/data.py on the CPU: tiny synthetic caches, every backend measured or skipped with a reason,
one row per (backend, text shape, workers), the idle rate and the busy consumer's data wait."""

from __future__ import annotations

import json

import torch

import data as bench_data  # bench/data.py: tests/conftest.py puts bench/ on the path


def test_bench_data_reports_every_backend(tmp_path):
    out = tmp_path / "data.json"
    report = bench_data.main(["--samples", "24", "--text", "8x64,5x32", "--batch", "4", "--batches", "3",
                              "--warmup", "1", "--workers", "0,1", "--train-rate", "100,400", "--cache",
                              str(tmp_path / "cache"), "--json", str(out)])
    assert json.loads(out.read_text()) == report
    for field in ("date", "git_commit", "command", "torch", "dali", "gpu_name"):
        assert field in report["environment"]
    rows = {(row["backend"], row["text"], row["workers"]): row for row in report["results"]}
    assert set(rows) == {(backend, text, workers) for backend in ("dali-gpu", "dali-cpu", "torch")
                         for text in ("8x64", "5x32") for workers in (0, 1)}
    measured = ["dali-cpu", "torch"] + (["dali-gpu"] if torch.cuda.is_available() else [])
    for (backend, text, _), row in rows.items():
        if backend not in measured:
            assert row["skipped"] == "no CUDA GPU"
            continue
        rate = 100 if text == "8x64" else 400
        assert row["samples"] == 12 and row["samples_per_s"] > 0
        assert row["ratio_to_train_rate"] == row["samples_per_s"] / rate
        assert row["consumer_ms"] == 1000 * 4 / rate  # batch / training rate
        assert 0 <= row["data_wait"] < 1 and row["wait_seconds"] <= row["busy_seconds"]
        assert row["busy_seconds"] >= 3 * row["consumer_ms"] / 1000
