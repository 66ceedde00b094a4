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
from engine.model.microdit import MicroDiT  # noqa: E402
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


# ------------------------------------------------------------------------------ MicroDiT rows

MICRODIT_RES = 64  # microdit-tiny's own size: an 8 x 8 latent, 16 patch tokens


@pytest.mark.parametrize("ratio", [0.75, 0.0])
def test_microdit_rows_run_and_count_the_models_flops(tmp_path, ratio):
    out = tmp_path / "out.csv"
    result = throughput.main([*FAST, "--preset", "microdit-tiny", "--mask-ratio", str(ratio),
                              "--variants", "eager,engine", "--csv", str(out)])
    expected = MicroDiT(preset("microdit-tiny", MICRODIT_RES)).flops_per_sample(MICRODIT_RES, MICRODIT_RES, ratio)
    assert [r["variant"] for r in result["rows"]] == ["eager", "engine"]
    for row in result["rows"]:
        assert row["error"] is None, row["error"]
        assert row["img_per_s"] > 0 and row["mask_ratio"] == ratio and row["resolution"] == MICRODIT_RES
        assert row["flops_per_sample"] == expected
        assert math.isclose(row["tflops"], row["img_per_s"] * expected / 1e12, rel_tol=1e-12)
    assert f" {ratio:.2f} eager" in throughput.format_table(result["rows"])
    header, first = out.read_text().splitlines()[:2]
    assert header.split(",")[3] == "mask_ratio" and first.split(",")[3] == str(ratio)


def _independent_masked_edm_loss(model, x0, sigma, caption, keep, noise, patch):
    """MICRODIT.md's loss: D = c_skip x + c_out F(c_in x, ln σ / 4), w = (σ² + σd²) / (σ σd)², per patch
    the mean of w (D - x0)² over channels and p x p, then the mean over the kept patches of a
    sample (all of them unmasked), then over the batch; σd = 0.9."""
    sd = 0.9
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * noise
    c_in, c_skip, c_out = 1 / (s**2 + sd**2).sqrt(), sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    denoised = c_skip * x + c_out * model(c_in * x, sigma.log() / 4, caption=caption, keep=keep)
    error = (s**2 + sd**2) / (s * sd) ** 2 * (denoised - x0) ** 2  # (B, C, H, W)
    B, C, H, W = error.shape
    per_patch = error.view(B, C, H // patch, patch, W // patch, patch).mean(dim=(1, 3, 5)).flatten(1)  # (B, T)
    per_sample = per_patch.mean(1) if keep is None else per_patch.gather(1, keep).mean(1)
    return per_sample.mean()


@pytest.mark.parametrize("ratio", [0.75, 0.0])
def test_microdit_step_loss_is_the_masked_edm_loss(ratio):
    config = preset("microdit-tiny", MICRODIT_RES)
    model = MicroDiT(config)
    with torch.no_grad():  # off the zero init (adaLN, final layer): every block changes the output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    step = throughput.family_step(config, MICRODIT_RES, ratio)
    assert (step.objective.sigma_data, step.objective.p_mean, step.objective.p_std) == (0.9, -0.6, 1.2)
    B, T = 3, (MICRODIT_RES // 8 // config.patch_size) ** 2
    static, fixed = step.inputs(model, B, torch.device("cpu"))
    keep = static.get("keep")
    if ratio:
        assert keep.shape == (B, int(T * (1 - ratio)))
        assert all(len(set(row)) == keep.shape[1] for row in keep.tolist())  # distinct tokens per sample
    else:
        assert keep is None and "loss_mask" not in static
    with torch.no_grad():
        torch.manual_seed(1)
        got = step.loss(model, static, fixed)
        torch.manual_seed(1)  # the noise the step drew
        noise = torch.randn_like(static["x0"])
        expected = _independent_masked_edm_loss(model, static["x0"], static["level"], fixed["caption"], keep, noise,
                                                config.patch_size)
    assert torch.allclose(got, expected, rtol=1e-5, atol=0), (got, expected)
    # the 512 px stages' noise levels
    assert (throughput.family_step(config, 512, ratio).objective.p_mean,
            throughput.family_step(config, 512, ratio).objective.p_std) == (0.0, 0.6)


def test_microdit_has_no_diffusers_rows_and_dit_is_not_measured():
    args = throughput.parse_args(["--preset", "microdit-tiny"])
    assert "eager" in args.variants and not any(v.startswith("diffusers") for v in args.variants)
    (row,) = throughput.main([*FAST, "--preset", "microdit-tiny", "--variants", "diffusers"])["rows"]
    assert row["error"].startswith("ValueError: variant diffusers: there is no diffusers MicroDiT model")
    assert row["img_per_s"] is None
    with pytest.raises(SystemExit, match="microdit.*not 'dit'"):
        throughput.main(["--preset", "tiny-dit"])
    with pytest.raises(SystemExit, match="PixArt-α drops no tokens"):
        throughput.main(["--preset", "tiny", "--mask-ratio", "0.5"])
    with pytest.raises(SystemExit, match=r"\[0, 1\)"):
        throughput.main(["--preset", "microdit-tiny", "--mask-ratio", "1"])


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


# ------------------------------------------------------------------------------ what a schedule costs

MICRODIT_TABLE = [(256, 0.75, 250_000), (256, 0.0, 30_000), (512, 0.75, 50_000), (512, 0.0, 5_000)]  # MICRODIT.md


def test_the_schedule_file_and_batches_follow_the_presets_family():
    pixart = throughput.parse_args(["--schedule"])
    microdit = throughput.parse_args(["--schedule", "--preset", "microdit-tiny"])
    assert (pixart.schedule_file, pixart.schedule_batches) == (throughput.SCHEDULE_PATH, "4,2,1")
    assert (microdit.schedule_file, microdit.schedule_batches) == (throughput.MICRODIT_SCHEDULE_PATH, "2,2,1,1")
    assert throughput.SCHEDULE_BATCHES["microdit"][0] == "256,64,64,16"  # one 80 GB GPU
    with pytest.raises(SystemExit, match="--schedule --preset 'microdit-tiny'.*pixart schedule"):
        throughput.main(["--schedule", "--preset", "microdit-tiny", "--schedule-file", str(throughput.SCHEDULE_PATH)])
    with pytest.raises(SystemExit, match="--schedule --preset 'tiny'.*microdit schedule"):
        throughput.main(["--schedule", "--schedule-file", str(throughput.MICRODIT_SCHEDULE_PATH)])
    with pytest.raises(SystemExit, match="each stage's mask_ratio"):
        throughput.main(["--schedule", "--preset", "microdit-tiny", "--mask-ratio", "0.5"])
    with pytest.raises(SystemExit, match="--schedule-batches needs 4"):
        throughput.main(["--schedule", "--preset", "microdit-tiny", "--schedule-batches", "1,1,1"])
    with pytest.raises(SystemExit, match="--usd-per-gpu-hour must be >= 0"):
        throughput.main(["--usd-per-gpu-hour", "-1"])


def test_microdit_schedule_file_matches_its_sources():
    schedule = json.loads(throughput.MICRODIT_SCHEDULE_PATH.read_text())
    assert schedule["family"] == "microdit"
    assert [(s["resolution"], s["mask_ratio"], s["steps"]) for s in schedule["stages"]] == MICRODIT_TABLE
    for stage in schedule["stages"]:
        assert stage["global_batch"] == 2048 == stage["batch_per_gpu"] * stage["gpus"]
        assert stage["micro_conditions"] is False
        assert set(stage["sources"]) == {"resolution", "mask_ratio", "steps", "global_batch", "gpus",
                                         "micro_batch_per_gpu"}
    assert [s["micro_batch_per_gpu"] for s in schedule["stages"]] == [256, 64, 32, 16]  # the official configs
    published = schedule["published_cost"]
    assert (published["gpu"], published["gpus"], published["days"], published["usd"]) == ("H100", 8, 2.6, 1890)
    assert published["gpu_days"] == pytest.approx(2.6 * 8)
    assert published["usd"] / published["usd_per_gpu_hour"] == pytest.approx(504)  # MICRODIT.md: ~504 H100-hours
    pixart = json.loads(throughput.SCHEDULE_PATH.read_text())["published_cost"]
    assert (pixart["gpu"], pixart["gpu_days"], pixart["usd"]) == ("A100", 675, 26000)


def _microdit_md_schedule(text: str) -> list[tuple[int, float, int]]:
    """(resolution, mask ratio, steps) of each row of MICRODIT.md's schedule table ('| 1 | 256 | 0.75 | 250K | ...')."""
    rows = []
    for line in text.split("## Schedule", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 4 and cells[0].isdigit():
            steps = cells[3].split()[0]
            rows.append((int(cells[1]), float(cells[2]), int(float(steps.rstrip("K")) * (1000 if steps.endswith("K") else 1))))
    return rows


def test_microdit_schedule_file_matches_the_spec_table():
    spec = REPO.parent / "shared" / "MICRODIT.md"  # the project's specification, beside the checkout
    if not spec.exists():
        pytest.skip(f"{spec} is not here (a clone without the shared folder); the table above is checked anyway")
    text = spec.read_text()
    schedule = json.loads(throughput.MICRODIT_SCHEDULE_PATH.read_text())
    assert _microdit_md_schedule(text) == MICRODIT_TABLE
    assert [(s["resolution"], s["mask_ratio"], s["steps"]) for s in schedule["stages"]] == _microdit_md_schedule(text)
    assert "global batch 2048" in text.split("## Schedule", 1)[1].splitlines()[0]
    assert "2.6 days on 8 x H100, $1,890 at $3.75 per H100-hour" in text


def test_microdit_schedule_projects_the_rows_it_measured(tmp_path):
    out = tmp_path / "cost.json"
    result = throughput.main(["--preset", "microdit-tiny", "--schedule", "--schedule-batches", "2,1,1,1",
                              "--variants", "eager", "--steps", "1", "--warmup", "0", "--json", str(out),
                              "--plot", str(tmp_path / "cost.png")])
    rows = result["rows"]
    assert [(r["preset"], r["resolution"], r["mask_ratio"], r["batch"]) for r in rows] == [
        ("microdit-tiny", 256, 0.75, 2), ("microdit-tiny", 256, 0.0, 1), ("microdit-tiny", 512, 0.75, 1),
        ("microdit-tiny", 512, 0.0, 1)]
    assert all(r["error"] is None and r["img_per_s"] > 0 for r in rows)
    rate = {(r["resolution"], r["mask_ratio"]): r["img_per_s"] for r in rows}
    expected = [steps * 2048 / rate[res, mask] / 86400 for res, mask, steps in MICRODIT_TABLE]
    projection = result["schedule"]["variants"]["eager"]
    assert [s["gpu_days"] for s in projection["stages"]] == pytest.approx(expected, rel=1e-12)
    assert projection["gpu_days"] == pytest.approx(sum(expected), rel=1e-12)
    assert projection["usd"] == pytest.approx(sum(expected) * 24 * 3.75, rel=1e-12)  # the default price
    assert projection["a100_equivalent_gpu_days"] is None and projection["usd_at_published_rate"] is None  # CPU
    # the CPU has no energy counter: null energy with the reason, in the rows, the projection and the table
    for row in rows:
        assert row["energy_kwh_per_image"] is None and row["energy_j_per_step"] is None
        assert row["energy_note"] == "no NVML energy counter on a cpu device"
    assert projection["kwh"] is None and projection["kg_co2e"] is None
    assert result["schedule"]["energy_notes"] == ["no NVML energy counter on a cpu device"]
    assert "J/img, W: no energy reading: no NVML energy counter on a cpu device" in throughput.format_table(rows)
    text = throughput.format_schedule(result["schedule"])
    assert "kWh not measured: no NVML energy counter on a cpu device" in text and "Ember" in text
    saved = json.loads(out.read_text())
    assert saved["schedule"]["published"]["gpu_days"] == pytest.approx(20.8)
    assert saved["schedule"]["cost_basis"]["grid_gco2_per_kwh"] == throughput.GRID_GCO2_PER_KWH
    assert "Ember" in saved["schedule"]["cost_basis"]["grid_source"]
    assert saved["hardware"]["energy_counter"]["available"] is False
    assert (tmp_path / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_counter(readings_mj, info=None):
    def open_counter(device):
        return hardware.EnergyCounter(iter(readings_mj).__next__, info=info or {})
    return open_counter


def test_energy_co2_and_dollars_from_a_fake_counter(monkeypatch):
    # every row's counter reads 1,000,000 mJ before its timed steps and 1,450,000 after: 450 J over 2 steps
    monkeypatch.setattr(hardware, "open_energy_counter",
                        _fake_counter([1_000_000, 1_450_000], dict(gpu_name="Fake GPU", power_limit_w=700.0)))
    result = throughput.main(["--preset", "microdit-tiny", "--schedule", "--schedule-batches", "2,1,1,1",
                              "--variants", "eager", "--steps", "2", "--warmup", "0",
                              "--grid-gco2-per-kwh", "400", "--usd-per-gpu-hour", "2.5"])
    batch = {(r["resolution"], r["mask_ratio"]): r["batch"] for r in result["rows"]}
    for row in result["rows"]:
        assert row["energy_note"] is None
        assert row["energy_j_per_step"] == pytest.approx(225.0)
        assert row["energy_kwh_per_image"] == pytest.approx(225.0 / row["batch"] / 3.6e6)
        assert row["avg_power_w"] == pytest.approx(450.0 / row["energy_window_s"])
    kwh = sum(steps * 2048 * 225.0 / batch[res, mask] / 3.6e6 for res, mask, steps in MICRODIT_TABLE)
    projection = result["schedule"]["variants"]["eager"]
    assert [s["kwh"] for s in projection["stages"]] == pytest.approx(
        [steps * 2048 * 225.0 / batch[res, mask] / 3.6e6 for res, mask, steps in MICRODIT_TABLE], rel=1e-12)
    assert projection["kwh"] == pytest.approx(kwh, rel=1e-12)
    assert projection["kg_co2e"] == pytest.approx(kwh * 400 / 1000, rel=1e-12)
    assert projection["usd"] == pytest.approx(projection["gpu_days"] * 24 * 2.5, rel=1e-12)
    basis = result["schedule"]["cost_basis"]
    assert (basis["grid_gco2_per_kwh"], basis["usd_per_gpu_hour"]) == (400, 2.5)
    assert basis["grid_source"] == basis["price_source"] == "given by the user"
    assert result["hardware"]["energy_counter"] == dict(gpu_name="Fake GPU", power_limit_w=700.0, available=True,
                                                        reason=None)
    assert "kg CO2e: kWh x 400 g/kWh (given)" in throughput.format_schedule(result["schedule"])


def test_published_gpu_equivalents_and_the_papers_price_by_hand():
    schedule = {"published_cost": {"gpu": "A100", "gpu_days": 675, "usd": 26000, "usd_per_gpu_hour": None},
                "stages": [{"name": "a", "resolution": 256, "steps": 1000, "global_batch": 64},
                           {"name": "b", "resolution": 512, "mask_ratio": 0.5, "steps": 10, "global_batch": 32}]}
    rates, energy = {256: 100.0, (512, 0.5): 10.0}, {256: 2e-5, (512, 0.5): 1e-4}
    got = throughput.project_schedule(schedule, rates, 989.0, energy, throughput.CostBasis(300.0, 2.0))
    days = 1000 * 64 / 100 / 86400 + 10 * 32 / 10 / 86400
    kwh = 1000 * 64 * 2e-5 + 10 * 32 * 1e-4
    assert got["gpu_days"] == pytest.approx(days, rel=1e-12) and got["gpu_hours"] == pytest.approx(days * 24)
    assert got["a100_equivalent_gpu_days"] == pytest.approx(days * 989 / 312, rel=1e-12)
    assert got["published_gpu_equivalent_gpu_days"] == pytest.approx(days * 989 / 312, rel=1e-12)
    assert got["usd_at_published_rate"] == pytest.approx(days * 989 / 312 * 24 * 26000 / (675 * 24), rel=1e-12)
    assert got["kwh"] == pytest.approx(kwh) and got["kg_co2e"] == pytest.approx(kwh * 0.3)
    assert got["usd"] == pytest.approx(days * 24 * 2.0)
    published = throughput.published_cost(schedule)
    assert published["usd_per_gpu_hour_implied"] and published["usd_per_gpu_hour"] == pytest.approx(1.6049, abs=1e-4)
    # MicroDiT's paper states its price and counts H100s: on an H200 (same dense peak) H100-eq = GPU-days
    schedule["published_cost"] = {"gpu": "H100", "gpu_days": 20.8, "usd": 1890, "usd_per_gpu_hour": 3.75}
    got = throughput.project_schedule(schedule, rates, 989.0, None)
    assert got["published_gpu_equivalent_gpu_days"] == pytest.approx(days, rel=1e-12)
    assert got["usd_at_published_rate"] == pytest.approx(days * 24 * 3.75, rel=1e-12)
    assert got["kwh"] is None and got["kg_co2e"] is None
    assert got["usd"] == pytest.approx(days * 24 * throughput.USD_PER_GPU_HOUR)


def test_a_counter_that_does_not_move_or_is_missing_gives_null_energy():
    still = throughput.energy_fields(5_000, 5_000, steps=3, batch=2, window_s=0.01, reason=None)
    assert still["energy_kwh_per_image"] is None and "moved by 0 J over 3 steps" in still["energy_note"]
    missing = throughput.energy_fields(None, None, steps=3, batch=2, window_s=0.01, reason="no counter here")
    assert missing["energy_j_per_step"] is None and missing["energy_note"] == "no counter here"
