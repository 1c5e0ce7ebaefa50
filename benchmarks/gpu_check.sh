#!/usr/bin/env bash
# The GPU check of issue 32 in one run, meant to finish within 10 minutes on one H100 / H200:
#   1. parity on the GPU at jax_default_matmul_precision="highest", one model of every family
#      (JAX on the GPU against torch on the CPU, the CPU tolerances of the parity tests);
#   2. benchmarks/bench_vs_torch.py on the GPU for the five benchmark models (resnet50, mobilenet_v2,
#      efficientnet_lite0, convnext_tiny, vit_b_16), K = 100 pullbacks and the 5 x 10 ascent, with the
#      torch.compile column, and resnet50's K = 1000 (all labels of one image in one call).
#   NOT RUN YET: written without a GPU (the limits are estimates; a step past its limit says TIMEOUT).
#
#     bash benchmarks/gpu_check.sh [OUTPUT_DIR]        (default gpu-check-<commit>; PYTHON=... to choose)
#
# Every step runs under its own time limit (570 s in all, compiles included), prints
# its wall time, and a step past its limit is reported as TIMEOUT and the next one starts. The device,
# driver, versions and commit are printed first: keep them with every figure. Everything goes to the
# terminal and to OUTPUT_DIR/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-gpu-check-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # both libraries on one card
export JAX_COMPILATION_CACHE_DIR="$OUT/jax-cache" TORCHINDUCTOR_CACHE_DIR="$OUT/inductor-cache"
START=$(date +%s)

step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    local t0=$(date +%s)
    echo
    echo "=== $name (limit ${limit} s; $(( t0 - START )) s since the start)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "=== $name: TIMEOUT after ${took} s"; else echo "=== $name: exit $rc in ${took} s"; fi
}

echo "commit $(git rev-parse HEAD 2>/dev/null) ($(git status --porcelain 2>/dev/null | wc -l) files changed)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
$PY -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

# 1. Parity, one model of every family (the tests' own small or random models; JAX on the GPU).
PARITY=(
    "tests/test_parity.py::test_logits_and_pullback_match_torch[resnet50]"
    "tests/test_parity.py::test_logits_and_pullback_match_torch[vgg11_bn]"
    "tests/test_parity.py::test_logits_and_pullback_match_torch[densenet121]"
    "tests/test_parity.py::test_logits_and_pullback_match_torch[alexnet]"
    "tests/test_parity.py::test_logits_and_pullback_match_torch[mobilenet_v2]"
    "tests/test_parity.py::test_ascent_matches_torch_pga[resnet18]"
    "tests/test_parity_more.py::test_matches_torch"
    "tests/test_parity_mobile.py::test_mobilenet_v3_matches_torch[mobilenet_v3_small]"
    "tests/test_parity_mobile.py::test_squeezenet_matches_torch[squeezenet1_1]"
    "tests/test_parity_efficientnet.py::test_matches_torch"
    "tests/test_parity_inception.py::test_matches_torch"
    "tests/test_parity_convnext.py::test_matches_torch"
    "tests/test_parity_vit.py::test_small_vit_matches_torch"
    "tests/test_parity_swin.py::test_matches_torch"
    "tests/test_parity_maxvit.py::test_small_maxvit_parity"
    "tests/test_real_model.py::test_efficientnet_lite0_relu6_pullbacks_on_real_weights_match_pytorch"
)
for extra in tests/test_parity_pvt.py tests/test_parity_timm.py; do  # families added by later branches
    [ -f "$extra" ] && PARITY+=("$extra")
done
step 150 "parity on the GPU, precision highest" env JAX_DEFAULT_MATMUL_PRECISION=highest JAX_PLATFORMS=cuda,cpu \
    $PY -m pytest -v -p no:cacheprovider --durations=5 "${PARITY[@]}"

# 2. The benchmark, with the torch.compile column (compile time reported apart from run time): K = 100
#    pullbacks and the 5 x 10 ascent of each model (two torch.compile compiles each: batch 100 and 50),
#    then resnet50's 1000 labels of one image in one call (without the compiled column: a third shape).
BENCH=(--device cuda --ks 100 --cases a,b --chunk 1000 --torch-batch 250)
step 90 "bench resnet50" $PY benchmarks/bench_vs_torch.py --arch resnet50 "${BENCH[@]}"
step 70 "bench mobilenet_v2" $PY benchmarks/bench_vs_torch.py --arch mobilenet_v2 "${BENCH[@]}"
step 70 "bench efficientnet_lite0" $PY benchmarks/bench_vs_torch.py --arch efficientnet_lite0 "${BENCH[@]}"
step 75 "bench convnext_tiny (semantic)" $PY benchmarks/bench_vs_torch.py --arch convnext_tiny --rules semantic "${BENCH[@]}"
step 75 "bench vit_b_16 (semantic)" $PY benchmarks/bench_vs_torch.py --arch vit_b_16 --rules semantic "${BENCH[@]}"
step 40 "bench resnet50, all 1000 labels of one image" $PY benchmarks/bench_vs_torch.py --arch resnet50 \
    --device cuda --ks 1000 --cases a --chunk 1000 --torch-batch 250 --no-torch-compile
echo
echo "=== done in $(( $(date +%s) - START )) s; log: $OUT/gpu_check.log"
