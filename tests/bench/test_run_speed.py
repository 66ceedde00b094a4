"""bench/run_speed.py: the window's img/s and data wait from metrics lines, counted by hand."""

from __future__ import annotations

import json

import pytest

import run_speed


def _line(step, step_ms, wait_ms, graph=True):
    return {"step": step, "step_ms": step_ms, "data_wait_ms": wait_ms, "mem_gib": step / 100, "recompute": "off",
            "cuda_graph": graph, "cuda_graph_off": None if graph else "warming up"}


def test_window_counts_each_line_for_its_steps():
    records = [_line(10, 500.0, 100.0, graph=False), _line(20, 130.0, 1.0), _line(30, 120.0, 2.0),
               _line(35, 110.0, 0.0)]
    figures = run_speed.window(records, 10, 35, 64)
    seconds = 10 * 0.130 + 10 * 0.120 + 5 * 0.110
    assert figures["steps"] == 25
    assert figures["img_per_s"] == pytest.approx(25 * 64 / seconds)
    assert figures["step_ms"] == pytest.approx(seconds / 25 * 1e3)
    assert figures["data_wait"] == pytest.approx((10 * 0.001 + 10 * 0.002) / seconds)
    assert figures["cuda_graph"] and figures["mem_gib"] == pytest.approx(0.35)
    with pytest.raises(ValueError, match="no metrics line"):
        run_speed.window(records, 35, 40, 64)


def test_main_writes_ratios(tmp_path, capsys):
    bench = {"rows": [{"variant": "engine+graph", "img_per_s": 500.0, "batch": 64, "error": None}],
             "environment": {"gpu_name": "test"}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000040").mkdir(parents=True)
    (run / "checkpoints" / "step-0000040" / "run.json").write_text(
        json.dumps({"config": {"train": {"global_batch": 64}, "data": {"backend": "torch"}}}))
    lines = [_line(step, 64 / 480 * 1e3, 64 / 480 * 1e3 * 0.01) for step in (10, 20, 30, 40)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert run_speed.main(["--bench", str(tmp_path / "bench.json"), "--run", f"torch={run}", "--from-step", "10",
                           "--to-step", "40", "--json", str(tmp_path / "out.json")]) == 0
    figures = json.loads((tmp_path / "out.json").read_text())["runs"]["torch"]
    assert figures["ratio"] == pytest.approx(480 / 500) and figures["meets_bar"]
    assert figures["loader"] == "torch" and "96.0% of the benchmark" in capsys.readouterr().out
