"""The loop with engine AdamW, whose step also applies the clipping coefficient and moves the EMA
(train.loop._fused_updates), against torch's AdamW with clip_grad_norm_ and the EMA's own lerp:
the same weights and EMA up to the optimizers' roundings, on the CPU; and its non-finite skip
decided on the device (train.loop.DeviceSkip) against the skip decided on the host."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.data.cache import Sample, shard_name, write_index, write_shard
from tests.train.conftest import CAPTIONED, TEXT_WIDTH, load_weights, run_cli, run_in_process
from train import loop

STEPS = 6


def _run(cache, out, optimizer: str, clip: float):
    run_cli("run", "--preset", "tiny", "--stage", "2", "--data", cache, "--out", out, *CAPTIONED,
            "--max-steps", STEPS, "--ckpt-every", STEPS, "--set", f'optim.name="{optimizer}"',
            "--set", f"optim.grad_clip={clip}", "--set", "train.ema_decay=0.5", "--set", "optim.warmup_steps=0")


def _largest_difference(a, b, which: str) -> float:
    x, y = load_weights(a, STEPS, which), load_weights(b, STEPS, which)
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def test_folded_clip_and_ema_train_as_the_separate_passes(captioned_cache, tmp_path):
    _run(captioned_cache, tmp_path / "torch", "adamw", 0.01)
    _run(captioned_cache, tmp_path / "engine", "engine", 0.01)
    _run(captioned_cache, tmp_path / "unclipped", "engine", 0.0)
    for which in ("model", "ema"):
        # an EMA left behind (decay 0.5 moves it far each step) or a lost coefficient fails here
        same = _largest_difference(tmp_path / "torch", tmp_path / "engine", which)
        assert same < 1e-5, (which, same)
        # what a lost coefficient would look like: far outside that tolerance
        assert _largest_difference(tmp_path / "torch", tmp_path / "unclipped", which) > 100 * max(same, 1e-7)


def _partly_nan_cache(path, count: int = 16, nan_every: int = 4):
    """A 16 px captioned cache in which every ``nan_every``-th sample's latent is NaN: a batch
    holding one has a NaN loss, and its step is skipped."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        mean = rng.standard_normal((3, 16, 16)).astype(np.float16)
        if i % nan_every == 0:
            mean[:] = np.nan
        samples.append(Sample(mean=mean, std=np.zeros((3, 16, 16), np.float16),
                              text=rng.standard_normal((4, TEXT_WIDTH)).astype(np.float16), label=-1,
                              orig_size=(16, 16), bucket=0, caption="c", source=f"{i}"))
    entry = write_shard(path / "shards", shard_name(0), samples, [], TEXT_WIDTH)
    write_index(path, {"resolution": 16, "multi_aspect": False, "buckets": [[16, 16]], "latent_channels": 3,
                       "latent_downsample": 1, "vae": {"path": "pixels"}, "text_encoder": None,
                       "text_width": TEXT_WIDTH, "max_tokens": 8, "labels": False, "classes": []}, [entry])
    return path


def test_skip_decided_on_the_device_is_the_skip_decided_on_the_host(tmp_path, monkeypatch):
    """engine AdamW launches the update before the host reads whether the step was finite, and the
    pass itself leaves a non-finite step unapplied (train.loop.DeviceSkip): weights, EMA and
    optimizer state bitwise those of reading first and not launching (the loop without
    DeviceSkip), over steps some of which are skipped."""
    cache = _partly_nan_cache(tmp_path / "cache")
    steps = 8
    args = ["run", "--preset", "tiny", "--stage", 2, "--data", cache, "--max-steps", steps, "--ckpt-every", steps,
            *CAPTIONED, "--set", 'optim.name="engine"', "--set", "train.global_batch=2", "--set",
            "train.micro_batch=2", "--set", "train.max_nonfinite_steps=100", "--set", "train.ema_decay=0.5",
            "--set", "optim.warmup_steps=0", "--set", "log.every=1"]
    assert run_in_process(*args, "--out", tmp_path / "device") == 0
    monkeypatch.setattr(loop, "DeviceSkip", lambda optimizer, device: None)
    assert run_in_process(*args, "--out", tmp_path / "host") == 0
    records = [json.loads(line) for line in (tmp_path / "device" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_total"] for r in records if "skipped_total" in r][-1]
    assert 0 < skipped < steps, f"{skipped} of {steps} steps skipped: the test needs both kinds"
    for which in ("model", "ema"):
        ours, theirs = load_weights(tmp_path / "device", steps, which), load_weights(tmp_path / "host", steps, which)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), which
    final = f"checkpoints/step-{steps:07d}/optimizer.pt"
    ours = torch.load(tmp_path / "device" / final, weights_only=True)["state"]
    theirs = torch.load(tmp_path / "host" / final, weights_only=True)["state"]
    for name, state in theirs.items():
        for key, value in state.items():
            assert torch.equal(value, ours[name][key]), f"optimizer state {name}.{key}"


def test_energy_per_step_from_the_gpus_counter(captioned_cache, tmp_path, monkeypatch, capsys):
    """Each log line's gpu_energy_j_per_step is the counter's rise since the previous line over the
    interval's steps; the plain log prints it; without a counter (a CPU) the field is null."""
    from engine.hardware import EnergyCounter

    rises_mj = iter(np.random.default_rng().integers(1_000, 90_000, size=64).tolist())
    readings = []

    def read():  # a cumulative counter rising by a random amount between readings
        readings.append((readings[-1] if readings else 5_000_000) + next(rises_mj))
        return readings[-1]

    args = ["run", "--preset", "tiny", "--stage", 2, "--data", captioned_cache, "--max-steps", 7, *CAPTIONED,
            "--set", "log.every=3"]
    assert run_in_process(*args, "--out", tmp_path / "cpu") == 0
    lines = [json.loads(line) for line in (tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()]
    assert [r["gpu_energy_j_per_step"] for r in lines if "step" in r] == [None, None, None]

    monkeypatch.setattr(loop, "open_energy_counter", lambda device: EnergyCounter(read))
    assert run_in_process(*args, "--out", tmp_path / "gpu") == 0
    lines = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["gpu_energy_j_per_step"]) for r in lines if "step" in r]
    assert [step for step, _ in logged] == [3, 6, 7] and len(readings) == 4  # one reading at the start
    for (step, joules), before, after, steps in zip(logged, readings, readings[1:], (3, 3, 1)):
        assert joules == pytest.approx((after - before) / 1e3 / steps, rel=1e-4), step
    assert f"{logged[0][1]:.4g} J/step" in capsys.readouterr().out  # the plain log line
