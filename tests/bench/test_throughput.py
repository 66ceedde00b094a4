"""bench/throughput.py and bench/hardware.py on the CPU: tiny model, one or two timed steps per variant."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

import hardware  # noqa: E402
import throughput  # noqa: E402

from engine.config import preset  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.model.pixart import PixArt  # noqa: E402

FAST = ["--steps", "1", "--warmup", "0", "--batch", "2"]
ENV_FIELDS = ("gpu_name", "torch", "triton", "diffusers", "cuda", "date", "git_commit", "command")


def test_json_csv_plot_have_every_field(tmp_path):
    out = tmp_path / "out.json"
    result = throughput.main([*FAST, "--variants", "eager,diffusers", "--json", str(out),
                              "--csv", str(tmp_path / "out.csv"), "--plot", str(tmp_path / "out.png")])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["representative"] is False and "NOT representative" in saved["note"]
    env = saved["environment"]
    for field in ENV_FIELDS:
        assert field in env, field
    assert env["torch"] == torch.__version__ and env["command"].startswith("python ")
    assert "--variants eager,diffusers" in env["command"]
    assert saved["hardware"]["matmul_tflops_measured"] > 0 and saved["hardware"]["copy_bytes_per_s"] > 0
    assert saved["hardware"]["datasheet_peak_tflops"] is None  # no GPU name on the CPU

    rows = saved["rows"]
    assert [r["variant"] for r in rows] == ["eager", "diffusers"]
    for row in rows:
        assert row["error"] is None, row["error"]
        assert row["img_per_s"] > 0 and row["step_ms"] > 0
        assert math.isclose(row["img_per_s"], 2 / (row["step_ms"] / 1e3), rel_tol=1e-9)
        assert math.isclose(row["tflops"], row["img_per_s"] * row["flops_per_sample"] / 1e12, rel_tol=1e-9)
        assert math.isclose(row["mfu"]["measured"], row["tflops"] / saved["hardware"]["matmul_tflops_measured"],
                            rel_tol=1e-9)
        assert row["mfu"]["datasheet"] is None
        assert row["peak_mem_gib"] is None
    assert rows[0]["speedup_vs_eager"] == 1.0 and rows[1]["speedup_vs_diffusers"] == 1.0
    assert math.isclose(rows[1]["speedup_vs_eager"], rows[1]["img_per_s"] / rows[0]["img_per_s"], rel_tol=1e-9)

    csv_lines = (tmp_path / "out.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "mfu_measured" in csv_lines[0] and "git_commit" in csv_lines[0]
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_come_from_the_engine_model(monkeypatch, tmp_path):
    sentinel = 3.25e11
    calls = []

    def fake_flops(self, height, width, text_len=None):
        calls.append((type(self).__name__, height, width, text_len))
        return sentinel

    monkeypatch.setattr(PixArt, "flops_per_sample", fake_flops)
    result = throughput.main([*FAST, "--variants", "eager,diffusers", "--res", "32"])
    assert calls and set(calls) == {("PixArt", 32, 32, preset("tiny").text_len)}
    for row in result["rows"]:  # diffusers rows use the engine model's figure too
        assert row["flops_per_sample"] == sentinel
        assert math.isclose(row["tflops"], row["img_per_s"] * sentinel / 1e12, rel_tol=1e-12)


def test_flops_per_image_matches_the_model_instance():
    config = preset("tiny", 48)
    model = build_model(config)
    assert throughput.flops_per_image(config, 48) == model.flops_per_sample(48, 48, config.text_len)


def test_a_failing_variant_reports_its_error_and_the_run_goes_on(monkeypatch):
    real_build = throughput._build
    backends_seen = {}

    def build(variant, config, device):
        backends_seen[variant.name] = os.environ.get("ENGINE_BACKEND")
        if variant.name == "engine":
            raise RuntimeError("kernel exploded\nsecond line of the message")
        if variant.name == "compile":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real_build(variant, config, device)

    monkeypatch.setattr(throughput, "_build", build)
    monkeypatch.setenv("ENGINE_BACKEND", "eager")
    result = throughput.main([*FAST, "--variants", "engine,compile,eager"])
    engine_row, compile_row, eager_row = result["rows"]
    assert engine_row["error"] == "RuntimeError: kernel exploded"
    assert compile_row["error"].startswith("OutOfMemoryError: CUDA out of memory")
    for row in (engine_row, compile_row):
        assert row["img_per_s"] is None and row["tflops"] is None and row["mfu"]["measured"] is None
        assert row["speedup_vs_eager"] is None
    assert eager_row["error"] is None and eager_row["img_per_s"] > 0
    assert backends_seen == {"engine": "auto", "compile": "eager", "eager": "eager"}
    assert os.environ["ENGINE_BACKEND"] == "eager"  # restored after each variant, failed ones included


def test_a_crashing_worker_process_becomes_an_error_row():
    assert throughput.run_isolated(os._exit, 3)["error"].startswith("worker process died")


def test_resume_measures_only_the_missing_rows(monkeypatch, tmp_path):
    out = tmp_path / "out.json"
    first = throughput.main([*FAST, "--variants", "eager,engine", "--json", str(out)])
    first_rows = {r["variant"]: r for r in first["rows"]}
    # as if "engine" had failed (e.g. the run was cut short): it must be measured again
    saved = json.loads(out.read_text())
    saved["rows"][1].update(img_per_s=None, error="killed")
    out.write_text(json.dumps(saved))

    measured = []

    def fake_measure(name, preset_name, resolution, batch, device, steps, warmup, optimizer):
        measured.append(name)
        return dict(img_per_s=123.0, step_ms=2e3 / 123.0, first_step_s=1.0, peak_mem_gib=None, graph_breaks=None)

    monkeypatch.setattr(throughput, "measure_or_error", fake_measure)
    second = throughput.main([*FAST, "--variants", "eager,engine,diffusers", "--resume", str(out), "--json", str(out)])
    assert measured == ["engine", "diffusers"]
    rows = {r["variant"]: r for r in second["rows"]}
    assert rows["eager"]["img_per_s"] == first_rows["eager"]["img_per_s"]
    assert rows["eager"]["measured_at"] == first_rows["eager"]["measured_at"]
    assert rows["engine"]["img_per_s"] == 123.0 and rows["engine"]["error"] is None
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(second["rows"]))
    with pytest.raises(SystemExit, match="steps=2"):
        throughput.main(["--steps", "2", "--warmup", "0", "--batch", "2", "--resume", str(out)])


def test_non_finite_loss_is_an_error(monkeypatch):
    real_build = throughput._build

    def build(variant, config, device):
        model = real_build(variant, config, device)
        with torch.no_grad():
            model.final.linear.bias.fill_(float("nan"))
        return model

    monkeypatch.setattr(throughput, "_build", build)
    (row,) = throughput.main([*FAST, "--variants", "eager"])["rows"]
    assert row["error"].startswith("FloatingPointError: non-finite training loss")


def test_schedule_projection_by_hand():
    schedule = {"stages": [
        {"name": "a", "resolution": 256, "steps": 1000, "global_batch": 64},
        {"name": "b", "resolution": 256, "steps": 300, "global_batch": 10},
        {"name": "c", "resolution": 1024, "steps": 50, "global_batch": 8},
    ]}
    rates = {256: 128.0, 1024: 4.0}
    got = throughput.project_schedule(schedule, rates, datasheet_peak=989.0)
    days = [1000 * 64 / 128 / 86400, 300 * 10 / 128 / 86400, 50 * 8 / 4 / 86400]
    assert [s["gpu_days"] for s in got["stages"]] == pytest.approx(days, rel=1e-12)
    assert got["gpu_days"] == pytest.approx(sum(days), rel=1e-12)
    assert got["a100_equivalent_gpu_days"] == pytest.approx(sum(days) * 989 / 312, rel=1e-12)

    missing = throughput.project_schedule(schedule, {256: 128.0, 1024: None}, datasheet_peak=989.0)
    assert missing["stages"][2]["gpu_days"] is None and missing["gpu_days"] is None
    assert missing["a100_equivalent_gpu_days"] is None
    unknown_gpu = throughput.project_schedule(schedule, rates, datasheet_peak=None)
    assert unknown_gpu["gpu_days"] == pytest.approx(sum(days)) and unknown_gpu["a100_equivalent_gpu_days"] is None


def test_schedule_file_matches_the_design_table():
    schedule = json.loads(throughput.SCHEDULE_PATH.read_text())
    # docs/design.md §1: (resolution, steps, global batch) per stage
    table = [(256, 300_000, 1024), (256, 150_000, 176 * 64), (256, 90_000, 176 * 64), (512, 100_000, 40 * 64),
             (1024, 16_000, 12 * 32)]
    assert [(s["resolution"], s["steps"], s["global_batch"]) for s in schedule["stages"]] == table
    for stage in schedule["stages"]:  # every number names its source
        if "gpus" in stage:
            assert stage["batch_per_gpu"] * stage["gpus"] == stage["global_batch"]
            assert set(stage["sources"]) == {"steps", "batch_per_gpu", "gpus"}
        else:
            assert set(stage["sources"]) == {"steps", "global_batch"}
    assert [s["micro_conditions"] for s in schedule["stages"]] == [False, False, False, False, True]
    assert schedule["published_a100_gpu_days"]["abstract"] == 675


def test_schedule_run_projects_the_measured_rates(tmp_path):
    # the PixArt file's 256-1024 px make the tiny model slow on a CPU: a schedule of small images
    stages = [dict(name="1 proxy stage", resolution=32, steps=3000, global_batch=64, micro_conditions=False,
                   measured_with="a proxy"),
              dict(name="2 a", resolution=32, steps=1000, global_batch=32, micro_conditions=False),
              dict(name="3 b", resolution=48, steps=500, global_batch=16, micro_conditions=True)]
    schedule_file = tmp_path / "schedule.json"
    schedule_file.write_text(json.dumps(dict(stages=stages)))
    result = throughput.main(["--schedule", "--schedule-file", str(schedule_file), "--schedule-batches", "2,1",
                              "--variants", "eager", "--steps", "1", "--warmup", "0"])
    rows = result["rows"]
    assert [(r["preset"], r["resolution"], r["batch"]) for r in rows] == [("tiny", 32, 2), ("tiny-ms", 48, 1)]
    assert all(r["error"] is None for r in rows)
    rate = {r["resolution"]: r["img_per_s"] for r in rows}
    expected = [s["steps"] * s["global_batch"] / rate[s["resolution"]] / 86400 for s in stages]
    projection = result["schedule"]["variants"]["eager"]
    assert [s["gpu_days"] for s in projection["stages"]] == pytest.approx(expected, rel=1e-12)
    assert projection["gpu_days"] == pytest.approx(sum(expected), rel=1e-12)
    assert projection["a100_equivalent_gpu_days"] is None  # the CPU has no datasheet peak
    assert "312" in result["schedule"]["a100_equivalent_note"]
    assert result["schedule"]["stage_notes"] == ["1 proxy stage: a proxy"]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(SystemExit, match="unknown.*'fast'"):
        throughput.main(["--variants", "eager,fast"])
    with pytest.raises(SystemExit, match="--schedule-batches needs 3"):
        throughput.main(["--schedule", "--schedule-batches", "4,2"])
    with pytest.raises(SystemExit, match="no-such-preset"):
        throughput.main(["--preset", "no-such-preset"])
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        throughput.main(["--steps", "0"])


def test_runs_as_a_script_with_isolated_variants(tmp_path):
    # --isolate is the GPU default: each variant in a spawned process, which re-imports the script
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "bench/throughput.py", *FAST, "--variants", "eager", "--isolate",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NOT representative" in proc.stdout
    assert json.loads(out.read_text())["rows"][0]["img_per_s"] > 0


def test_datasheet_peaks_by_gpu_name():
    assert hardware.datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert hardware.datasheet_peak_tflops("NVIDIA A100 80GB PCIe") == 312
    assert hardware.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert hardware.datasheet_peak_tflops("NVIDIA H100 PCIe") == 756
    assert hardware.datasheet_peak_tflops("NVIDIA H200") == 989
    assert hardware.datasheet_peak_tflops("Tesla V100-SXM2-16GB") is None
    assert hardware.datasheet_peak_tflops(None) is None


def test_median_seconds_times_each_call():
    durations = iter([0.002, 0.2, 0.004, 0.003, 0.2])
    seconds = hardware.median_seconds(lambda: time.sleep(next(durations)), torch.device("cpu"), repeats=3, warmup=2)
    # warm-up ate 0.002 and 0.2; the timed calls slept 0.004, 0.003, 0.2 -> median 0.004
    assert 0.004 <= seconds < 0.1


def test_matmul_and_copy_rates_on_cpu():
    assert hardware.measure_matmul_tflops("cpu", n=64, dtype=torch.float32, repeats=2, warmup=1) > 0
    assert hardware.measure_copy_bandwidth("cpu", nbytes=1 << 20, repeats=2, warmup=1) > 0
    with pytest.raises(ValueError, match="nbytes"):
        hardware.measure_copy_bandwidth("cpu", nbytes=0)
