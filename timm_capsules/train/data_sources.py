"""Where a run's images come from: one object per kind of data, each with the same surface (``source``,
``multi_label``, ``num_classes``, ``label_names``, ``chance``; ``build(data_cfg)``, ``prepare(accelerator)``,
``batches_per_epoch``, ``train_batches(epoch, skip)``, ``test_batches(split=None)``):

- ``MultiMNISTData``: DiverseMultiMNIST, generated on the fly per process, with a fixed test set;
- ``ImageDatasetData``: CIFAR-10/100 or any Hub / local image-classification dataset.

``load_data(config, accelerator)`` is the only place that asks which kind a run uses."""

import math
import os
import signal
import socket
import sys
from pathlib import Path

import torch

from timm_capsules.data.registry import ALIASES, DATASETS, chance_level, hub_columns

from .config import fail

__all__ = ['MultiMNISTData', 'ImageDatasetData', 'load_data', 'normalise', 'hub_reachable']


def normalise(images, data_cfg):
    """The one place where images in [0, 1] become model inputs."""
    mean = torch.tensor(data_cfg['mean'], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg['std'], device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def quiet_worker(_):
    """DataLoader workers leave Ctrl-C to the main process, which stops training cleanly (see StopOnSignal)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class MultiMNISTData:
    """DiverseMultiMNIST: an endless per-rank training stream generated on the fly (rank r: images r, r + W, ...;
    not prepared by accelerate) and a fixed test set."""

    multi_label, num_classes, label_names = True, 10, [str(d) for d in range(10)]

    def __init__(self, args, accelerator):
        from timm_capsules.data import load_mnist

        self.args, self.accelerator = args, accelerator
        with accelerator.main_process_first():  # the MNIST digits may be downloaded once
            self.digits = {split: load_mnist(split, args.mnist_source) for split in ('train', 'test')}
        self.source = self.digits['train'].source  # what auto resolved to: sample, hub:<id> or idx:<folder>
        self.stream = None

    def build(self, data_cfg):
        from timm_capsules.data import make_split

        if data_cfg['input_size'] != (1, 36, 36) and data_cfg['fixed_input_size']:
            fail(f"{self.args.model} takes {data_cfg['input_size']} images; DiverseMultiMNIST's are (1, 36, 36)")
        self.data_cfg = data_cfg
        split = make_split('test', self.args.test_size, digits=self.digits['test'], seed=self.args.data_seed)
        self.chance = chance_level([tuple(row.nonzero()[0]) for row in split.targets])
        test = torch.utils.data.TensorDataset(
            torch.from_numpy(split.images).unsqueeze(1).float().div_(255), torch.from_numpy(split.targets)
        )
        self.test_loader = torch.utils.data.DataLoader(test, batch_size=self.args.eval_batch_size)

    def prepare(self, accelerator):
        self.test_loader = accelerator.prepare(self.test_loader)
        per_update = self.args.batch_size * accelerator.num_processes * self.args.gradient_accumulation_steps
        self.batches_per_epoch = math.ceil(self.args.epoch_size / per_update) * self.args.gradient_accumulation_steps

    def train_batches(self, epoch, skip):
        """This epoch's batches after the first ``skip``; nothing skipped is ever generated."""
        from timm_capsules.data import DiverseMultiMNISTStream

        if self.stream is None:
            stream = DiverseMultiMNISTStream(
                'train',
                digits=self.digits['train'],
                seed=self.args.seed,
                batch_size=self.args.batch_size,
                start=epoch * self.batches_per_epoch + skip,
                rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes,
            )
            self.stream = iter(
                torch.utils.data.DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.args.num_workers,
                    worker_init_fn=quiet_worker,
                    pin_memory=torch.cuda.is_available(),
                )
            )
        device = self.accelerator.device
        for _ in range(self.batches_per_epoch - skip):
            images, targets = next(self.stream)
            yield normalise(images.to(device, non_blocking=True), self.data_cfg), targets.to(device, non_blocking=True)

    def test_batches(self):
        for images, targets in self.test_loader:
            yield normalise(images, self.data_cfg), targets


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face Hub can be used: False under HF_HUB_OFFLINE=1, or when its host does not answer
    within ``timeout`` seconds; then this process goes offline (the local cache only) at once, instead of
    retrying for a minute. Returns (reachable, why not)."""
    from urllib.parse import urlparse
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, 'HF_HUB_OFFLINE=1 is set'
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == 'https' else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, None
    except OSError as error:
        why = f'the Hub ({host}) cannot be reached ({error.strerror or error})'
    os.environ['HF_HUB_OFFLINE'] = os.environ['HF_DATASETS_OFFLINE'] = '1'  # read by datasets at import
    constants.HF_HUB_OFFLINE = True
    if 'datasets' in sys.modules:
        sys.modules['datasets'].config.HF_HUB_OFFLINE = True
    print(f'warning: {why}: using the local Hugging Face cache only', file=sys.stderr, flush=True)
    return False, why


OFFLINE_HINT = (
    'pass --data-dir DIR with a local copy (save_to_disk, parquet or imagefolder), or run once with '
    'network to fill the cache; HF_HUB_OFFLINE=1 uses the cache without trying the network'
)


class ImageDatasetData:
    """CIFAR-10/100 or any Hub / local image-classification dataset: shuffled (seedable sampler) and augmented
    from (seed, epoch, index), so a resumed run sees exactly the images of an uninterrupted one."""

    def __init__(self, args, accelerator):
        from timm_capsules.data.cifar import check_columns, label_info, load_image_dataset

        self.args = args
        if args.dataset in DATASETS and DATASETS[args.dataset].hub_id:
            hub_id, image_column, label_column = hub_columns(args.dataset)
            self.source = args.data_dir or hub_id
        elif args.dataset.startswith('hf:'):
            self.source, image_column, label_column = args.dataset[3:], 'image', 'label'
        else:
            fail(f'unknown dataset {args.dataset!r}: use diverse_multimnist, cifar10, cifar100 or hf:<id or folder>')
        self.image_column, self.label_column = args.image_column or image_column, args.label_column or label_column
        self.splits = {}
        offline = None
        if not Path(self.source).exists():  # a Hub dataset: find out now whether the Hub answers
            reachable, why = hub_reachable()
            offline = None if reachable else why
        with accelerator.main_process_first():  # a Hub dataset is downloaded once
            roles = [('train', args.train_split), ('test', args.test_split)]
            for role, split in roles + [(f'extra:{split}', split) for split in args.extra_test_splits]:
                try:
                    self.splits[role] = load_image_dataset(self.source, split)
                except Exception as error:  # offline Hub, missing folder, unknown split: one line, no traceback
                    if offline:
                        fail(
                            f'cannot load split {split!r} of {self.source}: {offline} and the local cache does '
                            f'not hold it; {OFFLINE_HINT}'
                        )
                    fail(
                        f'cannot load split {split!r} of {self.source}: '
                        f'{str(error).splitlines()[0] if str(error) else repr(error)}'
                    )
                try:
                    check_columns(
                        self.splits[role], self.image_column, self.label_column, name=f'{self.source} ({split})'
                    )
                except ValueError as error:
                    fail(str(error))
        self.labels = label_info(self.splits['train'], self.label_column)
        test_labels = self.splits['test'][self.label_column]
        self.chance = chance_level([tuple(sorted(y)) if self.labels.multi_label else y for y in test_labels])
        self.multi_label, self.num_classes, self.label_names = (
            self.labels.multi_label,
            self.labels.num_classes,
            self.labels.names,
        )

    def build(self, data_cfg):
        from timm_capsules.data.cifar import ImageClassificationData, image_size, image_transform

        size = tuple(data_cfg['input_size'][1:])
        found = image_size(self.splits['train'], self.image_column)
        if data_cfg['fixed_input_size'] and found != size and not self.args.resize:
            fail(
                f"{self.args.model} takes {size[0]}x{size[1]} images but the dataset's are {found[0]}x{found[1]}; "
                f'pass --resize or --model-arg img_size=...'
            )
        self.data_cfg = data_cfg
        transform = image_transform(data_cfg['input_size'], resize=self.args.resize or found != size)
        channels = data_cfg['input_size'][0]
        loaders = {}
        for role, dataset in self.splits.items():  # images in [0, 1]: normalised by normalise() only
            data = ImageClassificationData(
                dataset,
                transform,
                self.image_column,
                self.label_column,
                self.labels,
                mean=(0.0,) * channels,
                std=(1.0,) * channels,
                augment=self.args.augment != 'none' and role == 'train',
                flip=self.args.augment == 'crop-flip',
                seed=self.args.seed,
            )
            loaders[role] = torch.utils.data.DataLoader(
                data,
                batch_size=self.args.batch_size if role == 'train' else self.args.eval_batch_size,
                shuffle=role == 'train',
                num_workers=self.args.num_workers,
                worker_init_fn=quiet_worker,
                pin_memory=torch.cuda.is_available(),
            )  # workers restart each epoch and see set_epoch
        self.train_loader, self.test_loader = loaders['train'], loaders['test']
        self.extra_test_loaders = {
            role[len('extra:') :]: loader for role, loader in loaders.items() if role.startswith('extra:')
        }

    def prepare(self, accelerator):
        self.accelerator = accelerator
        self.train_loader, self.test_loader = accelerator.prepare(self.train_loader, self.test_loader)
        self.extra_test_loaders = {
            split: accelerator.prepare(loader) for split, loader in self.extra_test_loaders.items()
        }
        self.batches_per_epoch = len(self.train_loader)

    def train_batches(self, epoch, skip):
        self.train_loader.set_epoch(epoch)  # the sampler's shuffle
        self.train_loader.dataset.set_epoch(epoch)  # the augmentation draws
        batches = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
        for images, targets in batches:
            yield normalise(images, self.data_cfg), targets

    def test_batches(self, split=None):
        for images, targets in self.extra_test_loaders[split] if split else self.test_loader:
            yield normalise(images, self.data_cfg), targets


def load_data(args, accelerator):
    """The dataset of --dataset (the only place that asks which kind it is)."""
    if ALIASES.get(args.dataset, args.dataset) == 'diverse_multimnist':
        if args.extra_test_splits:
            fail('--extra-test-split needs an image dataset (DiverseMultiMNIST has one test set)')
        return MultiMNISTData(args, accelerator)
    return ImageDatasetData(args, accelerator)
