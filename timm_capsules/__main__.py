"""``python -m timm_capsules``: builds every registered capsule model and prints a table of names,
parameter counts and the time of one forward pass (batch 8, this machine's CPU)."""
import argparse
import json
import time

import timm
import torch

import timm_capsules  # noqa: F401


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--json', action='store_true', help='print JSON lines instead of a table')
    args = parser.parse_args(argv)
    names = timm.list_models(module=timm_capsules.MODEL_MODULES)
    if not args.json:
        print(f"{'model':38s} {'params':>12s} {'input':>12s} {'forward ms':>11s}")
    for name in names:
        model = timm.create_model(name).eval()
        x = torch.randn(args.batch_size, *model.pretrained_cfg['input_size'])
        with torch.inference_mode():
            model(x)  # warm-up
            start = time.perf_counter()
            model(x)
            elapsed = (time.perf_counter() - start) * 1000
        row = dict(model=name, params=sum(p.numel() for p in model.parameters()),
                   input_size=list(x.shape[1:]), forward_ms=round(elapsed, 1), batch_size=args.batch_size)
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{name:38s} {row['params']:>12,d} {'x'.join(map(str, x.shape[1:])):>12s} {elapsed:>11.1f}")


if __name__ == '__main__':
    main()
