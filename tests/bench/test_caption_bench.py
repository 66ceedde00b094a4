"""bench/caption.py on the CPU: the tiny shape, a two-row sweep and a one-batch end-to-end run."""

from __future__ import annotations

import json

import pytest

import caption as bench_caption


def test_sweep_end_to_end_and_projection(tmp_path):
    out = tmp_path / "caption.json"
    result = bench_caption.main(["--shape", "tiny", "--batches", "1,2", "--max-new-tokens", "6", "--timed", "1",
                                 "--end-to-end", "1", "--workers", "1", "--image-size", "48x64", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["representative"] is False and "NOT representative" in result["note"]
    assert [row["batch"] for row in result["sweep"]] == [1, 2]
    assert all(row["img_per_s"] > 0 and row["error"] is None for row in result["sweep"])
    best = max(result["sweep"], key=lambda row: row["img_per_s"])
    assert result["best_batch"] == best["batch"]
    e2e = result["end_to_end"]
    assert e2e["batch"] == best["batch"] and e2e["images"] == best["batch"] and e2e["skipped"] == 0
    projection = result["projection"]
    assert projection["from"] == "end_to_end" and projection["images"] == 10_000_000
    assert projection["gpu_hours"] == pytest.approx(10_000_000 / e2e["img_per_s"] / 3600)
    assert result["prompt_tokens"] > 4  # the image's tokens and the prompt's
    for field in ("gpu_name", "torch", "date", "git_commit", "command"):
        assert field in result["environment"], field
    assert "--shape tiny" in result["environment"]["command"]


def test_llava_7b_shape_matches_its_published_config(tmp_path):
    """The benchmark's shape, checked on the configuration alone (no 7B weights on a CPU)."""
    spec = bench_caption._shape("llava-1.5-7b", 32064)
    assert spec["text"]["hidden_size"] == 4096 and spec["text"]["num_hidden_layers"] == 32
    assert spec["text"]["intermediate_size"] == 11008 and spec["text"]["vocab_size"] == 32064
    assert spec["vision"]["image_size"] == 336 and spec["vision"]["patch_size"] == 14
    assert spec["vision"]["num_hidden_layers"] == 24 and spec["vision_feature_layer"] == -2
    assert len(bench_caption._vocabulary("llava-1.5-7b")) == 32064
