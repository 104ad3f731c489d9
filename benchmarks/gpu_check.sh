#!/usr/bin/env bash
# The GPU checks in one script, for a machine with a CUDA GPU (CI has none). Results go to $OUT (else
# benchmarks/results).
#
#   benchmarks/gpu_check.sh full [SECONDS]    # everything in one call, in this order, inside SECONDS (default 540):
#                                             # the CUDA tests, the speed harness (t = 2 and 5, fp32 and bf16, eager,
#                                             # plain ops and the Triton kernels), then the --scale gpu studies in 4
#                                             # shards on the one GPU; one summary line per part, and everything packed
#                                             # into $OUT/results.tgz (records in results/gpu/, speed JSON, logs)
#   benchmarks/gpu_check.sh full SECONDS --dry-run   # the same plumbing on the CPU, a few steps per study (CI runs it)
#   benchmarks/gpu_check.sh eager             # the tests, then eager mode, fp32 and bf16 (about 4 minutes)
#   benchmarks/gpu_check.sh compiled fp32     # torch.compile, one dtype per call (5-8 minutes, mostly compiling)
#   benchmarks/gpu_check.sh compiled bf16
#   benchmarks/gpu_check.sh triton            # the Triton routing kernels (opt-in): their test, each layer's pass
#                                             # alone against plain ops, then the models in eager fp32 and bf16
#
# Nothing is installed: the package runs from this tree (PYTHONPATH). A GPU machine without `datasets` (which the
# studies and the training-script test need) gets it from wheels in .whl/ when they are there (see the device
# tool's notes); the studies read Fashion-MNIST from $DATA_DIR (default outputs/experiments/data), which must hold
# fashion_mnist/ (written by `python experiments.py table1 --scale gpu --prepare` on a machine with Debian's
# dataset-fashion-mnist). A finished study run is never rerun: a second call continues with the runs left.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}-${2:-}" in
    eager-|compiled-fp32|compiled-bf16|triton-|full-*) ;;
    *) echo "usage: $0 full [SECONDS [--dry-run]] | eager | compiled fp32|bf16 | triton" >&2; exit 2 ;;
esac
dry_run=0
[ "${3:-}" = --dry-run ] && dry_run=1
[ "$dry_run" = 1 ] || command -v nvidia-smi >/dev/null \
    || { echo "$0: no NVIDIA GPU on this machine (nvidia-smi not found)" >&2; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if [ "$1" = full ]; then
    exec bash "$(dirname "$0")/gpu_full.sh" "${2:-540}" "$dry_run" "$out"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
cases=(--device cuda --batch-sizes 128 --iterations 2 5 --rounds 1 --steps 10
       --models capsnet_resnet_cifar10 resnet18_cifar10)
case "$1" in
    eager)
        tests=0
        # --noconftest: the suite's conftest fetches timm's tests and builds the CPU kernels, none of which is needed
        python3 -m pytest --noconftest -q -rs tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" || tests=$?
        python3 benchmarks/bench_models.py "${cases[@]}" --dtypes fp32 bf16 --case-timeout 120 \
            --json "$out/cuda_b128.json" 2>&1 | tee "$out/bench_eager.log"
        exit "$tests" ;;
    compiled)
        python3 benchmarks/bench_models.py "${cases[@]}" --dtypes "$2" --compile --case-timeout 170 \
            --json "$out/cuda_b128_compiled_$2.json" 2>&1 | tee "$out/bench_compiled_$2.log" ;;
    triton)  # the capsule layers' passes in routing_triton.py's kernels instead of plain tensor ops
        export TIMM_CAPSULES_TRITON_ROUTING=1
        tests=0
        python3 -m pytest --noconftest -q -rs tests/test_cuda.py -k triton 2>&1 | tee "$out/test_triton.log" || tests=$?
        # each capsule layer's pass alone, Triton against plain ops, at batch 128
        python3 benchmarks/bench_routing.py --device cuda --batch-size 128 --json "$out/routing_kernel_cuda.json" \
            2>&1 | tee "$out/bench_routing_cuda.log"
        python3 benchmarks/bench_models.py "${cases[@]}" --dtypes fp32 bf16 --case-timeout 150 \
            --json "$out/cuda_b128_triton.json" 2>&1 | tee "$out/bench_triton.log"
        exit "$tests" ;;
esac
