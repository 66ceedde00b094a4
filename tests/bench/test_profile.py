"""bench/step_profile.py: the kernel classifier on real kernel names, the per-step summary worked by
hand, the event selection, and a tiny profiled training step on the CPU."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

REPO = Path(__file__).resolve().parents[2]

import step_profile  # noqa: E402
from step_profile import CATEGORIES, TOP_KERNELS, KernelTime, classify, recorded_kernels, summarise  # noqa: E402

# Kernel names as torch.profiler reports them on H100 / H200 (and aten op names of the CPU smoke run).
KNOWN_NAMES = {
    "gemm": [
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
        "kernel__5x_cublas",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNN",
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>"
        "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::Params)",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, "
        "false>(cublasLt::cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*)",
        "triton_tem_fused_mm_0",
        "aten::mm",
        "aten::addmm",
    ],
    "attention": [
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_20_64x64x64_4x1x1_kernel0_0",
        "pytorch_flash::flash_fwd_kernel<...>",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<96, 64, 128, 8, "
        "2, 4, 2, false, false, cutlass::bfloat16_t, Flash_kernel_traits<96, 64, 128, 8, cutlass::bfloat16_t> >, "
        "true, false, false, false, false, false>(pytorch_flash::Flash_bwd_params)",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80",
        "fmha_cutlassB_bf16_aligned_64x64_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<"
        "cutlass::arch::Sm80, cutlass::bfloat16_t, true, false, true, 64, 64, 128, false>::Params)",
        "_cross_attention_fwd_kernel",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
    ],
    "fused": [
        "_add_norm_modulate_fwd_kernel",
        "_norm_modulate_bwd_kernel",
        "void engine::(anonymous namespace)::norm_modulate_reduce_kernel(float const*, float*, float*, float*, int, "
        "int, int)",
        "void engine::(anonymous namespace)::unpatchify_kernel<__nv_bfloat16>(__nv_bfloat16 const*, __nv_bfloat16*, "
        "engine::(anonymous namespace)::PatchShape)",
        "engine::norm_modulate_fwd",
    ],
    "optimizer": [
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
        "(at::native::ADAM_MODE)1, false>, double*, double, double, double, double, double, bool, double*, double*>",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "TensorListMetadata<2>, at::native::(anonymous namespace)::BinaryOpListAlphaFunctor<float, 2, 2, 0>, "
        "std::plus<float>, float>",
        "aten::_fused_adamw_",
        "_adamw_kernel",
    ],
    "elementwise": [
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
        "at::native::GeluType)::{lambda()#2}::operator()() const::{lambda()#4}::operator()() const::"
        "{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >",
        "triton_poi_fused_add_mul_0",
        "triton_red_fused__to_copy_native_layer_norm_1",
        "triton_per_fused_native_layer_norm_2",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
        "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
        "unsigned int, float, 4, 4> >(at::native::ReduceOp<float, at::native::func_wrapper_t<float> >)",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::"
        "(anonymous namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, false>(int, "
        "float, c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, c10::BFloat16*)",
        "aten::add",
    ],
    "copy": [
        "Memcpy DtoD (Device -> Device)",
        "Memcpy HtoD (Pageable -> Device)",
        "Memset (Device)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda("
        "at::TensorIteratorBase&)::{lambda()#1}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul> >",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType"
        "<2u>, unsigned int, 3, 64, 64>(at::native::(anonymous namespace)::OpaqueType<2u>*)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >"
        "(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)",
        "aten::copy_",
    ],
    "other": [
        "some_kernel_nobody_has_named_yet",
        # cuDNN's "engines" namespace must not pass for the engine's own kernels
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, "
        "(cudnnKernelDataType_t)0>(cudnn::engines_precompiled::nchw2nhwc_params_t<float>)",
    ],
}


@pytest.mark.parametrize("category,name", [(c, n) for c, names in KNOWN_NAMES.items() for n in names])
def test_known_kernel_names_land_in_their_category(category, name):
    assert classify(name) == category


def test_every_engine_kernel_is_a_fused_op_attention_or_optimizer():
    # helpers that jit functions call (e.g. _load_tile) are no kernels of their own: only `*_kernel` launches
    sources = [path for folder in ("ops", "optim") for path in sorted((REPO / "engine" / folder).glob("*.py"))]
    triton_kernels = [name for path in sources
                      for name in re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text())]
    cuda_kernels = [name for path in sorted((REPO / "csrc").glob("*.cu"))
                    for name in re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(",
                                           path.read_text())]
    assert len(triton_kernels) >= 4 and len(cuda_kernels) >= 3
    for name in triton_kernels:  # CUPTI reports a Triton kernel by its Python function name
        expected = "attention" if "attention" in name else "optimizer" if "adamw" in name else "fused"
        assert classify(name) == expected, name
    for name in cuda_kernels:  # ... and a CUDA kernel by its demangled signature
        demangled = f"void engine::(anonymous namespace)::{name}<__nv_bfloat16>(float const*, int)"
        assert classify(demangled) == ("attention" if "attention" in name else "fused"), demangled


def test_summary_by_hand():
    kernels = [  # two steps: (name, us, start, end)
        KernelTime("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNN", 300.0, 0.0, 300.0),
        KernelTime("_norm_modulate_fwd_kernel", 100.0, 300.0, 400.0),
        KernelTime("Memset (Device)", 50.0, 400.0, 450.0),
        KernelTime("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNN", 300.0, 500.0, 800.0),
        KernelTime("_norm_modulate_fwd_kernel", 100.0, 800.0, 900.0),
        KernelTime("mystery_kernel", 150.0, 900.0, 1050.0),
    ]
    got = summarise(kernels, steps=2, wall_ms=0.55, batch=8)
    step = got["step"]
    assert step["kernel_ms"] == pytest.approx(0.5)  # 1000 us over 2 steps
    assert step["idle_ms"] == pytest.approx(0.05) and step["idle_pct_of_wall"] == pytest.approx(100 * 0.05 / 0.55)
    assert step["img_per_s"] == pytest.approx(8 / 0.55e-3)
    assert step["kernels_per_step"] == 3 and step["profiled_span_ms"] == pytest.approx(1050 / 2 / 1e3)
    expected = dict(gemm=(0.3, 60.0, 1.0), fused=(0.1, 20.0, 1.0), copy=(0.025, 5.0, 0.5), other=(0.075, 15.0, 0.5),
                    attention=(0, 0, 0), optimizer=(0, 0, 0), elementwise=(0, 0, 0))
    assert list(got["categories"]) == list(CATEGORIES)
    for category, (ms, pct, calls) in expected.items():
        row = got["categories"][category]
        assert row["ms_per_step"] == pytest.approx(ms), category
        assert row["pct_of_kernel_time"] == pytest.approx(pct), category
        assert row["pct_of_wall"] == pytest.approx(100 * ms / 0.55), category
        assert row["calls_per_step"] == calls, category
    assert got["largest_non_gemm"] == dict(name="fused", ms_per_step=pytest.approx(0.1),
                                           pct_of_wall=pytest.approx(100 * 0.1 / 0.55))
    assert [(k["name"][:5], k["category"]) for k in got["top_kernels"]] == [
        ("nvjet", "gemm"), ("_norm", "fused"), ("myste", "other"), ("Memse", "copy")]
    assert [k["name"] for k in got["top_other"]] == ["mystery_kernel"]
    assert got["top_other"][0]["ms_per_step"] == pytest.approx(0.075)

    # launch gaps that outweigh every category are the largest non-GEMM share
    assert summarise(kernels, steps=2, wall_ms=2.0, batch=8)["largest_non_gemm"]["name"] == "idle"
    with pytest.raises(RuntimeError, match="no kernels"):
        summarise([], steps=1, wall_ms=1.0, batch=1)


def _event(name, device_type, start, end, annotation=False, self_cpu_us=0.0):
    time_range = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, device_type=device_type, is_user_annotation=annotation, time_range=time_range,
                           self_cpu_time_total=self_cpu_us)


def test_event_selection_keeps_only_work():
    events = [
        _event("ProfilerStep#7", DeviceType.CPU, 0, 100),
        _event("ProfilerStep#7", DeviceType.CUDA, 0, 100, annotation=True),  # GPU copy of the annotation
        _event("aten::mm", DeviceType.CPU, 1, 20, self_cpu_us=15.0),
        _event("autograd::engine::evaluate_function: MmBackward0", DeviceType.CPU, 20, 40, self_cpu_us=3.0),
        _event("engine::patchify", DeviceType.CPU, 40, 45, self_cpu_us=5.0),
        _event("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNN", DeviceType.CUDA, 10, 30),
        _event("Memcpy DtoD (Device -> Device)", DeviceType.CUDA, 30, 32),
        _event("Context Sync", DeviceType.CUDA, 32, 90),  # the host waiting in torch.cuda.synchronize()
        _event("Stream Wait Event", DeviceType.CUDA, 90, 91),
    ]
    gpu = recorded_kernels(events, torch.device("cuda"))
    assert [(k.name[:5], k.us, k.start_us, k.end_us) for k in gpu] == [("nvjet", 20, 10, 30), ("Memcp", 2, 30, 32)]
    cpu = recorded_kernels(events, torch.device("cpu"))
    assert [(k.name, k.us) for k in cpu] == [("aten::mm", 15.0), ("engine::patchify", 5.0)]


FAST = ["--steps", "2", "--warmup", "0", "--batch", "2"]


def test_cpu_run_writes_json_markdown_and_trace(tmp_path):
    out, md, trace = tmp_path / "profile.json", tmp_path / "profile.md", tmp_path / "trace.json"
    result = step_profile.main([*FAST, "--json", str(out), "--md", str(md), "--trace", str(trace)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["representative"] is False and "NOT representative" in saved["note"]
    for field in ("gpu_name", "torch", "triton", "date", "git_commit", "command"):
        assert field in saved["environment"], field
    assert "--md" in saved["environment"]["command"]
    assert saved["settings"]["variant"] == "engine" and saved["settings"]["preset"] == "tiny"

    categories, step = saved["categories"], saved["step"]
    assert list(categories) == list(CATEGORIES)
    assert math.fsum(c["pct_of_kernel_time"] for c in categories.values()) == pytest.approx(100.0)
    assert math.fsum(c["pct_of_wall"] for c in categories.values()) + step["idle_pct_of_wall"] == pytest.approx(100.0)
    assert math.fsum(c["ms_per_step"] for c in categories.values()) == pytest.approx(step["kernel_ms"])
    assert categories["gemm"]["ms_per_step"] > 0 and categories["attention"]["ms_per_step"] > 0
    assert step["img_per_s"] == pytest.approx(2 / (step["wall_ms"] / 1e3))

    top = saved["top_kernels"]
    assert 0 < len(top) <= TOP_KERNELS and [k["ms_per_step"] for k in top] == sorted((k["ms_per_step"] for k in top),
                                                                              reverse=True)
    assert all(k["category"] == classify(k["name"]) for k in top)
    assert all(classify(k["name"]) == "other" for k in saved["top_other"])
    assert saved["category_rules"] == [list(rule) for rule in step_profile.CATEGORY_RULES]

    text = md.read_text()
    for label in step_profile.CATEGORY_LABELS.values():
        assert f"| {label} |" in text, label
    assert "idle (wall - kernels)" in text and "NOT representative" in text and "`aten::mm`" in text
    assert "traceEvents" in json.loads(trace.read_text())


def test_cpu_run_profiles_a_masked_microdit_step(tmp_path):
    md = tmp_path / "profile.md"
    result = step_profile.main([*FAST, "--preset", "microdit-tiny", "--mask-ratio", "0.75", "--md", str(md)])
    s = result["settings"]
    assert (s["preset"], s["resolution"], s["mask_ratio"], s["variant"]) == ("microdit-tiny", 64, 0.75, "engine")
    assert result["categories"]["gemm"]["ms_per_step"] > 0 and result["categories"]["attention"]["ms_per_step"] > 0
    assert "microdit-tiny 64px, batch 2, mask 0.75" in md.read_text()
    with pytest.raises(SystemExit, match="no diffusers MicroDiT model"):
        step_profile.main([*FAST, "--preset", "microdit-tiny", "--variant", "diffusers"])


def test_sources_name_the_launching_op_and_where_it_ran_from(tmp_path):
    md = tmp_path / "profile.md"
    result = step_profile.main([*FAST, "--preset", "microdit-tiny", "--mask-ratio", "0.75", "--sources", "200",
                                "--md", str(md)])
    rows = result["sources"]
    assert 0 < len(rows) <= 200
    assert all(step_profile.classify(r["kernel"]) in step_profile.SOURCE_CATEGORIES for r in rows)
    assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows), reverse=True)
    wheres = [r["where"] for r in rows]
    # forward ops name the model's own frames; backward ops the autograd node that ran them
    assert any("engine/model/microdit.py(" in w and "backward of" not in w for w in wheres)
    assert any(w.startswith("backward of ") for w in wheres)
    assert any(r["shapes"] for r in rows)
    assert "Where the costliest kernels" in md.read_text()
    with pytest.raises(SystemExit, match="--sources needs a variant launched op by op"):
        step_profile.main([*FAST, "--variant", "engine+graph", "--sources", "5"])


def test_bad_arguments_are_clear_errors():
    with pytest.raises(SystemExit, match="unknown 'fastest'"):
        step_profile.main(["--variant", "fastest"])
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        step_profile.main(["--steps", "0"])
    with pytest.raises(SystemExit, match="--warmup must be >= 0"):
        step_profile.main(["--warmup", "-1"])
    with pytest.raises(SystemExit, match="no-such-preset"):
        step_profile.main(["--preset", "no-such-preset"])


def test_runs_as_a_script(tmp_path):
    out = tmp_path / "profile.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "bench/step_profile.py", "--steps", "1", "--warmup", "0", "--json",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NOT representative" in proc.stdout
    assert json.loads(out.read_text())["step"]["kernel_ms"] > 0
