"""The fused routing kernel alone (the CPU's C++ kernel; with ``--device cuda`` the op's Triton kernels): one
attention pass (forward, and forward + backward) of each capsule layer of ``capsnet_resnet_cifar10`` at batch 32,
against the same pass in plain tensor ops, with the kernel's arithmetic rate beside a plain matmul's, all
measured in this run.

    python benchmarks/bench_routing.py                 # all threads
    python benchmarks/bench_routing.py --threads 1 --cpu-time   # one core, CPU time: least disturbed
    python benchmarks/bench_routing.py --json benchmarks/results/routing_kernel_cpu.json
    python benchmarks/bench_routing.py --smoke         # batch 2, one call each: checks the harness runs
    python benchmarks/bench_routing.py --device cuda --batch-size 128   # the GPU's fused pass (routing_triton.py)

The rate counts what ``torch.utils.flop_counter`` counts for the op (``routing._forward_flops`` /
``_backward_flops``); ``of_matmul`` is that rate over a 2048^2 float32 matmul's.
"""

import argparse
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness import emit, matmul_gflops, settings  # benchmarks/ is the script's directory
from timm_capsules.routing import attention_routing, capsule_votes, fused_attention_routing, window_children

# (name, batch, grid height = width, child types, kernel size, stride, parent types): the paper's CIFAR stack
LAYERS = [
    ('conv 16x16 -> 7x7 (k3 s2)', 32, 16, 32, 3, 2, 32),
    ('conv 7x7 -> 5x5 (k3 s1)', 32, 7, 32, 3, 1, 32),
    ('fc 5x5x32 -> 10 classes', 32, 5, 32, 5, 1, 10),
]


CLOCK = time.perf_counter
DEVICE = 'cpu'


def _sync():
    if DEVICE == 'cuda':  # kernels run asynchronously: a call ends when the GPU is done
        torch.cuda.synchronize()


def timed(fn, repeats):
    fn()  # warm-up (and the kernel's first build or load)
    times = []
    for _ in range(repeats):
        _sync()
        start = CLOCK()
        fn()
        _sync()
        times.append(CLOCK() - start)
    return statistics.median(times)


def flops_of(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def layer_inputs(batch, size, types, kernel_size, stride, parents):
    torch.manual_seed(0)
    out = (size - kernel_size) // stride + 1
    grid = torch.randn(batch, size, size, types, 4, 4, device=DEVICE, requires_grad=True)
    weight = torch.randn(kernel_size * kernel_size * types, parents, 4, 4, device=DEVICE, requires_grad=True)
    parent_poses = torch.randn(batch * out * out, parents, 4, 4, device=DEVICE, requires_grad=True)
    return grid, weight, parent_poses


def measure(name, batch, size, types, kernel_size, stride, parents, repeats):
    """One layer's pass, fused and plain: forward alone (no grad) and forward + backward, median times."""
    grid, weight, parent_poses = layer_inputs(batch, size, types, kernel_size, stride, parents)
    window = (kernel_size, stride)

    def fused():
        return fused_attention_routing(grid, weight, parent_poses, with_routing=False, window=window)[0]

    def plain():
        return attention_routing(capsule_votes(window_children(grid, *window), weight), parent_poses)[0]

    result = dict(layer=name, batch=batch, groups=parent_poses.shape[0], children=weight.shape[0], parents=parents)
    for label, route in (('fused', fused), ('plain', plain)):
        probe = torch.randn_like(parent_poses)

        def step():
            torch.autograd.grad((route() * probe).sum(), (grid, weight, parent_poses))

        with torch.no_grad():
            forward_s = timed(route, repeats)
        step_s = timed(step, repeats)
        result[f'{label}_forward_ms'] = forward_s * 1e3
        result[f'{label}_step_ms'] = step_s * 1e3
    with torch.no_grad():
        result['forward_gflop'] = flops_of(fused) / 1e9
    result['step_gflop'] = (
        flops_of(lambda: torch.autograd.grad((fused() * probe).sum(), (grid, weight, parent_poses))) / 1e9
    )
    result['fused_forward_gflops'] = result['forward_gflop'] / result['fused_forward_ms'] * 1e3
    result['fused_step_gflops'] = result['step_gflop'] / result['fused_step_ms'] * 1e3
    result['step_time_vs_plain'] = result['fused_step_ms'] / result['plain_step_ms']
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, help='torch threads (default: all)')
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per measurement (median)')
    parser.add_argument(
        '--cpu-time',
        action='store_true',
        help='time by CPU time of this process, not wall time: with --threads 1, a comparison '
        'that other work on the machine disturbs less',
    )
    parser.add_argument('--json', dest='json_path', help='also write the results to this file')
    parser.add_argument('--smoke', action='store_true', help='batch 2, one timed call each (seconds)')
    parser.add_argument(
        '--device',
        default='cpu',
        choices=['cpu', 'cuda'],
        help="cuda: the fused pass is the op's Triton kernels (routing_triton.py)",
    )
    parser.add_argument('--batch-size', type=int, help='instead of the batch of 32 (the paper setting)')
    args = parser.parse_args(argv)
    global CLOCK, DEVICE
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_gflops(DEVICE)
    batch = 2 if args.smoke else args.batch_size
    layers = [(name, batch or default, *rest) for name, default, *rest in LAYERS]
    results = [measure(*layer, 1 if args.smoke else args.repeats) for layer in layers]
    for r in results:
        r['forward_of_matmul'] = r['fused_forward_gflops'] / peak
        r['step_of_matmul'] = r['fused_step_gflops'] / peak
    device_name = torch.cuda.get_device_name() if DEVICE == 'cuda' else f'{platform.machine()} CPU'
    print(f'{device_name}, {torch.get_num_threads()} threads | matmul {peak:.0f} GFLOP/s | torch {torch.__version__}')
    print(
        f'{"layer":28s} {"fwd ms":>8s} {"plain":>8s} {"fwd+bwd ms":>11s} {"plain":>8s} {"GFLOP/s fwd":>12s} '
        f'{"fwd+bwd":>8s} {"% matmul":>9s}'
    )
    for r in results:
        print(
            f'{r["layer"]:28s} {r["fused_forward_ms"]:8.1f} {r["plain_forward_ms"]:8.1f} {r["fused_step_ms"]:11.1f} '
            f'{r["plain_step_ms"]:8.1f} {r["fused_forward_gflops"]:12.1f} {r["fused_step_gflops"]:8.1f} '
            f'{100 * r["step_of_matmul"]:8.0f}%'
        )
    command = 'benchmarks/bench_routing.py' + ''.join(f' {a}' for a in (argv if argv is not None else sys.argv[1:]))
    record = dict(
        machine=dict(
            device_name=device_name,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            matmul_gflops=peak,
            clock=CLOCK.__name__,
            command=command,
            **settings(),
        ),
        results=results,
    )
    return emit(record, args.json_path)


if __name__ == '__main__':
    main()
