"""Data parallel on CPU (gloo, torchrun): two ranks train the same weights as one process at the
same global batch, with DDP and with FSDP2, up to float summation order, for PixArt and for
MicroDiT (masked, with its mixer's blocks as FSDP2 units); a rank killed mid-run is restarted by
torchrun's elastic agent and the run ends as if nothing had happened."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.train.conftest import CAPTIONED, REPO, build_pixel_cache, cli_env, load_weights, run_in_process

STEPS = 4
# global batch 8: one process runs 2 micro-batches of 4 per step, two ranks 1 micro-batch of 4 each
COMMON = ["--preset", "tiny", "--stage", "2", "--max-steps", STEPS, "--ckpt-every", 2, *CAPTIONED]
# MicroDiT's stage 1 (75% of the tokens masked after the mixer, expert-choice MoE) at the same
# global batch; the mixer has blocks of its own, sharded as units of their own under FSDP2
MICRODIT = ["--preset", "microdit-tiny", "--stage", "1", "--max-steps", STEPS, "--ckpt-every", 2, *CAPTIONED,
            "--set", "train.global_batch=8", "--set", "train.micro_batch=4"]


@pytest.fixture(scope="module")
def single_process(captioned_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert run_in_process("run", *COMMON, "--data", captioned_cache, "--out", out, "--set", "train.micro_batch=4") == 0
    return out


@pytest.fixture(scope="module")
def microdit_cache(tmp_path_factory, text_encoder):
    return build_pixel_cache(tmp_path_factory, "microdit16", 16, 16, text_encoder, max_tokens=8)  # its text_len


@pytest.fixture(scope="module")
def microdit_single_process(microdit_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("microdit_single") / "run"
    assert run_in_process("run", *MICRODIT, "--data", microdit_cache, "--out", out) == 0
    return out


def _torchrun(cache, out, parallel: str, *extra, restarts: int = 0, common=COMMON,
              **env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(restarts), "-m", "train", "run", *map(str, common), "--data", str(cache),
               "--out", str(out), "--set", f'train.parallel="{parallel}"', *extra]
    result = subprocess.run(command, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    assert "2 rank(s) x 4 x 1 accumulation = 8 per step" in result.stdout
    assert f"parallel {parallel}" in result.stdout
    return result


def _assert_same_training(single_process, out, parallel):
    for which in ("model", "ema"):
        expected, actual = load_weights(single_process, STEPS, which), load_weights(out, STEPS, which)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=key: f"{parallel} {which} {k}: {m}")
    # the comparison can fail: the last two steps alone moved the weights far beyond the tolerance
    before, after = load_weights(single_process, STEPS - 2), load_weights(single_process, STEPS)
    assert max(float((after[k] - before[k]).abs().max()) for k in after) > 1e-3


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process(captioned_cache, single_process, tmp_path, parallel):
    out = tmp_path / "run"
    _torchrun(captioned_cache, out, parallel)
    _assert_same_training(single_process, out, parallel)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_microdit_ranks_match_one_process(microdit_cache, microdit_single_process, tmp_path, parallel):
    """Each rank draws its samples' kept tokens and caption drops from the generator of its
    micro-batch, seeded as the one process seeds the same micro-batch: the same training."""
    out = tmp_path / "run"
    _torchrun(microdit_cache, out, parallel, common=MICRODIT)
    _assert_same_training(microdit_single_process, out, parallel)


def test_a_rank_killed_mid_run_is_restarted_from_the_last_checkpoint(captioned_cache, tmp_path):
    """torchrun --max-restarts 1 with --auto-resume: rank 1 SIGKILLs itself after step 3 (the last
    checkpoint is step 2's), the elastic agent restarts both ranks with the same command, and they
    continue from step 2 to the end: weights, EMA and optimizer state bitwise those of a run of
    the same two ranks that nothing killed."""
    reference, restarted = tmp_path / "unkilled", tmp_path / "killed"
    _torchrun(captioned_cache, reference, "ddp", "--auto-resume", restarts=1)
    result = _torchrun(captioned_cache, restarted, "ddp", "--auto-resume", restarts=1,
                       ENGINE_DEBUG_KILL="after-step:3@1")
    assert "--auto-resume:" in result.stdout and "resumed from" in result.stdout and "(step 2)" in result.stdout, \
        result.stdout[-3000:]
    for which in ("model", "ema"):
        expected, actual = load_weights(reference, STEPS, which), load_weights(restarted, STEPS, which)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), which
    final = f"checkpoints/step-{STEPS:07d}/optimizer.pt"
    expected = torch.load(reference / final, weights_only=True)["state"]
    actual = torch.load(restarted / final, weights_only=True)["state"]
    for name, state in expected.items():
        for key, value in state.items():
            assert torch.equal(value, actual[name][key]), f"optimizer state {name}.{key}"
