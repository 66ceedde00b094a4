"""A model family defined here, outside the engine, trains through `python -m train run`.

The family below (a small convolutional denoiser conditioned on pooled caption features, EDM
objective, captions dropped by zeroing) is registered when this module is imported; the CLI
subprocesses import it through ENGINE_FAMILIES. Nothing under train/ knows it: the run, its
checkpoints, a kill and the resume, sampling and export all go through engine.family's interface.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import family
from tests.train.conftest import TEXT_WIDTH, load_weights, run_cli

THIS_MODULE = "tests.train.test_family_plugin"
STEPS = 6


@dataclass(frozen=True)
class ToyConfig:
    input_size: int = 8
    in_channels: int = 4
    width: int = 8
    caption_channels: int = 16
    text_len: int = 8


class ToyDenoiser(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.inp = nn.Conv2d(config.in_channels, config.width, 3, padding=1)
        self.time = nn.Linear(1, config.width)
        self.text = nn.Linear(config.caption_channels, config.width)
        self.out = nn.Conv2d(config.width, config.in_channels, 3, padding=1)

    def forward(self, x, t, caption, caption_lens):
        valid = (torch.arange(caption.shape[1], device=x.device) < caption_lens[:, None]).to(x.dtype)  # (B, L)
        pooled = (caption * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)  # (B, Ct)
        cond = self.time(t.to(x.dtype)[:, None]) + self.text(pooled)  # (B, W)
        return self.out(F.silu(self.inp(x) + cond[:, :, None, None]))  # (B, C, H, W)


@family.register
class ToyFamily(family.Family):
    name = "toy"
    description = "test-only convolutional denoiser"
    config_class = ToyConfig
    condition = "caption"
    exporters = ("json",)
    presets = {"toy-conv": family.Preset(dict(width=8), 64, "8 channels")}

    def build(self, config):
        return ToyDenoiser(config)

    def text_len(self, config):
        return config.text_len

    def check_cache(self, config, cache):
        if cache.text_width != config.caption_channels:
            raise ValueError(f"cache text width {cache.text_width} != caption_channels {config.caption_channels}")

    def training_conditions(self, module, batch, generator, train):
        drop = torch.rand(batch["latent"].shape[0], generator=generator, device=generator.device) < train.caption_dropout
        caption = torch.where(drop[:, None, None], 0.0, batch["caption"].float())  # dropped: zero features
        return {"caption": caption, "caption_lens": batch["caption_lens"]}

    def flops(self, module, batch, train):
        B, _, h, w = batch["latent"].shape
        c = module.config
        return 3 * 2 * B * h * w * 9 * 2 * c.in_channels * c.width

    def preview_conditions(self, config, cache, count):
        ids = np.arange(count)
        return cache.read(ids, config.text_len)["text"], [cache.caption(int(i)) for i in ids]

    def sampling_conditions(self, model, count, condition, pixels_per_latent, device):
        from engine.family.pixart import pad_captions

        return pad_captions(condition, model.config.text_len, device)

    def null_conditions(self, model, count):
        zeros = torch.zeros(count, model.config.text_len, model.config.caption_channels)
        return {"caption": zeros, "caption_lens": torch.full((count,), model.config.text_len)}

    def init(self, module, source, objective):
        if not isinstance(source, ToyDenoiser):
            raise ValueError(f"holds a {type(source).__name__}")
        module.load_state_dict(source.state_dict())
        return "weights copied"

    def export(self, model, fmt, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "weights.json").write_text(json.dumps({k: v.tolist() for k, v in model.state_dict().items()}))
        return "JSON"


def _config(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(f"""
[model]
preset = "toy-conv"
resolution = 16
fields = {{ in_channels = 3, input_size = 16, caption_channels = {TEXT_WIDTH} }}
[data]
pixels = true
backend = "torch"
workers = 0
[optim]
lr = 1e-3
warmup_steps = 2
[train]
objective = "edm"
global_batch = 8
steps = {STEPS}
[checkpoint]
every = 2
keep = 2
[log]
every = 1
tensorboard = false
sample_every = 3
sample_count = 2
sample_steps = 2
[stages.only.train]
seed = 5
""")
    return path


def _run(config, cache, out, *extra, **env):
    return run_cli("run", "--config", config, "--stage", "only", "--data", cache, "--out", out, *extra,
                   ENGINE_FAMILIES=THIS_MODULE, **env)


def test_toy_family_trains_resumes_samples_and_exports(captioned_cache, tmp_path):
    config = _config(tmp_path)
    reference = tmp_path / "uninterrupted"
    first = _run(config, captioned_cache, reference)
    assert "stage only: Toy" in first.stdout
    lines = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert (reference / "samples" / "step-0000003.png").is_file()

    out = tmp_path / "interrupted"
    killed = _run(config, captioned_cache, out, check=False, ENGINE_DEBUG_KILL="after-step:3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _run(config, captioned_cache, out, "--resume")
    assert "(step 2)" in resumed.stdout
    for which in ("model", "ema"):
        expected, actual = load_weights(reference, STEPS, which), load_weights(out, STEPS, which)
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    run_info = json.loads((reference / "checkpoints" / f"step-{STEPS:07d}" / "run.json").read_text())
    assert run_info["model"] == {"family": "toy", "config": dataclasses.asdict(
        ToyConfig(input_size=16, in_channels=3, width=8, caption_channels=TEXT_WIDTH))}

    exported = run_cli("export", "--ckpt", reference, "--to", "json", tmp_path / "exported",
                       ENGINE_FAMILIES=THIS_MODULE)
    assert "as JSON" in exported.stdout and (tmp_path / "exported" / "weights.json").is_file()
    refused = run_cli("export", "--ckpt", reference, "--to", "diffusers", tmp_path / "x", check=False,
                      ENGINE_FAMILIES=THIS_MODULE)
    assert refused.returncode == 2 and "'toy' checkpoint" in refused.stderr
    listed = run_cli("run", "--help", ENGINE_FAMILIES=THIS_MODULE)
    assert "toy: test-only convolutional denoiser (presets: toy-conv)" in listed.stdout


def test_registry_rejects_clashes():
    class Clash(family.Family):
        name = "clash"
        presets = {"toy-conv": family.Preset({}, 64)}

    try:
        family.register(Clash)
    except ValueError as error:
        assert "already belong to 'toy'" in str(error)
    else:
        raise AssertionError("a preset registered twice was accepted")
    assert family.of_preset("toy-conv").name == "toy" and "clash" not in family.names()
