"""Run configs: every shipped preset and stage loads; PixArt-α's schedule numbers; typed errors."""

from __future__ import annotations

import json
import math

import pytest

from engine.config import DiTConfig, PixArtConfig
from train.config import ConfigError, load_run_config, parse_setting, preset_path
from train.loop import lr_at

STAGES = {"pixart-alpha": ["1", "2", "3a", "3b", "3c"], "tiny": ["1", "2", "3"], "demo": ["1", "2", "3"]}


@pytest.mark.parametrize("name,stage", [(n, s) for n, stages in STAGES.items() for s in stages])
def test_every_preset_stage_loads(name, stage):
    config = load_run_config(preset_path(name), stage)
    model = config.model_config()
    assert isinstance(model, DiTConfig if stage == "1" else PixArtConfig)
    if stage.startswith("3"):
        assert model.micro_conditions
    assert config.train.global_batch % (config.train.micro_batch or 1) == 0


def test_pixart_alpha_schedule():
    stages = {s: load_run_config(preset_path("pixart-alpha"), s) for s in STAGES["pixart-alpha"]}
    expected = {  # (steps, global batch, resolution, pe interpolation): docs/design.md §1 and the official configs
        "2": (150_000, 176 * 64, 256, 1.0), "3a": (90_000, 176 * 64, 256, 1.0),
        "3b": (100_000, 40 * 64, 512, 1.0), "3c": (16_000, 12 * 32, 1024, 2.0)}
    for stage, (steps, batch, resolution, pe) in expected.items():
        c = stages[stage]
        model = c.model_config()
        assert (c.train.steps, c.train.global_batch, c.model.resolution) == (steps, batch, resolution)
        assert model.pe_interpolation == pe and model.input_size == resolution // 8
        assert (c.optim.weight_decay, c.optim.eps, c.optim.grad_clip, c.train.ema_decay) == (0.03, 1e-10, 0.01, 0.9999)
        assert c.train.caption_dropout == 0.1 and c.optim.warmup_steps == 1000
        # official auto_lr: lr * sqrt(train_batch_size * world * accumulation / 256)
        assert c.lr() == pytest.approx(2e-5 * math.sqrt(batch / 256), rel=1e-12)
    assert stages["1"].model_config().num_classes == 1000 and stages["1"].lr() == 1e-4


def test_warmup_is_linear_then_constant():
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 3e-4, 0) == 3e-4


def test_json_and_toml_configs_agree(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text('[model]\npreset = "tiny"\nresolution = 16\n[train]\nsteps = 7\n[stages.2.optim]\nlr = 0.5\n')
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps({"model": {"preset": "tiny", "resolution": 16}, "train": {"steps": 7},
                                   "stages": {"2": {"optim": {"lr": 0.5}}}}))
    a, b = load_run_config(toml, "2"), load_run_config(as_json, "2")
    assert a == b and a.train.steps == 7 and a.optim.lr == 0.5


def test_settings_override_and_are_typed(tmp_path):
    config = load_run_config(preset_path("tiny"), "2", ["train.steps=3", "optim.betas=[0.8, 0.9]",
                                                       "model.fields.caption_channels=16", "data.backend=torch"])
    assert config.train.steps == 3 and config.optim.betas == (0.8, 0.9)
    assert config.model_config().caption_channels == 16
    assert parse_setting("log.sample_cfg=4") == (["log", "sample_cfg"], 4)
    with pytest.raises(ConfigError, match="train.steps = 'ten': expected int"):
        load_run_config(preset_path("tiny"), "2", ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"train.caption_dropout = 1.5: expected a value in \[0, 1\]"):
        load_run_config(preset_path("tiny"), "2", ["train.caption_dropout=1.5"])
    with pytest.raises(ConfigError, match="unknown preset 'tinyy'"):
        load_run_config(preset_path("tiny"), "1", ['model.preset="tinyy"'])
    # what a stage trains is what its tables say: stage 1 may train any preset's family
    assert load_run_config(preset_path("tiny"), "1", ['model.preset="tiny"']).model_config().caption_channels == 32
    edm = load_run_config(preset_path("tiny"), "2", ['train.objective="edm"', "train.edm_p_mean=0.5"]).train
    assert (edm.edm_p_mean, edm.edm_p_std) == (0.5, 1.2)
    with pytest.raises(ConfigError, match="train.edm_p_std = 0.0: expected a value > 0"):
        load_run_config(preset_path("tiny"), "2", ["train.edm_p_std=0"])
