"""Checkpoints and resume: a run killed after a step, then killed again in the middle of writing a
checkpoint, and resumed each time, ends bitwise equal to an uninterrupted run. Runs are
subprocesses that SIGKILL themselves at an exact point (ENGINE_DEBUG_KILL)."""

from __future__ import annotations

import json

import torch

from tests.train.conftest import CAPTIONED, load_weights, run_cli

STEPS = 40  # tiny preset: 40 steps, a checkpoint every 10, the newest 2 kept


def _run(cache, out, *extra, **env):
    return run_cli("run", "--preset", "tiny", "--stage", "2", "--data", cache, "--out", out, *CAPTIONED, *extra,
                   **env)


def _checkpoint_names(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _assert_same_final_state(reference, resumed):
    for which in ("model", "ema"):
        expected, actual = load_weights(reference, STEPS, which), load_weights(resumed, STEPS, which)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{which} {key} differs after resuming"
    final = f"checkpoints/step-{STEPS:07d}/optimizer.pt"
    expected_optim = torch.load(reference / final, weights_only=True)["state"]
    actual_optim = torch.load(resumed / final, weights_only=True)["state"]
    assert expected_optim.keys() == actual_optim.keys()
    for name, state in expected_optim.items():
        for key, value in state.items():
            assert torch.equal(value, actual_optim[name][key]), f"optimizer state {name}.{key} differs"


def test_killed_runs_resume_to_identical_weights(captioned_cache, tmp_path):
    reference = tmp_path / "uninterrupted"
    _run(captioned_cache, reference)

    out = tmp_path / "interrupted"
    killed = _run(captioned_cache, out, check=False, ENGINE_DEBUG_KILL="after-step:15")
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL right after step 15
    assert _checkpoint_names(out) == ["step-0000010"]

    # resume, and die between the first and second file of the step-20 checkpoint
    killed = _run(captioned_cache, out, "--resume", check=False, ENGINE_DEBUG_KILL="mid-checkpoint:20")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "resumed from" in killed.stdout and "(step 10)" in killed.stdout
    names = _checkpoint_names(out)
    # the unfinished step-20 checkpoint exists only as a hidden temporary folder
    assert names[0].startswith(".step-0000020.tmp-") and names[1:] == ["step-0000010"], names
    partial = out / "checkpoints" / names[0]
    assert (partial / "model.safetensors").exists() and not (partial / "optimizer.pt").exists()

    resumed = _run(captioned_cache, out, "--resume")
    assert "(step 10)" in resumed.stdout  # not from the partial step 20
    _assert_same_final_state(reference, out)
    assert _checkpoint_names(out) == ["step-0000030", "step-0000040"]  # keep = 2, leftovers removed
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, STEPS + 1, 5))  # repeated steps are logged once
