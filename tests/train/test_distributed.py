"""Data parallel on CPU (gloo, torchrun): two ranks train the same weights as one process at the
same global batch, with DDP and with FSDP2, up to float summation order."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.train.conftest import CAPTIONED, REPO, cli_env, load_weights, run_in_process

STEPS = 4
# global batch 8: one process runs 2 micro-batches of 4 per step, two ranks 1 micro-batch of 4 each
COMMON = ["--preset", "tiny", "--stage", "2", "--max-steps", STEPS, "--ckpt-every", 2, *CAPTIONED]


@pytest.fixture(scope="module")
def single_process(captioned_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert run_in_process("run", *COMMON, "--data", captioned_cache, "--out", out, "--set", "train.micro_batch=4") == 0
    return out


def _torchrun(cache, out, parallel: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "train", "run", *map(str, COMMON), "--data", str(cache), "--out", str(out),
               "--set", f'train.parallel="{parallel}"']
    result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    assert "2 rank(s) x 4 x 1 accumulation = 8 per step" in result.stdout
    assert f"parallel {parallel}" in result.stdout


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process(captioned_cache, single_process, tmp_path, parallel):
    out = tmp_path / "run"
    _torchrun(captioned_cache, out, parallel)
    for which in ("model", "ema"):
        expected, actual = load_weights(single_process, STEPS, which), load_weights(out, STEPS, which)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=key: f"{parallel} {which} {k}: {m}")
    # the comparison can fail: the last two steps alone moved the weights far beyond the tolerance
    before, after = load_weights(single_process, STEPS - 2), load_weights(single_process, STEPS)
    assert max(float((after[k] - before[k]).abs().max()) for k in after) > 1e-3
