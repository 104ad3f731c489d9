"""Training throughput of the EM-routing CapsNet against the inverted-dot-product-attention CapsNet, side
by side in one process (issue #16, item 4: EM must train at no less than a quarter of the IDA model's rate).

Both models are built as timm builds them for 1x28x28 inputs (``in_chans=1, img_size=28``, 10 classes).
A training step is forward, cross-entropy, backward and an SGD step. Each model takes one warm-up step,
then the timed steps alternate between the models, so that a slow drift of the machine (or another
process on it) hits both alike; the figure is the batch size over the median step. One JSON object is
printed (and written with ``--json``).

    python benchmarks/bench_em.py                      # batch 128, 3 timed steps per model
    python benchmarks/bench_em.py --threads 1 --batch-size 32
    python benchmarks/bench_em.py --smoke              # seconds; what the tests run so the harness cannot rot
    python benchmarks/bench_em.py --json benchmarks/results/em_throughput_cpu.json
"""

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

from harness import emit, settings  # benchmarks/ is the script's directory

MODELS = {'em': 'em_capsnet_simple_cifar10', 'ida': 'capsnet_simple_cifar10'}


def _commit() -> str:
    try:
        return subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=3, help='timed training steps per model')
    parser.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument('--img-size', type=int, default=28)
    parser.add_argument('--smoke', action='store_true', help='batch 2, one timed step: checks the harness runs')
    parser.add_argument('--json', dest='json_path', help='also write the result to this file')
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.steps = 2, 1

    import torch
    import timm
    import timm_capsules  # noqa: F401  (registers the models)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    steps = {}
    for key, name in MODELS.items():
        model = timm.create_model(name, in_chans=1, img_size=args.img_size, num_classes=10).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up (and the fused kernel's first load)
        steps[key] = step
    times = {key: [] for key in MODELS}
    for _ in range(args.steps):
        for key, step in steps.items():  # alternating
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    rate = {key: args.batch_size / statistics.median(t) for key, t in times.items()}
    result = dict(
        em_model=MODELS['em'],
        ida_model=MODELS['ida'],
        em_images_per_s=rate['em'],
        ida_images_per_s=rate['ida'],
        em_over_ida=rate['em'] / rate['ida'],
        em_step_s=[round(t, 4) for t in times['em']],
        ida_step_s=[round(t, 4) for t in times['ida']],
        batch_size=args.batch_size,
        img_size=args.img_size,
        in_chans=1,
        steps=args.steps,
        torch=torch.__version__,
        cpu=_cpu_name(),
        threads=torch.get_num_threads(),
        commit=_commit(),
        **settings(),
    )
    return emit(result, args.json_path)


if __name__ == '__main__':
    main()
