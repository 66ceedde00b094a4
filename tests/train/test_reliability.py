"""Checkpoints that cannot lie, guards that catch what they promise, and bad input that is named.

Each test reproduces one way a run used to go wrong silently (flipped or truncated checkpoint
files, rotation deleting the last finite checkpoint, an update writing inf into the weights, a
resume on another cache, a full disk, config values of the wrong type or out of range) and
checks that it is now refused or recovered, with a message naming the file, key or value.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from tests.train.conftest import CAPTIONED, run_in_process
from train import checkpoint
from train.config import ConfigError, load_run_config, preset_path

STEPS = 6


def _run(cache, out, *extra):
    return run_in_process("run", "--preset", "tiny", "--stage", 2, "--data", cache, "--out", out, "--max-steps",
                          STEPS, "--ckpt-every", 2, "--set", "checkpoint.keep=3", *CAPTIONED, *extra)


@pytest.fixture(scope="module")
def finished(captioned_cache, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _run(captioned_cache, out) == 0
    return out


def _copy_run(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _flip_bytes(path, count: int = 64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _step_dir(run, step):
    return run / "checkpoints" / f"step-{step:07d}"


@pytest.mark.parametrize("damage", ["flip model", "flip optimizer", "truncate ema"])
def test_resume_passes_over_a_damaged_checkpoint(finished, captioned_cache, tmp_path, capsys, damage):
    run = _copy_run(finished, tmp_path)
    how, which = damage.split()
    name = {"model": "model.safetensors", "optimizer": "optimizer.pt", "ema": "ema.safetensors"}[which]
    target = _step_dir(run, STEPS) / name
    if how == "flip":
        _flip_bytes(target)
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    capsys.readouterr()
    assert _run(captioned_cache, run, "--resume", "--max-steps", STEPS + 2) == 0
    printed = capsys.readouterr().out
    assert f"passes over checkpoint {_step_dir(run, STEPS)}: {name}" in printed
    assert ("SHA-256" if how == "flip" else "bytes") in printed
    assert f"(step {STEPS - 2})" in printed  # resumed from the previous checkpoint


def test_damaged_checkpoint_is_named_when_loaded(finished, tmp_path, capsys):
    run = _copy_run(finished, tmp_path)
    _flip_bytes(_step_dir(run, STEPS) / "ema.safetensors")
    capsys.readouterr()
    assert run_in_process("sample", "--ckpt", _step_dir(run, STEPS), "--prompt", "a red circle",
                          "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert "ema.safetensors does not match its SHA-256" in err and str(_step_dir(run, STEPS)) in err
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint .* verifies|does not match"):
        for step in (2, 4, 6):
            _flip_bytes(_step_dir(run, step) / "model.safetensors")
        folder, skipped = checkpoint.newest_verified(run)
        assert folder is None and len(skipped) == 3
        checkpoint.load_weights(_step_dir(run, 2), ema=False)


def _state(value: float):
    return {"w": torch.full((4, 3), value), "b": torch.zeros(3)}


def test_rotation_keeps_the_newest_finite_checkpoint(tmp_path):
    info = {"config": {}, "model": {"family": "pixart", "config": {}}}
    for step, value in ((1, 0.5), (2, float("nan")), (3, float("inf"))):
        checkpoint.save_checkpoint(tmp_path, step, _state(value), _state(value), {}, {}, info, keep=1)
    kept = [step for step, _ in checkpoint.complete_checkpoints(tmp_path)]
    assert kept == [1, 3]  # the newest (keep = 1) and the newest whose weights are finite
    manifests = [checkpoint.read_manifest(folder) for _, folder in checkpoint.complete_checkpoints(tmp_path)]
    assert [m["finite"] for m in manifests] == [True, False]
    checkpoint.save_checkpoint(tmp_path, 4, _state(1.0), _state(1.0), {}, {}, info, keep=1)
    assert [step for step, _ in checkpoint.complete_checkpoints(tmp_path)] == [4]


def test_update_that_makes_weights_inf_stops_the_run_unsaved(captioned_cache, tmp_path, capsys, monkeypatch):
    """An update that writes inf into a parameter while the loss and gradient norm were finite
    (here the optimizer's third step is made to, as an overflowing update would) stops the run
    with exit code 3 before anything is saved from it: the checkpoints left are those of steps
    1 and 2, finite."""
    original = torch.optim.AdamW.step
    calls = []

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    assert _run(captioned_cache, out, "--ckpt-every", 1, "--max-steps", 5) == 3
    assert "stopping at step 3: an optimizer update left parameters inf or NaN" in capsys.readouterr().out
    assert [step for step, _ in checkpoint.complete_checkpoints(out)] == [1, 2]
    for _, folder in checkpoint.complete_checkpoints(out):
        for ema in (False, True):
            assert checkpoint.all_finite(checkpoint.load_weights(folder, ema)), folder


def test_sample_and_export_refuse_non_finite_weights(finished, tmp_path, capsys):
    run = _copy_run(finished, tmp_path)
    folder = _step_dir(run, STEPS)
    weights = checkpoint.load_weights(folder, ema=True)
    weights[next(iter(weights))].view(-1)[0] = float("nan")
    info = checkpoint.read_run_info(folder)
    checkpoint.save_checkpoint(run, STEPS + 1, weights, weights, {}, {}, info, keep=5)
    capsys.readouterr()
    nan_folder = _step_dir(run, STEPS + 1)
    assert run_in_process("sample", "--ckpt", nan_folder, "--prompt", "x", "--out", tmp_path / "x.png") == 2
    assert "inf or NaN" in capsys.readouterr().err
    assert run_in_process("export", "--ckpt", nan_folder, "--to", "diffusers", tmp_path / "d") == 2
    assert "inf or NaN" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_resume_on_another_cache_is_refused(finished, captioned_cache, tmp_path, tmp_path_factory, capsys,
                                            text_encoder):
    from tests.train.conftest import build_pixel_cache

    other = build_pixel_cache(tmp_path_factory, "othercaptioned16", 40, 16, text_encoder)
    run = _copy_run(finished, tmp_path)
    capsys.readouterr()
    assert _run(other, run, "--resume", "--max-steps", STEPS + 2) == 2
    err = capsys.readouterr().err
    assert "was trained on latent cache" in err and str(other) in err and "--allow-data-change" in err
    assert _run(other, run, "--resume", "--allow-data-change", "--max-steps", STEPS + 2) == 0
    assert "--allow-data-change: continuing on" in capsys.readouterr().out


def test_resume_of_a_run_saved_before_a_setting_existed(finished, captioned_cache, tmp_path, capsys):
    """A run whose saved config lacks a setting added to the engine later resumes when the setting
    is at its default (what the run trained with), and is refused when it is not."""
    run = _copy_run(finished, tmp_path)
    for folder in (run / "checkpoints").iterdir():
        info_path = folder / "run.json"
        info = json.loads(info_path.read_text())
        del info["config"]["train"]["edm_sigma_data"]
        info_path.write_text(json.dumps(info))
        manifest = json.loads((folder / checkpoint.MANIFEST).read_text())  # as an older engine wrote it
        manifest["files"]["run.json"] = {"bytes": info_path.stat().st_size, "sha256": checkpoint._sha256(info_path)}
        (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert _run(captioned_cache, run, "--resume", "--max-steps", STEPS + 2, "--set", "train.edm_sigma_data=0.9") == 2
    assert "train.edm_sigma_data" in capsys.readouterr().err
    assert _run(captioned_cache, run, "--resume", "--max-steps", STEPS + 2) == 0


def test_full_disk_names_the_path_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    info = {"config": {}, "model": {"family": "pixart", "config": {}}}
    stale = tmp_path / "checkpoints" / ".step-0000001.tmp-999999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(OSError, match=r"needs about .* GiB and .*checkpoints has 0.00 GiB free") as raised:
        checkpoint.save_checkpoint(tmp_path, 2, _state(1.0), _state(1.0), {}, {}, info, keep=2)
    assert raised.value.filename == str(tmp_path / "checkpoints")
    assert not stale.exists()  # removed before the check, so the next attempt finds the room it left
    monkeypatch.undo()

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", no_space)
    with pytest.raises(OSError, match="writing checkpoint .*step-0000002: No space left on device"):
        checkpoint.save_checkpoint(tmp_path, 2, _state(1.0), _state(1.0), {}, {}, info, keep=2)
    assert os.listdir(tmp_path / "checkpoints") == []


@pytest.mark.parametrize("setting, message", [
    ("optim.lr=inf", "optim.lr = inf: expected a finite number"),
    ("optim.grad_clip=nan", "optim.grad_clip = nan: expected a finite number"),
    ("train.edm_p_mean=nan", "train.edm_p_mean = nan: expected a finite number"),
    ("optim.weight_decay=nan", "optim.weight_decay = nan: expected a finite number"),
    ("optim.weight_decay=-1", "optim.weight_decay = -1.0: expected a value >= 0"),
    ('optim.betas=["a", "b"]', "optim.betas[0] = 'a': expected float"),
    ("optim.betas=[0.9]", "optim.betas = [0.9]: expected 2 values"),
    ('model.fields.hidden_size="big"', "model.fields.hidden_size = 'big': expected int"),
    ("model.fields.mlp_ratio=nan", "model.fields.mlp_ratio = nan: expected a finite number"),
    ("model.pe_interpolation=0", "model.pe_interpolation = 0.0: expected a value > 0"),
    ('log.sample_solver="euler"', "log.sample_solver = 'euler': choose one of ['dpm', 'heun']"),
    ('log.sample_solver="heun"', "log.sample_solver = \"heun\" samples EDM-trained models; train.objective is 'iddpm'"),
    ("train.edm_sigma_data=0", "train.edm_sigma_data = 0.0: expected a value > 0"),
])
def test_config_values_are_checked(setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(preset_path("tiny"), "2", [setting])


def test_config_file_of_the_wrong_shape(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps([{"train": {"steps": 1}}]))
    with pytest.raises(ConfigError, match="the top level must be a table of sections"):
        load_run_config(path, "2")
    path.write_text(json.dumps({"train": [1, 2]}))
    with pytest.raises(ConfigError, match="train must be a table"):
        load_run_config(path, "2")


def test_batch_larger_than_the_data_and_unreadable_init(captioned_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(captioned_cache, out, "--set", "train.global_batch=4096") == 2
    assert "train.global_batch = 4096 is larger than latent cache" in capsys.readouterr().err
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())  # from the printed seed
    assert _run(captioned_cache, out, "--init", garbage) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"run: --init {garbage}: ") and "Traceback" not in err
    assert not out.exists()  # nothing was started: no empty run folder
