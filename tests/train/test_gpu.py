"""The CUDA path of `python -m train run`: bf16 autocast, fused AdamW, the DALI loader, GPU
metrics (MFU against the datasheet peak, memory); and NCCL data parallel where there are 2 GPUs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.train.conftest import CAPTIONED, REPO, cli_env, run_cli

pytestmark = pytest.mark.gpu


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_single_gpu_run(captioned_cache, tmp_path):
    out = tmp_path / "run"
    # The tiny preset reads with the torch loader (CPU tests); on the GPU the DALI one is under test.
    result = run_cli("run", "--preset", "tiny", "--stage", 2, "--data", captioned_cache, "--out", out,
                     "--max-steps", 20, "--set", 'data.backend="dali"', *CAPTIONED)
    assert "bf16" in result.stdout and "dali loader" in result.stdout and "cuda" in result.stdout
    records = _records(out)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(r["mem_gib"] > 0 for r in records)
    if any(name in torch.cuda.get_device_name() for name in ("A100", "H100", "H200")):
        assert all(0 < r["mfu"] < 1 for r in records)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_gpu_run(captioned_cache, tmp_path, parallel):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "train",
               "run", "--preset", "tiny", "--stage", "2", "--data", str(captioned_cache), "--out", str(out),
               "--max-steps", "10", "--set", f'train.parallel="{parallel}"', *CAPTIONED]
    result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"parallel {parallel}" in result.stdout
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _records(out))


def test_cuda_graph_run_matches_eager(captioned_cache, tmp_path):
    """train.cuda_graph (on by default here) against the eager loop: same data, same seeds, two
    micro-batches a step; the graph replays from step 3 on, so the losses of steps 3-8 come from
    replays; with recompute inside the graph too (whole blocks, parts of every second block), and
    "auto" recompute, which measures the tiny model and picks none. Linear and mlp pinned to
    triton: inside a graph their auto picks cuBLASLt, whose bf16 roundings differ from the eager
    loop's kernels."""
    losses = {}
    for graph, policy in (("off", "off"), ("on", "off"), ("on", "block"), ("on", "mlp,attn/2"), ("on", "auto")):
        out = tmp_path / f"{graph}-{policy}".replace(",", "_").replace("/", "_")
        result = run_cli("run", "--preset", "tiny", "--stage", 2, "--data", captioned_cache, "--out", out,
                         "--max-steps", 8, "--set", 'data.backend="torch"', "--set", "train.global_batch=16",
                         "--set", "train.micro_batch=8", "--set", "log.every=1", "--set", "optim.grad_clip=0.01",
                         "--set", f'train.cuda_graph="{graph}"', "--set", f'train.activation_checkpointing="{policy}"',
                         *CAPTIONED, ENGINE_BACKEND_LINEAR="triton", ENGINE_BACKEND_MLP="triton")
        records = _records(out)
        assert [r["cuda_graph"] for r in records] == [False, False] + [graph == "on"] * 6, records
        assert all(r["recompute"] == ("off" if policy == "auto" else policy) for r in records)
        if policy == "auto":
            assert "recompute off (auto:" in result.stdout and "fits" in result.stdout
        losses[graph, policy] = torch.tensor([r["loss"] for r in records])
    reference = losses["off", "off"]
    assert len(reference) == 8 and torch.isfinite(reference).all()
    for key, value in losses.items():
        torch.testing.assert_close(value, reference, rtol=1e-3, atol=1e-5, msg=f"{key}")
