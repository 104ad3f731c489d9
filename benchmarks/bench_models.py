"""Training-step time, inference throughput, peak memory and multiply-adds of capsule networks against
a CIFAR ResNet-18, measured side by side in one run.

Every case (model, batch size, routing iterations, dtype) runs in a fresh Python process, so that
its peak memory is its own (CPU: peak RSS above the RSS after importing torch; CUDA:
``torch.cuda.max_memory_allocated``). The cases are run in rounds, alternating the models within
each round, so slow drifts of the machine hit every model alike; the reported time is the median
over rounds of each process's median step, with the spread (min..max) beside it. A plain 2048^2
matmul, timed in the same run, gives the machine's achievable GFLOP/s for reference.

    python benchmarks/bench_models.py                      # CPU, batch 32, t=2, fp32 (the issue's target)
    python benchmarks/bench_models.py --batch-sizes 32 128 --iterations 1 2 3 4 5 --dtypes fp32 bf16
    python benchmarks/bench_models.py --smoke              # seconds; what CI runs so the harness cannot rot
    python benchmarks/bench_models.py --iterations 3 --profile   # and where each step's time goes, by operator
    python benchmarks/bench_models.py --channels-last      # every model and input channels-last (timm train.py's flag)
    python benchmarks/bench_models.py --reference resnet50 --models resnet50:num_classes=10 \
        capsnet_resnet_cifar10:backbone=resnet50,img_size=224   # a capsule head on a timm backbone at 224x224
    python benchmarks/bench_models.py --json results.json  # machine-readable results (always printed too)
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from harness import emit, matmul_gflops, settings  # benchmarks/ is the script's directory

DEFAULT_MODELS = ['capsnet_resnet_cifar10', 'capsnet_simple_cifar10', 'resnet18_cifar10']


def parse_model(spec):
    """'name' or 'name:key=value,key=value' (values as Python literals) -> (label, name, kwargs)."""
    import ast

    name, _, args = spec.partition(':')
    kwargs = {}
    for item in filter(None, args.split(',')):
        key, _, value = item.partition('=')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return spec, name, kwargs


def measure_case(
    label,
    model_name,
    batch_size,
    iterations,
    dtype,
    device,
    steps,
    compile_model,
    model_kwargs,
    profile=False,
    channels_last=False,
):
    """One case, in this (fresh) process. Returns a dict of measurements."""
    import torch
    import timm
    import timm_capsules  # noqa: F401
    from torch.utils.flop_counter import FlopCounterMode

    rss_after_import = 0 if device == 'cuda' else _current_rss_bytes()
    torch.manual_seed(0)
    kwargs = dict(model_kwargs)
    if model_name.startswith('capsnet'):
        kwargs['iterations'] = iterations
    model = timm.create_model(model_name, **kwargs).to(device)
    input_size = (model.in_chans, *model.img_size) if hasattr(model, 'img_size') else model.pretrained_cfg['input_size']
    x = torch.randn(batch_size, *input_size, device=device)
    y = torch.randint(0, model.num_classes, (batch_size,), device=device)
    if channels_last:  # as timm's train.py --channels-last: the model's 4-d weights and the input
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step_model = torch.compile(model) if compile_model else model
    amp = dict(device_type=device, dtype=torch.bfloat16, enabled=dtype == 'bf16')

    def sync():
        if device == 'cuda':
            torch.cuda.synchronize()

    def train_step():
        with torch.autocast(**amp):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # inference first: the process's peak RSS after it is the inference peak (training only adds to it)
    model.eval()
    with torch.inference_mode(), torch.autocast(**amp):
        step_model(x)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step_model(x)
        sync()
        inference_s = (time.perf_counter() - start) / steps
    inference_peak = _peak_memory(device) - rss_after_import

    model.train()
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(**amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    train_flops = counter.get_total_flops()

    train_step()  # warm-up (and compilation)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        train_step()
        sync()
        times.append(time.perf_counter() - start)

    peak = _peak_memory(device) - rss_after_import
    step_s = statistics.median(times)
    top_ops = None
    if profile:  # where one training step's time goes, by operator
        with torch.profiler.profile() as prof:
            train_step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        top_ops = [dict(op=e.key, self_cpu_ms=round(e.self_cpu_time_total / 1000, 1), calls=e.count) for e in events]
    return dict(
        model=label,
        batch_size=batch_size,
        iterations=iterations if model_name.startswith('capsnet') else None,
        dtype=dtype,
        device=device,
        compiled=compile_model,
        channels_last=channels_last,
        params=sum(p.numel() for p in model.parameters()),
        step_s=step_s,
        step_s_min=min(times),
        step_s_max=max(times),
        inference_images_per_s=batch_size / inference_s,
        peak_memory_mb=peak / 2**20,
        inference_peak_memory_mb=inference_peak / 2**20,
        train_gflop=train_flops / 1e9,
        achieved_gflops=train_flops / step_s / 1e9,
        **(dict(profile=top_ops) if profile else {}),
    )


def _peak_memory(device):
    """CUDA: peak allocated bytes; CPU: the process's peak resident set size."""
    import resource
    import torch

    if device == 'cuda':
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def run_in_fresh_process(case, args):
    command = [
        sys.executable,
        __file__,
        '--worker',
        json.dumps(case),
        '--device',
        args.device,
        '--steps',
        str(args.steps),
    ] + [
        flag
        for flag, on in (
            ('--compile', args.compile),
            ('--profile', args.profile),
            ('--channels-last', args.channels_last),
        )
        if on
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.case_timeout)
    if result.returncode != 0:
        error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'failed'
        return dict(
            model=case['label'],
            batch_size=case['batch_size'],
            iterations=case['iterations'],
            dtype=case['dtype'],
            error=error,
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarise(rounds, reference_model):
    """Median over rounds per case, with the spread of per-round medians."""
    by_case = {}
    for row in rounds:
        by_case.setdefault(_key(row), []).append(row)
    summary = []
    for rows in by_case.values():
        good = [r for r in rows if 'error' not in r]
        if not good:
            summary.append(rows[0])
            continue
        merged = dict(good[0])
        for field in (
            'step_s',
            'inference_images_per_s',
            'peak_memory_mb',
            'inference_peak_memory_mb',
            'achieved_gflops',
        ):
            merged[field] = statistics.median(r[field] for r in good)
        merged['step_s_min'] = min(r['step_s_min'] for r in good)
        merged['step_s_max'] = max(r['step_s_max'] for r in good)
        merged['rounds'] = len(good)
        merged.pop('profile', None)
        profiles = [r['profile'] for r in good if 'profile' in r]
        if profiles:
            merged['profile'] = profiles[-1]
        summary.append(merged)
    references = {
        (r['batch_size'], r['dtype']): r for r in summary if r['model'] == reference_model and 'error' not in r
    }
    for row in summary:
        reference = references.get((row['batch_size'], row['dtype']))
        if reference and 'error' not in row:
            row['reference'] = reference_model
            row['step_time_vs_reference'] = row['step_s'] / reference['step_s']
            row['peak_memory_vs_reference'] = row['peak_memory_mb'] / reference['peak_memory_mb']
    return summary


def _key(row):
    return row['model'], row['batch_size'], row.get('iterations'), row['dtype']


def print_profiles(summary):
    for r in summary:
        if r.get('profile'):
            print(
                f'\n{r["model"]} batch {r["batch_size"]} t={r.get("iterations")} {r["dtype"]}: top operators of one step'  # noqa: E501
            )
            for op in r['profile']:
                print(f'  {op["op"]:40s} {op["self_cpu_ms"]:>10.1f} ms {op["calls"]:>6d} calls')


def print_table(summary, machine, reference_model):
    print(
        f'\n{machine["device_name"]} | matmul {machine["matmul_gflops"]:.0f} GFLOP/s | torch {machine["torch"]} '
        f'| ratios (x ref) against {reference_model}'
    )
    header = (
        f'{"model":26s} {"batch":>5s} {"t":>2s} {"dtype":>5s} {"step s (min..max)":>21s} {"x ref":>6s} '
        f'{"img/s":>7s} {"peak MB":>8s} {"x ref":>6s} {"inf MB":>7s} {"GFLOP":>7s} {"GFLOP/s":>8s}'
    )
    print(header)
    print('-' * len(header))
    for r in sorted(summary, key=lambda r: (r['batch_size'], r['dtype'], r['model'], r.get('iterations') or 0)):
        if 'error' in r:
            print(
                f'{r["model"]:26s} {r["batch_size"]:>5d} {str(r.get("iterations") or "-"):>2s} {r["dtype"]:>5s}  '
                f'ERROR {r["error"]}'
            )
            continue
        print(
            f'{r["model"]:26s} {r["batch_size"]:>5d} {str(r["iterations"] or "-"):>2s} {r["dtype"]:>5s} '
            f'{r["step_s"]:>7.3f} ({r["step_s_min"]:.3f}..{r["step_s_max"]:.3f}) '
            f'{r.get("step_time_vs_reference", float("nan")):>6.2f} {r["inference_images_per_s"]:>7.0f} '
            f'{r["peak_memory_mb"]:>8.0f} {r.get("peak_memory_vs_reference", float("nan")):>6.2f} '
            f'{r["inference_peak_memory_mb"]:>7.0f} {r["train_gflop"]:>7.1f} {r["achieved_gflops"]:>8.1f}'
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--models',
        nargs='+',
        default=DEFAULT_MODELS,
        help="model names, optionally with kwargs: 'name:key=value,key=value'",
    )
    parser.add_argument('--reference', default='resnet18_cifar10', help='the model ratios are taken against')
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[32])
    parser.add_argument('--iterations', nargs='+', type=int, default=[2])
    parser.add_argument('--dtypes', nargs='+', choices=['fp32', 'bf16'], default=['fp32'])
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--steps', type=int, default=3, help='timed training steps per process')
    parser.add_argument('--rounds', type=int, default=2, help='fresh processes per case, models alternating')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--profile', action='store_true', help="add each case's top operators (torch.profiler)")
    parser.add_argument(
        '--channels-last',
        action='store_true',
        help="every model's 4-d weights and the input channels-last, as timm's train.py --channels-last",
    )
    parser.add_argument('--model-kwargs', default='{}', help='JSON kwargs for every model, e.g. {"img_size": 64}')
    parser.add_argument('--case-timeout', type=int, default=1800)
    parser.add_argument(
        '--smoke', action='store_true', help='tiny (batch 2, t=2, one step, one round): checks the harness runs'
    )
    parser.add_argument('--json', dest='json_path', help='also write the results to this file')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        case = json.loads(args.worker)
        print(
            json.dumps(
                measure_case(
                    **case,
                    device=args.device,
                    steps=args.steps,
                    compile_model=args.compile,
                    profile=args.profile,
                    channels_last=args.channels_last,
                )
            )
        )
        return None
    if args.smoke:
        args.models = [m for m in args.models if m != 'capsnet_resnet_cifar10'] or args.models
        args.reference = args.reference if args.reference in args.models else args.models[-1]
        args.batch_sizes, args.iterations, args.steps, args.rounds = [2], [2], 1, 1

    import torch

    model_kwargs = json.loads(args.model_kwargs)
    models = [parse_model(spec) for spec in args.models]
    cases = [
        dict(label=label, model_name=name, batch_size=b, iterations=t, dtype=d, model_kwargs={**model_kwargs, **kw})
        for b in args.batch_sizes
        for d in args.dtypes
        for t in args.iterations
        for label, name, kw in models
        if t == args.iterations[0] or name.startswith('capsnet')
    ]
    rows = []
    for _ in range(args.rounds):
        for case in cases:  # models alternate within every round
            rows.append(run_in_fresh_process(case, args))
    summary = summarise(rows, args.reference)
    device_name = (
        torch.cuda.get_device_name() if args.device == 'cuda' else f'{platform.machine()} CPU, {os.cpu_count()} cores'
    )
    machine = dict(
        device_name=device_name,
        torch=torch.__version__,
        matmul_gflops=matmul_gflops(args.device),
        command=' '.join(sys.argv),
        **settings(),
    )
    result = dict(machine=machine, results=summary)
    print_table(summary, machine, args.reference)
    print_profiles(summary)
    return emit(result, args.json_path)


if __name__ == '__main__':
    main()
