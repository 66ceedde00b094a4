"""MicroDiT's four stages (train/configs/microdit.toml): the preset's numbers against the official
configs, the lr schedules and the EMA start against their closed forms, the tiny twin
(microdit-tiny.toml) through all four stages on the CPU (stage 3 from stage 2's weights at twice
the size, stages 2 and 4 with the optimizer state), a stage killed and resumed bitwise, the masked
training loss by hand, and the errors reported before a model is built."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import train.run
from engine import family
from engine.diffusion import EDM
from engine.model.layers import sincos_pos_embed
from tests.train.conftest import CAPTIONED, TEXT_WIDTH, build_pixel_cache, load_weights, run_cli, run_in_process
from train import loop
from train.checkpoint import load_model
from train.config import load_run_config, preset_path

TEXT_LEN = 8  # microdit-tiny's text_len: the caches keep that many caption tokens (--max-tokens)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adam_steps(run, step) -> set[int]:
    state = torch.load(run / f"checkpoints/step-{step:07d}/optimizer.pt", weights_only=True)["state"]
    return {int(s["step"]) for s in state.values()}


# ------------------------------------------------------------------------------ the preset

def test_preset_follows_the_official_configs():
    """Every number of the four stages, as configs/res_{256,512}_{pretrain,finetune}.yaml of
    SonyResearch/micro_diffusion give it (sources in the preset's comments)."""
    stages = {s: load_run_config(preset_path("microdit"), s) for s in "1234"}
    expected = {  # steps, micro-batch, resolution, mask, lr, schedule, warm-up, clip, (P_mean, P_std), EMA, start
        "1": (250_000, 256, 256, 0.75, 2.4e-4, "cosine", 2500, 0.25, (-0.6, 1.2), 0.0, 0),
        "2": (30_000, 64, 256, 0.0, 8e-5, "constant", 0, 0.25, (-0.6, 1.2), 0.0, 0),
        "3": (50_000, 32, 512, 0.75, 8e-5, "constant", 500, 0.5, (0.0, 0.6), 0.99975, 25_000),
        "4": (5_000, 16, 512, 0.0, 8e-5, "constant", 0, 0.5, (0.0, 0.6), 0.9975, 1),
    }
    for stage, (steps, micro, res, mask, lr, schedule, warmup, clip, p, ema, start) in expected.items():
        c, o, t = stages[stage], stages[stage].optim, stages[stage].train
        model = c.model_config()
        assert (t.steps, t.micro_batch, c.model.resolution, t.mask_ratio) == (steps, micro, res, mask)
        assert (c.lr(), o.schedule, o.warmup_steps, o.grad_clip, (t.edm_p_mean, t.edm_p_std)) == (
            lr, schedule, warmup, clip, p)
        assert (t.ema_decay, t.ema_start) == (ema, start)
        assert (o.weight_decay, o.eps, o.betas, o.warmup_from_zero) == (0.1, 1e-8, (0.9, 0.999), True)
        assert (t.global_batch, t.objective, t.edm_sigma_data, t.caption_dropout) == (2048, "edm", 0.9, 0.1)
        assert (model.text_len, model.caption_channels, model.input_size) == (77, 1024, res // 8)
        assert model.pe_interpolation == res / 256  # pos_interp_scale 1 and 2
        assert t.init_from_stage == ("" if stage == "1" else str(int(stage) - 1)) and not t.init_ema
        assert t.init_optimizer == (stage in "24")  # the finetunes resume the whole state, stage 3 weights only
    assert stages["1"].optim.lr_floor == 0.33
    # the tiny twin has the same structure
    for stage in "1234":
        real, tiny = stages[stage], load_run_config(preset_path("microdit-tiny"), stage)
        assert tiny.model_config().input_size == (16 if stage in "12" else 32)
        for section, keys in (("optim", ("schedule", "warmup_from_zero", "grad_clip")),
                              ("train", ("init_from_stage", "init_optimizer", "init_ema", "edm_p_mean", "edm_p_std",
                                         "objective", "edm_sigma_data"))):
            for key in keys:
                assert getattr(getattr(tiny, section), key) == getattr(getattr(real, section), key), (stage, key)
        assert (tiny.train.mask_ratio > 0) == (real.train.mask_ratio > 0)


def test_lr_schedules_against_their_closed_forms():
    peak, warmup, end, floor = 3.0, 4, 14, 0.25
    steps = np.arange(20)
    x = np.clip((steps - warmup) / (end - warmup), 0.0, 1.0)
    cosine = np.where(steps < warmup, steps / warmup, floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * x))) * peak
    got = [loop.lr_at(int(s), peak, warmup, "cosine", end, floor, from_zero=True) for s in steps]
    np.testing.assert_allclose(got, cosine, rtol=1e-15, atol=0)
    assert got[0] == 0.0 and got[warmup] == peak and got[end] == got[-1] == floor * peak
    assert got[warmup + (end - warmup) // 2] == pytest.approx(peak * (floor + (1 - floor) / 2), rel=1e-15)
    # warm-up from step 1 (the engine's default) and the constant schedule
    assert [loop.lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [loop.lr_at(s, 1.0, 4, from_zero=True) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert loop.lr_at(5, 2.0, 0, "cosine", 5, 0.5) == 1.0  # an end at or before the warm-up's: the floor

    # MicroDiT stage 1: 2.4e-4 after 2500 warm-up steps from 0, half-way down at the middle of the
    # decay, 0.33 x 2.4e-4 = 0.792e-4 at step 250K (which the stage's last step, 249999, precedes)
    stage1 = load_run_config(preset_path("microdit"), "1")
    assert loop.step_lr(stage1, 0) == 0.0 and loop.step_lr(stage1, 1250) == pytest.approx(1.2e-4, rel=1e-15)
    assert loop.step_lr(stage1, 2500) == 2.4e-4
    assert loop.step_lr(stage1, 126_250) == pytest.approx(2.4e-4 * (0.33 + 0.67 / 2), rel=1e-15)
    assert 0.792e-4 < loop.step_lr(stage1, 249_999) < 0.792e-4 * (1 + 1e-9)
    assert loop.step_lr(stage1, 250_000) == pytest.approx(0.792e-4, rel=1e-15)
    # decay_steps pins the end whatever train.steps is
    short = load_run_config(preset_path("microdit"), "1", ["train.steps=3000", "optim.decay_steps=250000"])
    assert loop.step_lr(short, 2999) == loop.step_lr(stage1, 2999)
    stage3 = load_run_config(preset_path("microdit"), "3")
    assert [loop.step_lr(stage3, s) for s in (0, 250, 500, 49_999)] == [0.0, 4e-5, 8e-5, 8e-5]


def test_runs_from_before_the_new_keys_resume():
    """A run.json written before optim.schedule and friends existed compares equal to today's
    config with those keys at their defaults (what that run trained with)."""
    current = json.loads(json.dumps(load_run_config(preset_path("tiny"), "2").to_dict()))
    old = json.loads(json.dumps(current))
    for section, key in (("optim", "schedule"), ("optim", "lr_floor"), ("optim", "decay_steps"),
                         ("optim", "warmup_from_zero"), ("train", "ema_start"), ("train", "init_from_stage"),
                         ("train", "init_optimizer")):
        del old[section][key]
    assert train.run._differences(old, current) != []
    assert train.run._differences(train.run._with_defaults(old), current) == []


def test_ema_decay_by_step():
    assert [loop.ema_decay_at(s, 0.9, 3) for s in range(5)] == [0.0, 0.0, 0.0, 0.9, 0.9]
    assert [loop.ema_decay_at(s, 0.9, 0) for s in range(2)] == [0.9, 0.9]


# ------------------------------------------------------------------------------ the four stages

@pytest.fixture(scope="module")
def caches(tmp_path_factory, text_encoder):
    return {res: build_pixel_cache(tmp_path_factory, f"microdit{res}", 8, res, text_encoder, max_tokens=TEXT_LEN)
            for res in (16, 32)}


@pytest.fixture(scope="module")
def stages(caches, tmp_path_factory):
    """The tiny schedule, each stage from the one before; stages 3 and 4 keep a checkpoint of
    every step. Stage 3 runs in a subprocess, as the uninterrupted reference of the resume test;
    the others in this process on one thread, as the subprocesses run (the tiny model's ops are
    too small to gain from two, and CI's two cores are shared)."""
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_stages(caches, tmp_path_factory, runs)
    finally:
        torch.set_num_threads(threads)
    return runs


def _train_stages(caches, tmp_path_factory, runs):
    previous = None
    for stage in "1234":
        out = tmp_path_factory.mktemp(f"microdit_stage{stage}") / "run"
        args = ["run", "--preset", "microdit-tiny", "--stage", stage, "--data", caches[16 if stage in "12" else 32],
                "--out", out, *CAPTIONED, *(["--init", previous] if previous else [])]
        if stage in "34":
            args += ["--ckpt-every", 1, "--set", "checkpoint.keep=10"]
        if stage == "3":
            run_cli(*args)
        else:
            assert run_in_process(*args) == 0
        runs[stage] = previous = out


def test_four_stages_train_with_their_schedules(stages):
    for stage, out in stages.items():
        config = load_run_config(preset_path("microdit-tiny"), stage, [f"model.fields.caption_channels={TEXT_WIDTH}"])
        records = _records(out)
        assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
        assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in records)
        # each logged lr (the step's, logged after it, to 6 digits) is the schedule's
        assert [r["lr"] for r in records] == pytest.approx([loop.step_lr(config, r["step"] - 1) for r in records],
                                                           rel=1e-5, abs=0)
    assert _records(stages["1"])[0]["lr"] == 0.0 and _records(stages["3"])[1]["lr"] == 5e-4  # warm-ups from 0
    # stages 2 and 4 continue Adam's step counts; stage 3 starts its own
    assert _adam_steps(stages["2"], 2) == {6 + 2} and _adam_steps(stages["3"], 4) == {4}
    assert _adam_steps(stages["4"], 2) == {4 + 2}


def test_stage3_starts_from_stage2_weights_at_twice_the_size(stages):
    """Stage 3's first step trains at lr 0 (its warm-up starts at 0), so its weights after that step
    are stage 2's last raw weights, bit for bit; its position table is re-made for the 16 x 16 grid
    over the coordinates of stage 2's 8 x 8 one (pe_interpolation 2 against 1)."""
    before, after = load_weights(stages["2"], 2), load_weights(stages["3"], 1)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model2, model3 = load_model(stages["2"], ema=False), load_model(stages["3"], ema=False)
    dim = model3.config.hidden_size
    table3 = model3.pos_embed.table.double()  # (256, D)
    torch.testing.assert_close(table3, sincos_pos_embed(dim, 16, 16, 16, 2.0), rtol=0, atol=1e-6)
    # even rows and columns of the 16 x 16 grid sit where stage 2's 8 x 8 tokens sat
    even = table3.view(16, 16, dim)[::2, ::2].reshape(64, dim)
    torch.testing.assert_close(even, model2.pos_embed.table.double(), rtol=0, atol=1e-6)


def test_ema_follows_the_weights_until_its_start(stages):
    """Stage 3 (ema_start 3, decay 0.9): the EMA is the weights after steps 1-3, then averages;
    stage 4 (ema_start 1): a copy after its first step; stages 1 and 2 (decay 0): the weights."""
    for run, start, last in ((stages["3"], 3, 4), (stages["4"], 1, 2)):
        model = {s: load_weights(run, s) for s in range(1, last + 1)}
        ema = {s: load_weights(run, s, "ema") for s in range(1, last + 1)}
        for s in range(1, start + 1):
            assert all(torch.equal(ema[s][k], model[s][k]) for k in model[s]), s
        for s in range(start + 1, last + 1):
            for k in model[s]:
                torch.testing.assert_close(ema[s][k], torch.lerp(ema[s - 1][k], model[s][k], 0.1), rtol=1e-6,
                                           atol=1e-7)
            assert any(not torch.equal(ema[s][k], model[s][k]) for k in model[s])
    for stage, step in (("1", 6), ("2", 2)):
        model, ema = load_weights(stages[stage], step), load_weights(stages[stage], step, "ema")
        assert all(torch.equal(ema[k], model[k]) for k in model)


def test_killed_stage_resumes_bitwise(stages, caches, tmp_path):
    """Stage 3 killed after step 3, resumed from its step-2 checkpoint across the EMA's start:
    weights, EMA and optimizer state end bitwise equal to the uninterrupted run's (the stages
    fixture's, which differs only in how often it saved)."""
    def run(out, *extra, **env):
        return run_cli("run", "--preset", "microdit-tiny", "--stage", 3, "--data", caches[32], "--out", out,
                       *CAPTIONED, *extra, **env)

    reference, out = stages["3"], tmp_path / "interrupted"
    killed = run(out, "--init", stages["2"], check=False, ENGINE_DEBUG_KILL="after-step:3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run(out, "--resume")
    assert "(step 2)" in resumed.stdout
    for which in ("model", "ema"):
        expected, actual = load_weights(reference, 4, which), load_weights(out, 4, which)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), which
    states = [torch.load(r / "checkpoints/step-0000004/optimizer.pt", weights_only=True)["state"]
              for r in (reference, out)]
    assert states[0].keys() == states[1].keys()
    for name, state in states[0].items():
        assert all(torch.equal(value, states[1][name][key]) for key, value in state.items()), name


def test_masked_training_loss_by_hand():
    """train.loop.micro_batch_loss at mask ratio 0.75 equals the official masked EDM loss written
    out patch by patch: the draws in the loop's order (caption drop, the masking noise whose
    ascending order names the kept tokens, σ, the noise), then weight x (D - x0)², mean over
    channels, mean over each kept 2 x 2 patch, mean over the kept patches, mean over the batch."""
    config = load_run_config(preset_path("microdit-tiny"), "1", [f"model.fields.caption_channels={TEXT_WIDTH}"])
    t = config.train
    fam = family.of_config(config.model_config())
    torch.manual_seed(0)
    model = fam.build(config.model_config())
    for p in model.parameters():  # zero-initialised layers would make the output trivial
        p.data.add_(0.02 * torch.randn_like(p))
    B, T, K, side = 3, 64, 16, 8  # 16 px pixels, patch 2: 64 tokens, int(64 x 0.25) kept
    batch = {"latent": torch.randn(B, 3, 16, 16), "caption": torch.randn(B, TEXT_LEN, TEXT_WIDTH)}
    objective = EDM(sigma_data=t.edm_sigma_data, p_mean=t.edm_p_mean, p_std=t.edm_p_std)
    with torch.no_grad():
        loss = loop.micro_batch_loss(fam, model, model, objective, t, None, batch, torch.Generator().manual_seed(11))

        g = torch.Generator().manual_seed(11)
        drop = torch.rand(B, generator=g) < t.caption_dropout
        keep = torch.rand(B, T, generator=g).argsort(dim=1, stable=True)[:, :K]
        sigma = torch.exp(t.edm_p_mean + t.edm_p_std * torch.randn(B, generator=g))
        noise = torch.randn(batch["latent"].shape, generator=g)
        caption = torch.where(drop[:, None, None], 0.0, batch["caption"])
        sd = 0.9
        x0 = batch["latent"]
        total = 0.0
        for b in range(B):
            s = sigma[b].item()
            c_in, c_skip, c_out = 1 / math.sqrt(s * s + sd * sd), sd * sd / (s * s + sd * sd), s * sd / math.sqrt(
                s * s + sd * sd)
            x = x0[b:b + 1] + s * noise[b:b + 1]
            out = model(c_in * x, torch.tensor([math.log(s) / 4]), caption[b:b + 1], keep[b:b + 1])
            error = (s * s + sd * sd) / (s * sd) ** 2 * (c_skip * x + c_out * out - x0[b:b + 1]) ** 2
            error = error[0].mean(dim=0)  # (16, 16): mean over channels
            patches = [error[2 * (k // side):2 * (k // side) + 2, 2 * (k % side):2 * (k % side) + 2].mean().item()
                       for k in keep[b].tolist()]
            total += sum(patches) / K
    assert loss.item() == pytest.approx(total / B, rel=1e-5)


# ------------------------------------------------------------------------------ errors before any model

@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run got as far as building the model")
    monkeypatch.setattr(train.run, "init_distributed", refuse)
    monkeypatch.setattr(train.run, "build_trainer", refuse)


def _fails(capsys, stage, cache, out, *extra) -> str:
    code = run_in_process("run", "--preset", "microdit-tiny", "--stage", stage, "--data", cache, "--out", out, *extra)
    assert code == 2
    return capsys.readouterr().err


def test_errors_before_any_model_is_built(stages, caches, capsys, tmp_path, no_model):
    out = tmp_path / "out"
    # stage 3 continues stage 2: without --init, or from a checkpoint of another stage
    err = _fails(capsys, 3, caches[32], out, *CAPTIONED)
    assert "stage 3 continues from stage 2's weights" in err and "--init" in err
    err = _fails(capsys, 3, caches[32], out, *CAPTIONED, "--init", stages["1"])
    assert "checkpoint of stage '1'" in err and "stage '2'" in err
    # a cache whose captions do not fit the model: width (caption_channels 32 against 16), length
    err = _fails(capsys, 1, caches[16], out)
    assert "16-wide caption features" in err and "caption_channels = 32" in err
    err = _fails(capsys, 1, caches[16], out, *CAPTIONED, "--set", "model.fields.text_len=4")
    assert f"max_tokens = {TEXT_LEN}" in err and "text_len = 4" in err and "--max-tokens 4" in err
    # mask ratios outside [0, 1)
    for ratio in (1.0, -0.25):
        err = _fails(capsys, 1, caches[16], out, *CAPTIONED, "--set", f"train.mask_ratio={ratio}")
        assert f"train.mask_ratio = {ratio}" in err and "[0, 1)" in err
    err = _fails(capsys, 1, caches[16], out, *CAPTIONED, "--set", 'optim.schedule="linear"')
    assert "optim.schedule = 'linear'" in err and "'cosine'" in err
    # the optimizer state comes from engine checkpoints only
    official = tmp_path / "dit.pt"
    official.write_bytes(b"not an engine checkpoint")
    err = _fails(capsys, 2, caches[16], out, *CAPTIONED, "--init", official)
    assert "train.init_optimizer" in err and "dit.pt" in err
    # a cosine run resumed with another length would change every later lr
    err = _fails(capsys, 1, caches[16], stages["1"], *CAPTIONED, "--resume", "--max-steps", 8)
    assert "cosine schedule ends at train.steps" in err and "keep train.steps = 6" in err
