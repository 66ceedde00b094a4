"""train.activation_checkpointing in a run: a recompute policy trains to the same weights as none,
the log says which one ran and why the step is no CUDA graph, and "auto" on the CPU means off."""

from __future__ import annotations

import json

import torch

from tests.train.conftest import CAPTIONED, load_weights, run_cli

STEPS = 4


def _run(cache, out, setting: str):
    return run_cli("run", "--preset", "tiny", "--stage", "2", "--data", cache, "--out", out, *CAPTIONED,
                   "--max-steps", STEPS, "--ckpt-every", STEPS, "--set", "log.every=2",
                   "--set", f"train.activation_checkpointing={setting}")


def test_recompute_trains_to_the_same_weights_and_is_logged(captioned_cache, tmp_path):
    plain = _run(captioned_cache, tmp_path / "off", "'off'")
    recomputed = _run(captioned_cache, tmp_path / "mlp", "'mlp,attn/2'")
    automatic = _run(captioned_cache, tmp_path / "auto", "'auto'")
    assert "recompute off (train.activation_checkpointing = 'off')" in plain.stdout
    assert "recompute mlp,attn/2 (train.activation_checkpointing = 'mlp,attn/2')" in recomputed.stdout
    assert "recompute off (auto: no memory budget to fit on the CPU)" in automatic.stdout
    for which in ("model", "ema"):
        expected, actual = load_weights(tmp_path / "off", STEPS, which), load_weights(tmp_path / "mlp", STEPS, which)
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{which} {key} differs with recompute"
    records = [json.loads(line) for line in (tmp_path / "mlp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert record["recompute"] == "mlp,attn/2" and record["cuda_graph"] is False
        assert "no CUDA device" in record["cuda_graph_off"]
        assert record["step_ms"] > 0 and 0 <= record["data_wait_ms"] <= record["step_ms"]
    # the plain log line carries the same
    assert "recompute mlp,attn/2" in recomputed.stdout and "graph off" in recomputed.stdout
    assert "ms/step" in recomputed.stdout
