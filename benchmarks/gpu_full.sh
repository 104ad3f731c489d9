#!/usr/bin/env bash
# `gpu_check.sh full SECONDS [--dry-run]`: every GPU check in one call, in the order of their value, inside SECONDS:
#   1. the CUDA tests (tests/test_cuda.py: the GPU's outputs and gradients against the CPU's, bf16, torch.compile,
#      the Triton kernels, the training script with --mixed_precision no/bf16/fp16);
#   2. the speed harness against ResNet-18, batch 128, t = 2 and 5, fp32 and bf16, eager: plain ops, then Triton;
#   3. the --scale gpu studies (table1, iterations, ablations) in 4 shards side by side on the one GPU, each starting
#      only the runs its estimate says will end in time; records to results/gpu/ (a second call continues);
#   4. everything packed into $OUT/results.tgz, and $OUT/summary.txt: one line per part, so a cut-off output still
#      says what passed.
# --dry-run: the same commands on the CPU, with a few steps of a few runs per study (records under $OUT/records).
# GPU_CHECK_PARTS (default "tests speed studies") names the parts to run: a later call can give all its time to the
# studies once the tests and the speed figures are in.
set -uo pipefail
limit=$1 dry_run=$2 out=$3
start=$(date +%s)
logs="$out/logs" && mkdir -p "$logs"
summary="$out/summary.txt" && : >"$summary"
left() { echo $((limit - ($(date +%s) - start))); }
cap() { local rest=$(( $(left) - 120 )); echo $(( rest < $1 ? (rest < 10 ? 10 : rest) : $1 )); }  # 2 min for studies
say() { echo "== $*" | tee -a "$summary"; }
studies=(table1 iterations ablations)
parts=" ${GPU_CHECK_PARTS:-tests speed studies} "
wanted() { [[ "$parts" == *" $1 "* ]]; }
data_dir="${DATA_DIR:-outputs/experiments/data}"

# --- 0. the machine, with the packages carried as wheels in .whl/ (`datasets`, which a GPU image may lack; the
# tested timm) put ahead of the image's
if [ "$dry_run" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
say "machine: $(python3 - <<'EOF'
import importlib, torch
names = ['timm', 'accelerate', 'datasets', 'triton']
found = []
for name in names:
    try:
        found.append(f'{name} {importlib.import_module(name).__version__}')
    except Exception as error:
        found.append(f'{name} missing ({type(error).__name__})')
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print(f'{gpu}, torch {torch.__version__}, ' + ', '.join(found))
EOF
)"

if [ "$dry_run" = 1 ]; then
    bench=(--device cpu --smoke --models capsnet_simple_cifar10 --reference capsnet_simple_cifar10)
    study_args=(--seeds 1 --only IDA-t5 DR-t3 EM-t2 IDA-t2-C -- --cpu --max-train-steps 2 --train-split 'train[:256]'
                --test-split 'test[:256]' --num-workers 0)
    records="$out/records"
else
    bench=(--device cuda --batch-sizes 128 --iterations 2 5 --rounds 1 --steps 5 --dtypes fp32 bf16
           --models capsnet_resnet_cifar10 resnet18_cifar10)
    study_args=(--seeds 2)
    records=results
fi

# --- 1. correctness: the GPU against the CPU (no conftest: it fetches timm's tests and builds the CPU kernels)
if wanted tests; then
    t0=$(date +%s)
    timeout -s TERM "$(cap 150)" \
        python3 -m pytest --noconftest -q -rs -p no:cacheprovider tests/test_cuda.py >"$logs/test_cuda.log" 2>&1
    status=$?
    say "tests: $(tail -n 1 "$logs/test_cuda.log") (exit $status, $(( $(date +%s) - t0 )) s)"
fi

# --- 2. speed against ResNet-18: plain tensor ops, then the Triton kernels (eager)
# (plain ops at t = 5 take 0.2-0.25 s a step on an H200: 45 s a case holds warm-up, 5 steps and the FLOP count)
for routing in plain triton; do
    wanted speed || break
    t0=$(date +%s)
    json="$out/cuda_b128_eager$([ "$routing" = triton ] && echo _triton).json"
    TIMM_CAPSULES_TRITON_ROUTING=$([ "$routing" = triton ] && echo 1 || echo 0) \
        timeout -s TERM "$(cap 120)" \
        python3 benchmarks/bench_models.py "${bench[@]}" --case-timeout 45 --json "$json" >"$logs/speed_$routing.log" 2>&1
    status=$?
    say "speed ($routing): $(python3 - "$json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))['results']
except (OSError, ValueError):
    print('no results'); raise SystemExit
print('; '.join(f"{r['model']} t={r.get('iterations') or '-'} {r['dtype']}: "
                + (f"ERROR {r['error'][:60]}" if 'error' in r else
                   f"{r['step_s'] * 1000:.0f} ms/step, {r.get('step_time_vs_reference', float('nan')):.2f}x time, "
                   f"{r.get('peak_memory_vs_reference', float('nan')):.2f}x memory") for r in rows))
EOF
) (exit $status, $(( $(date +%s) - t0 )) s)"
done

# --- 3. the studies: 4 shards share the GPU; a shard starts no run its estimate says would end past the limit
if wanted studies; then
    t0=$(date +%s)
    python3 experiments.py "${studies[@]}" --scale gpu --data-dir "$data_dir" --records "$records" --prepare \
        "${study_args[@]}" >"$logs/studies_prepare.log" 2>&1 || say "studies: data not ready (see logs/studies_prepare.log)"
    # datasets' Arrow cache of the parquet files, built once here rather than by four shards at once
    python3 -c "import sys; from timm_capsules.data.cifar import load_image_dataset as load; [load(sys.argv[1], s) for s in
    ('train', 'test')]" "$data_dir/fashion_mnist" >>"$logs/studies_prepare.log" 2>&1
    before=$(ls "$records/gpu" 2>/dev/null | grep -c '\.json$')
    budget=$(( $(left) - 25 ))
    time_limit=(--time-limit "$budget")
    [ "$dry_run" = 1 ] && time_limit=()  # the estimates are the GPU's full runs, not the dry run's few steps
    for shard in 0 1 2 3; do
        # --foreground: the signal reaches the trainer alone, which stops after its step with a checkpoint
        timeout --foreground -s TERM $(( budget + 10 )) python3 experiments.py "${studies[@]}" --scale gpu \
            --data-dir "$data_dir" --records "$records" --outputs outputs/experiments --shard "$shard/4" \
            "${time_limit[@]}" "${study_args[@]}" >"$logs/studies_$shard.log" 2>&1 &
    done
    wait
    after=$(ls "$records/gpu" 2>/dev/null | grep -c '\.json$')
    failed=$(grep -h 'failed' "$logs"/studies_?.log | head -n 3 | tr '\n' ' ')
    say "studies: $((after - before)) new records, $after in $records/gpu ($(( $(date +%s) - t0 )) s)${failed:+; $failed}"
fi

# --- 4. pack what came out (the device brings back few files): records as results/gpu/*.json, and the logs
mkdir -p "$records/gpu"
tar czf "$out/results.tgz" -C "$records" gpu
tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$logs"
say "done in $(( $(date +%s) - start )) s of $limit"
