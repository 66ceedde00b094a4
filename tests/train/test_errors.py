"""Bad input to `python -m train run` is a clear error naming the problem, reported before any
model is built."""

from __future__ import annotations

import pytest
import torch

import train.run
from tests.train.conftest import CAPTIONED, run_in_process


def _refuse_to_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run got as far as building the model")
    monkeypatch.setattr(train.run, "init_distributed", refuse)
    monkeypatch.setattr(train.run, "build_trainer", refuse)


@pytest.fixture(autouse=True)
def _no_model(monkeypatch):
    _refuse_to_build(monkeypatch)


def _fails(capsys, *args) -> str:
    assert run_in_process("run", *args) == 2
    return capsys.readouterr().err


def _tiny(stage, cache, out, *extra):
    return ["--preset", "tiny", "--stage", stage, "--data", cache, "--out", out, *extra]


def test_missing_cache(capsys, tmp_path):
    err = _fails(capsys, *_tiny(2, tmp_path / "nowhere", tmp_path / "out", *CAPTIONED))
    assert "nowhere" in err and "does not exist" in err


def test_cache_of_another_resolution(capsys, captioned_cache, tmp_path):
    # tiny stage 3 trains at 32px; the cache holds 16px images
    err = _fails(capsys, *_tiny(3, captioned_cache, tmp_path / "out", *CAPTIONED))
    assert "resolution=16" in err and "resolution=32" in err


def test_cache_of_another_text_width(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out"))  # the preset's caption_channels is 32
    # the message gives the fix: the model takes the cache's width, not a re-prepared cache
    assert "16-wide caption features" in err and "caption_channels = 32" in err
    assert "--set model.fields.caption_channels=16" in err


def test_stage_one_needs_labels(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(1, captioned_cache, tmp_path / "out"))
    assert "no class labels" in err and "--labels" in err


def test_pixel_cache_for_a_latent_config(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out", *CAPTIONED, "--set", "data.pixels=false"))
    assert "pixels" in err and "data.pixels = False" in err


def test_misspelt_key_in_a_config_file(capsys, captioned_cache, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\npreset = "tiny"\nresolution = 16\n[optim]\nweight_decy = 0.1\n')
    err = _fails(capsys, "--config", config, "--stage", 2, "--data", captioned_cache, "--out", tmp_path / "out")
    assert "unknown config key 'optim.weight_decy'" in err and "did you mean 'optim.weight_decay'" in err


def test_misspelt_key_in_a_setting(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out", "--set", "train.stesp=3"))
    assert "unknown config key 'train.stesp'" in err and "did you mean 'train.steps'" in err


def test_unknown_stage_and_preset(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(4, captioned_cache, tmp_path / "out"))
    assert "no stage '4'" in err
    err = _fails(capsys, "--preset", "pixart-alpha", "--stage", 3, "--data", captioned_cache, "--out", tmp_path)
    assert "sub-stages" in err and "3a" in err
    err = _fails(capsys, "--preset", "tinny", "--stage", 2, "--data", captioned_cache, "--out", tmp_path)
    assert "did you mean 'tiny'" in err


def test_batch_that_does_not_split(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out", *CAPTIONED, "--set", "train.micro_batch=3"))
    assert "train.global_batch = 8" in err and "micro_batch" in err


def test_resume_without_checkpoint(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out", *CAPTIONED, "--resume"))
    assert "--resume" in err and "no complete checkpoint" in err


def test_missing_init(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out", *CAPTIONED, "--init", tmp_path / "dit.pt"))
    assert "--init" in err and "dit.pt" in err


def test_existing_run_and_changed_config(capsys, captioned_cache, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.undo()  # this one trains two steps to get a checkpoint
    assert run_in_process("run", *_tiny(2, captioned_cache, out, *CAPTIONED, "--max-steps", 2)) == 0
    _refuse_to_build(monkeypatch)
    err = _fails(capsys, *_tiny(2, captioned_cache, out, *CAPTIONED))
    assert "already holds checkpoints" in err and "--resume" in err
    err = _fails(capsys, *_tiny(2, captioned_cache, out, *CAPTIONED, "--resume", "--set", "optim.lr=0.5"))
    assert "optim.lr" in err


def test_dali_loader_without_dali(capsys, captioned_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(train.run, "_dali_importable", lambda: False)
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out", *CAPTIONED, "--set", 'data.backend="dali"'))
    assert "nvidia.dali is not importable" in err and 'data.backend = "torch"' in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is about the missing CUDA device")
def test_cuda_graph_on_without_cuda(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out", *CAPTIONED, "--set", 'train.cuda_graph="on"'))
    assert 'train.cuda_graph = "on"' in err and "no CUDA device" in err


def test_cuda_graph_value(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out", *CAPTIONED, "--set", 'train.cuda_graph="yes"'))
    assert "train.cuda_graph = 'yes'" in err and "'auto', 'on', 'off'" in err


@pytest.mark.parametrize("kwargs,obstacle", [
    (dict(cuda=False), "no CUDA device"),
    (dict(world=2), "2 ranks"),
    (dict(compile=True), "train.compile"),
    (dict(batch_shapes=3), "3 shapes"),
])
def test_cuda_graph_resolution(kwargs, obstacle):
    from train.config import ConfigError

    allowed = dict(cuda=True, world=1, compile=False, batch_shapes=1)
    assert train.run.use_cuda_graph("auto", **allowed) == (True, "") == train.run.use_cuda_graph("on", **allowed)
    assert train.run.use_cuda_graph("off", **allowed) == (False, 'train.cuda_graph = "off"')
    blocked = {**allowed, **kwargs}
    on, why = train.run.use_cuda_graph("auto", **blocked)
    assert not on and obstacle in why  # the log says why the step runs eagerly
    assert not train.run.use_cuda_graph("off", **blocked)[0]
    with pytest.raises(ConfigError, match=obstacle):
        train.run.use_cuda_graph("on", **blocked)


@pytest.mark.parametrize("value,message", [
    ("mlp/0", "train.activation_checkpointing"),
    ("fast", "train.activation_checkpointing"),
    (-1, "train.activation_checkpointing"),
    (True, "train.activation_checkpointing"),
])
def test_recompute_setting_rejected(capsys, captioned_cache, tmp_path, value, message):
    setting = f"train.activation_checkpointing={value if not isinstance(value, str) else repr(value)}"
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out", *CAPTIONED, "--set",
                                setting.replace("True", "true")))
    assert message in err


def test_recompute_unknown_part(capsys, captioned_cache, tmp_path):
    err = _fails(capsys, *_tiny(2, captioned_cache, tmp_path / "out", *CAPTIONED, "--set",
                                'train.activation_checkpointing="ffn"'))
    assert "train.activation_checkpointing" in err and "'ffn'" in err and "mlp" in err
    assert not (tmp_path / "out").exists()  # found before anything was built or written
