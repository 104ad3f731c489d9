"""``python -m timm_capsules``: builds every registered capsule model and prints its parameter count, input
size and forward time on this machine's CPU: the median of ``--repeats`` passes after one warm-up pass (a
single pass would mostly time the first call's one-off allocations)."""

import argparse
import json
import statistics
import time

import timm
import torch

import timm_capsules


def forward_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m timm_capsules', description=__doc__)
    parser.add_argument('--batch-size', type=int, default=8, help='images per forward pass (default: 8)')
    parser.add_argument('--repeats', type=int, default=5, help='timed passes per model, after a warm-up (default: 5)')
    parser.add_argument('--json', action='store_true', help='print JSON lines instead of a table')
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error('--batch-size and --repeats must be at least 1')
    names = timm.list_models(module=timm_capsules.MODEL_MODULES)
    if not args.json:
        print(f'{"model":38s} {"params":>12s} {"input":>12s} {"forward ms":>11s}')
    for name in names:
        model = timm.create_model(name).eval()
        x = torch.randn(args.batch_size, *model.pretrained_cfg['input_size'])
        elapsed = forward_ms(model, x, args.repeats)
        row = dict(
            model=name,
            params=sum(p.numel() for p in model.parameters()),
            input_size=list(x.shape[1:]),
            forward_ms=round(elapsed, 1),
            batch_size=args.batch_size,
            repeats=args.repeats,
        )
        if args.json:
            print(json.dumps(row))
        else:
            print(f'{name:38s} {row["params"]:>12,d} {"x".join(map(str, x.shape[1:])):>12s} {elapsed:>11.1f}')
    if not args.json:
        print(
            f'forward ms: median of {args.repeats} passes after a warm-up, batch {args.batch_size}, '
            f'{torch.get_num_threads()} CPU threads'
        )


if __name__ == '__main__':
    main()
