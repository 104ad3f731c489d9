#!/usr/bin/env bash
# The GPU checks in one script, for a machine with a CUDA GPU (CI has none): the CUDA tests (tests/test_cuda.py),
# then the benchmark harness on the GPU against ResNet-18 at batch 128, t = 2 and 5, fp32 and bf16. Each phase ends
# inside 10 minutes on an H100/H200 and writes its JSON (and a log) to $OUT, or benchmarks/results without it:
#
#   benchmarks/gpu_check.sh eager       # the tests, then eager mode (about 4 minutes)
#   benchmarks/gpu_check.sh compiled    # torch.compile (about 8 minutes, most of it compiling)
#
# Nothing is installed: the package runs from this tree (PYTHONPATH). The training-script test needs `datasets`;
# where the GPU machine lacks it, carry its wheels and put them on PYTHONPATH first (see the device tool's notes).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
cases=(--device cuda --batch-sizes 128 --iterations 2 5 --dtypes fp32 bf16 --rounds 1 --steps 10
       --models capsnet_resnet_cifar10 resnet18_cifar10 --case-timeout 170)
case "${1:-eager}" in
    eager)
        # --noconftest: the suite's conftest fetches timm's tests and builds the CPU kernels, none of which is needed
        tests=0
        python -m pytest --noconftest -q -rs tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" || tests=$?
        python benchmarks/bench_models.py "${cases[@]}" --json "$out/cuda_b128.json"
        exit "$tests" ;;
    compiled)
        python benchmarks/bench_models.py "${cases[@]}" --compile --json "$out/cuda_b128_compiled.json" ;;
    *)
        echo "usage: $0 eager|compiled" >&2
        exit 2 ;;
esac
