"""bench/kernels.py on the CPU: the attention, patchify, linear, mlp and gated_add rows at their smoke shapes, the
speedup bookkeeping, the flash-attn baseline's key packing, and shape parsing."""

import csv
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# Loaded under its own name: plain `import kernels` finds the installed `kernels` package first
# (tests/conftest.py puts bench/ last on the path).
_spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "bench" / "kernels.py")
kernels = importlib.util.module_from_spec(_spec)
sys.modules["bench_kernels"] = kernels  # dataclasses look their module up there
_spec.loader.exec_module(kernels)

from engine.ops.backend import unavailable_reason  # noqa: E402
from engine.ops.cross_attention import cross_attention_ref  # noqa: E402

NEW_OPS = ("cross_attention", "self_attention", "patchify", "unpatchify", "linear", "mlp", "gated_add", "moe")
SDPA_KERNEL_NAMES = {"cudnn", "flash", "efficient", "math"}


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9)


def _check_speedups(rows):
    """speedup_vs_eager and speedup_vs_best_baseline recomputed from the rows' own times."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["direction"]), []).append(r)
    for (op, _, _), group in groups.items():
        by_name = {r["variant"]: r for r in group}
        eager = by_name["eager"]["time_us"]
        reference = {b.name for b in kernels.OPS[op].baselines if b.reference}
        timed_refs = [r for r in group if r["variant"] in reference and r["time_us"] is not None]
        best = min(timed_refs, key=lambda r: r["time_us"]) if timed_refs else None
        for r in group:
            assert r["best_baseline"] == (best["variant"] if best else None), r
            if r["time_us"] is None:
                assert r["speedup_vs_eager"] is None and r["speedup_vs_best_baseline"] is None, r
                continue
            assert _close(r["speedup_vs_eager"], eager / r["time_us"]), r
            if best is None:
                assert r["speedup_vs_best_baseline"] is None, r
            else:
                assert _close(r["speedup_vs_best_baseline"], best["time_us"] / r["time_us"]), r


# Triton 3.9's interpreter multiplies bf16 tiles in tl.dot as raw bit patterns (see
# tests/ops/test_cross_attention.py), so the interpreted cross-attention computes garbage that can
# overflow exp2; only the timing bookkeeping is under test here.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_smoke_run_has_a_row_for_every_variant_and_baseline(tmp_path):
    out, table = tmp_path / "kernels.json", tmp_path / "kernels.csv"
    kernels.main(["--ops", ",".join(NEW_OPS), "--json", str(out), "--csv", str(table)])
    saved = json.loads(out.read_text())
    rows = saved["rows"]

    for op in NEW_OPS:
        spec = kernels.OPS[op]
        expected = [*kernels.VARIANTS, *(b.name for b in spec.baselines)]
        for direction in kernels.DIRECTIONS:
            got = [r["variant"] for r in rows if r["op"] == op and r["direction"] == direction]
            assert got == expected, (op, direction)
            assert {r["shape"] for r in rows if r["op"] == op} == {spec.cpu_shape}

    for r in rows:
        assert (r["time_us"] is None) != (r["skipped"] is None), r  # a time or a reason, never both
        assert r["kind"] == ("engine" if r["variant"] in kernels.VARIANTS else "baseline"), r
        if r["time_us"] is not None:
            assert r["time_us"] > 0
            assert _close(r["gbps"], r["bytes"] / (r["time_us"] / 1e6) / 1e9), r
            assert _close(r["copy_share"], r["gbps"] * 1e9 / saved["copy_bandwidth_bytes_per_s"]), r
        else:
            assert r["skipped"].strip(), r
    _check_speedups(rows)

    def row(op, variant, direction="both"):
        (found,) = [r for r in rows if r["op"] == op and r["variant"] == variant and r["direction"] == direction]
        return found

    # What must run on a CPU: the eager references, the Triton kernels (interpreted), the C++
    # reference path of engine._C where it is built, and SDPA's math kernel.
    for op in NEW_OPS:
        assert row(op, "eager")["time_us"] is not None, op
    for op in ("cross_attention", "self_attention", "patchify", "unpatchify", "linear", "mlp", "gated_add"):
        assert row(op, "triton")["time_us"] is not None, row(op, "triton")["skipped"]
    cpu_cuda_reason = unavailable_reason("cuda", torch.device("cpu"))
    for op in ("patchify", "unpatchify", "linear", "mlp"):  # linear, mlp: gemm_epilogue's C++ reference
        assert (row(op, "cuda")["time_us"] is not None) == (cpu_cuda_reason is None), row(op, "cuda")
    assert row("gated_add", "cuda")["skipped"] == "gated_add has no cuda backend"
    for op in ("cross_attention", "self_attention"):
        assert row(op, "sdpa-math")["time_us"] is not None, row(op, "sdpa-math")["skipped"]
    assert "mask" in row("cross_attention", "sdpa-flash")["skipped"]
    if kernels.flash_attn_varlen_func is None:
        assert "flash_attn" in row("cross_attention", "flash-attn")["skipped"]
        assert "flash_attn" in row("cross_attention", "cuda")["skipped"]

    # self_attention names the SDPA kernel of its eager and cuda backends, and its triton backend's
    # kernels; nothing else is labelled.
    for r in rows:
        if r["op"] == "self_attention" and r["variant"] in ("eager", "cuda"):
            assert r["kernel"] in SDPA_KERNEL_NAMES, r
        elif r["op"] == "self_attention" and r["variant"] == "triton":
            assert r["kernel"] == "triton", r
        else:
            assert r["kernel"] is None, r

    with open(table, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"speedup_vs_best_baseline", "best_baseline", "kernel", "kind", "git_commit"} <= set(csv_rows[0])


def _row(variant, kind, time_us, direction="fwd"):
    return dict(op="cross_attention", shape="s", direction=direction, variant=variant, kind=kind, time_us=time_us,
                best_baseline=None, speedup_vs_best_baseline=None)


def test_best_baseline_is_the_fastest_reference_one():
    spec = kernels.OPS["cross_attention"]
    rows = [_row("triton", "engine", 100.0), _row("eager", "engine", None),
            _row("sdpa-cudnn", "baseline", 300.0), _row("sdpa-efficient", "baseline", 250.0),
            _row("sdpa-math", "baseline", None),
            _row("flash-attn", "baseline", 50.0),  # faster, but not a reference for the 1.5x bar
            _row("triton", "engine", 80.0, "bwd"), _row("sdpa-cudnn", "baseline", None, "bwd")]
    kernels.add_baseline_speedups(spec, rows)
    fwd, bwd = rows[:6], rows[6:]
    assert all(r["best_baseline"] == "sdpa-efficient" for r in fwd)
    assert [r["speedup_vs_best_baseline"] for r in fwd] == [2.5, None, 250 / 300, 1.0, None, 5.0]
    assert all(r["best_baseline"] is None and r["speedup_vs_best_baseline"] is None for r in bwd)


def test_uncapturable_baseline_is_skipped_under_the_graph_timer():
    baseline = kernels.Baseline("b", lambda *args: args, reference=False, not_capturable="reads a length on the host")
    cuda = torch.device("cuda")  # a device object only: nothing runs
    fn, reason = kernels.baseline_function(baseline, cuda, "cudagraph")
    assert fn is None and "reads a length on the host" in reason
    assert kernels.baseline_function(baseline, cuda, "do_bench") == (baseline.fn, None)


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """flash_attn_varlen_func's contract, written plainly: sequence i's queries attend to its keys."""
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        qs = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
        ks = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
        assert qs.stop - qs.start <= max_seqlen_q and ks.stop - ks.start <= max_seqlen_k
        scores = torch.einsum("nhd,lhd->hnl", q[qs], k[ks]) * q.shape[-1] ** -0.5
        out[qs] = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v[ks])
    return out


def test_flash_attn_baseline_packs_the_valid_keys(monkeypatch):
    monkeypatch.setattr(kernels, "flash_attn_varlen_func", _varlen_attention)
    B, N, H, d, L = 3, 5, 2, 8, 7
    q = torch.randn(B, N, H, d, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, L, 2, H, d, dtype=torch.float64, requires_grad=True)
    kv_lens = torch.tensor([1, L, 4])
    grad = torch.randn(B, N, H, d, dtype=torch.float64)
    (out,) = kernels._flash_attn_packed(q, kv, kv_lens)
    got = torch.autograd.grad(out, (q, kv), grad)
    expected_out = cross_attention_ref(q, *kv.unbind(2), kv_lens)
    expected = torch.autograd.grad(expected_out, (q, kv), grad)
    torch.testing.assert_close(out, expected_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("parse, text, expected", [
    (kernels.parse_cross_shape, "64x256x16x72x120", (64, 256, 16, 72, 120, False)),
    (kernels.parse_cross_shape, "32x1024x16x72x120r", (32, 1024, 16, 72, 120, True)),
    (kernels.parse_self_shape, "64x256x16x72", (64, 256, 16, 72)),
    (kernels.parse_image_shape, "32x4x64x64p2", (32, 4, 64, 64, 2)),
    (kernels.parse_bnd, "64x256x1152", (64, 256, 1152)),
    (kernels.parse_linear_shape, "16384x1152x4608g", (16384, 1152, 4608, True)),
    (kernels.parse_linear_shape, "16384x4608x1152", (16384, 4608, 1152, False)),
    (kernels.parse_mlp_shape, "16384x1152x4608x1152", (16384, 1152, 4608, 1152)),
])
def test_shape_parsers_read_good_shapes(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("parse, text", [
    (kernels.parse_cross_shape, "64x256x16x72"),         # L missing
    (kernels.parse_cross_shape, "64x256x16x72x0r"),      # zero keys
    (kernels.parse_cross_shape, "64x256x16x72x120rr"),
    (kernels.parse_self_shape, "64x256x16x72x120"),
    (kernels.parse_self_shape, "64x256x-16x72"),
    (kernels.parse_image_shape, "64x4x32x32"),           # no patch size
    (kernels.parse_image_shape, "64x4x32x32p0"),
    (kernels.parse_image_shape, "64x4x33x32p2"),         # H not a multiple of p
    (kernels.parse_bnd, "64x256"),
    (kernels.parse_linear_shape, "16384x1152g"),         # N missing
    (kernels.parse_mlp_shape, "16384x1152x4608"),        # N missing
    (kernels.parse_linear_shape, "16384x1152x4608gg"),
    (kernels.parse_linear_shape, "16384x0x4608"),
])
def test_shape_parsers_name_the_bad_shape(parse, text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse(text)


def test_bad_shapes_stop_the_run_before_timing():
    with pytest.raises(SystemExit, match=re.escape("'64x4x33x32p2'")):
        kernels.main(["--ops", "patchify,cross_attention", "--shapes", "64x4x33x32p2"])
    with pytest.raises(SystemExit, match="no shape for cross_attention"):
        kernels.main(["--ops", "patchify,cross_attention", "--shapes", "2x4x8x8p2"])
