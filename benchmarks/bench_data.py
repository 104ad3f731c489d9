"""Throughput of DiverseMultiMNIST generation, building and loading; prints one JSON object.

    python benchmarks/bench_data.py [--images 200000] [--build 20000]

Uses the built-in MNIST sample (offline). All numbers are images per second in this process.
"""

import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from timm_capsules.data import diverse_multimnist as dmm  # noqa: E402
from timm_capsules.data.mnist import load_mnist  # noqa: E402


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_stream(images: int, batch_size: int | None) -> float:
    stream = dmm.DiverseMultiMNISTStream(source='sample', num_samples=images, batch_size=batch_size)
    next(iter(stream))  # warm-up: digit bank index, first allocation

    def consume():
        return sum(len(x) if batch_size else 1 for x, _ in stream)

    count, seconds = timed(consume)
    return rate(count, seconds)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--images', type=int, default=200_000, help='images drawn from the stream')
    parser.add_argument('--build', type=int, default=20_000, help='images written per builder run')
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    digits = load_mnist('train', 'sample')
    results = {
        'machine': f'{platform.machine()} {os.cpu_count()} cpus',
        'numpy': np.__version__,
        'datasets': datasets.__version__,
    }

    chunks = [np.arange(s, min(s + dmm.CHUNK_SIZE, args.images)) for s in range(0, args.images, dmm.CHUNK_SIZE)]
    dmm.generate(digits, chunks[0])  # warm-up
    _, seconds = timed(lambda: [dmm.generate(digits, chunk) for chunk in chunks])
    results['generate_uint8_images_per_s'] = rate(args.images, seconds)
    results['stream_batch128_images_per_s'] = bench_stream(args.images, 128)
    results['stream_samples_images_per_s'] = bench_stream(args.images // 4, None)

    with tempfile.TemporaryDirectory() as scratch:
        for feature in ('array', 'image'):
            config = dict(source='sample', train_size=args.build, test_size=0, image_feature=feature)
            builder = dmm.DiverseMultiMNIST(cache_dir=f'{scratch}/cache-{feature}', **config)
            _, seconds = timed(builder.download_and_prepare)
            results[f'builder_write_{feature}_images_per_s'] = rate(args.build, seconds)
            out = dmm.export(f'{scratch}/export-{feature}', cache_dir=f'{scratch}/cache-{feature}', **config)
            results[f'export_parquet_{feature}_bytes_per_image'] = round(
                sum(p.stat().st_size for p in (out / 'data').iterdir()) / args.build, 1
            )
            for fmt in ('numpy', 'torch'):
                loaded = datasets.load_dataset(
                    str(out), split='train', cache_dir=f'{scratch}/hf-{feature}-{fmt}'
                ).with_format(fmt)
                _, seconds = timed(lambda: sum(len(b['image']) for b in loaded.iter(batch_size=1000)))
                results[f'load_dataset_read_{feature}_{fmt}_images_per_s'] = rate(len(loaded), seconds)
    print(json.dumps(results, indent=2))
    return results


if __name__ == '__main__':
    main()
