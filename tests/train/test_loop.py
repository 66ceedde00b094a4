"""The loop with engine AdamW, whose step also applies the clipping coefficient and moves the EMA
(train.loop._fused_updates), against torch's AdamW with clip_grad_norm_ and the EMA's own lerp:
the same weights and EMA up to the optimizers' roundings, on the CPU."""

from __future__ import annotations

from tests.train.conftest import CAPTIONED, load_weights, run_cli

STEPS = 6


def _run(cache, out, optimizer: str, clip: float):
    run_cli("run", "--preset", "tiny", "--stage", "2", "--data", cache, "--out", out, *CAPTIONED,
            "--max-steps", STEPS, "--ckpt-every", STEPS, "--set", f'optim.name="{optimizer}"',
            "--set", f"optim.grad_clip={clip}", "--set", "train.ema_decay=0.5", "--set", "optim.warmup_steps=0")


def _largest_difference(a, b, which: str) -> float:
    x, y = load_weights(a, STEPS, which), load_weights(b, STEPS, which)
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def test_folded_clip_and_ema_train_as_the_separate_passes(captioned_cache, tmp_path):
    _run(captioned_cache, tmp_path / "torch", "adamw", 0.01)
    _run(captioned_cache, tmp_path / "engine", "engine", 0.01)
    _run(captioned_cache, tmp_path / "unclipped", "engine", 0.0)
    for which in ("model", "ema"):
        # an EMA left behind (decay 0.5 moves it far each step) or a lost coefficient fails here
        same = _largest_difference(tmp_path / "torch", tmp_path / "engine", which)
        assert same < 1e-5, (which, same)
        # what a lost coefficient would look like: far outside that tolerance
        assert _largest_difference(tmp_path / "torch", tmp_path / "unclipped", which) > 100 * max(same, 1e-7)
