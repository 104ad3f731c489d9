"""Values of timm_capsules/train/data_sources.py without training: normalisation by hand, the Hub check (a
closed port, a listening one, the default ports), DiverseMultiMNIST's test set and per-rank training stream
against the data package's own generators, a tiny CIFAR-style dataset (real ``datasets`` folder) through
build / prepare / batches, and each refusal's one line."""

import contextlib
import math
import signal
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import timm_capsules  # noqa: F401
from timm_capsules.data.registry import chance_level
from timm_capsules.train import data_sources as ds
from timm_capsules.train.data_sources import ImageDatasetData, MultiMNISTData, hub_reachable, load_data, normalise

from train_fixtures import make_image_dataset

ERROR = 'train_accelerate.py: error: '


def test_normalise_by_hand():
    images = torch.rand(2, 3, 4, 5)
    cfg = dict(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    out = normalise(images, cfg)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (images[:, c] - cfg['mean'][c]) / cfg['std'][c])


def test_quiet_worker_leaves_ctrl_c_to_the_main_process():
    before = signal.getsignal(signal.SIGINT)
    try:
        ds.quiet_worker(3)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.fixture
def hub(monkeypatch):
    """Hugging Face's constants and the offline variables, restored afterwards."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setenv('HF_HUB_OFFLINE', '0')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '0')
    import datasets

    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', False)
    return constants


def test_hub_offline_by_the_environment(hub, capsys):
    hub.HF_HUB_OFFLINE = True
    assert hub_reachable() == (False, 'HF_HUB_OFFLINE=1 is set')
    assert capsys.readouterr().err == ''


def test_hub_that_answers(hub, monkeypatch):
    with socket.socket() as server:
        server.bind(('127.0.0.1', 0))
        server.listen()
        monkeypatch.setattr(hub, 'ENDPOINT', f'http://127.0.0.1:{server.getsockname()[1]}')
        assert hub_reachable() == (True, None)
    assert hub.HF_HUB_OFFLINE is False


def test_hub_that_does_not_answer_sends_the_process_offline(hub, monkeypatch, capsys):
    import datasets
    import os

    with socket.socket() as closed:
        closed.bind(('127.0.0.1', 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(hub, 'ENDPOINT', f'http://127.0.0.1:{port}')
    reachable, why = hub_reachable()
    assert reachable is False and why == 'the Hub (127.0.0.1) cannot be reached (Connection refused)'
    assert os.environ['HF_HUB_OFFLINE'] == os.environ['HF_DATASETS_OFFLINE'] == '1'
    assert hub.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
    assert capsys.readouterr().err == f'warning: {why}: using the local Hugging Face cache only\n'


@pytest.mark.parametrize(
    'endpoint, address',
    [
        ('https://huggingface.co', ('huggingface.co', 443)),
        ('http://mirror.example', ('mirror.example', 80)),
        ('https://mirror.example:8443', ('mirror.example', 8443)),
    ],
)
def test_hub_host_and_port(hub, monkeypatch, endpoint, address):
    asked = []

    def connect(where, timeout):
        asked.append((where, timeout))
        raise OSError('no route')  # no strerror: the error itself is named

    monkeypatch.setattr(hub, 'ENDPOINT', endpoint)
    monkeypatch.setattr(ds.socket, 'create_connection', connect)
    assert hub_reachable(timeout=1.5) == (False, f'the Hub ({address[0]}) cannot be reached (no route)')
    assert asked == [(address, 1.5)]
    hub.HF_HUB_OFFLINE = False
    hub_reachable()
    assert asked[-1][1] == 3.0


class Accelerator:
    def __init__(self, num_processes=1, process_index=0):
        self.num_processes, self.process_index, self.device = num_processes, process_index, torch.device('cpu')
        self.firsts = 0

    @contextlib.contextmanager
    def main_process_first(self):
        self.firsts += 1
        yield

    def prepare(self, *loaders):
        return loaders[0] if len(loaders) == 1 else loaders


def mnist_args(**kwargs):
    values = dict(
        mnist_source='sample',
        model='m',
        test_size=11,
        data_seed=4,
        eval_batch_size=5,
        batch_size=3,
        gradient_accumulation_steps=2,
        epoch_size=20,
        seed=7,
        num_workers=0,
        extra_test_splits=[],
        dataset='diverse_multimnist',
    )
    return SimpleNamespace(**dict(values, **kwargs))


MNIST_CFG = dict(input_size=(1, 36, 36), fixed_input_size=True, mean=(0.5,), std=(0.25,))


def test_multimnist_test_set(monkeypatch):
    from timm_capsules.data import make_split

    accelerator = Accelerator()
    data = MultiMNISTData(mnist_args(), accelerator)
    assert accelerator.firsts == 1 and data.source == 'sample'
    assert (data.multi_label, data.num_classes, data.label_names) == (True, 10, [str(d) for d in range(10)])
    assert set(data.digits) == {'train', 'test'} and data.stream is None
    data.build(MNIST_CFG)
    split = make_split('test', 11, source='sample', seed=4)
    assert data.chance == chance_level([tuple(int(i) for i in row.nonzero()[0]) for row in split.targets])
    data.prepare(accelerator)
    batches = list(data.test_batches())
    assert [len(t) for _, t in batches] == [5, 5, 1]
    images = torch.cat([i for i, _ in batches])
    torch.testing.assert_close(images, (torch.from_numpy(split.images).float()[:, None] / 255 - 0.5) / 0.25)
    assert torch.equal(torch.cat([t for _, t in batches]), torch.from_numpy(split.targets))
    data.build(dict(MNIST_CFG, input_size=(1, 28, 28), fixed_input_size=False))  # a model taking any size
    with pytest.raises(SystemExit) as stop:
        data.build(dict(MNIST_CFG, input_size=(3, 36, 36)))
    assert str(stop.value.code) == f"{ERROR}m takes (3, 36, 36) images; DiverseMultiMNIST's are (1, 36, 36)"


@pytest.mark.parametrize('processes, accumulation, expected', [(1, 1, 7), (1, 2, 8), (2, 2, 4), (3, 1, 3)])
def test_multimnist_batches_per_epoch(processes, accumulation, expected):
    data = MultiMNISTData(mnist_args(gradient_accumulation_steps=accumulation), Accelerator())
    data.build(MNIST_CFG)
    data.prepare(Accelerator(num_processes=processes))
    per_update = 3 * processes * accumulation
    assert data.batches_per_epoch == math.ceil(20 / per_update) * accumulation == expected


@pytest.mark.parametrize('rank, world, epoch, skip', [(0, 1, 0, 0), (1, 2, 1, 3), (0, 1, 2, 5)])
def test_multimnist_training_stream_per_rank(rank, world, epoch, skip):
    from timm_capsules.data import DiverseMultiMNISTStream

    accelerator = Accelerator(num_processes=world, process_index=rank)
    data = MultiMNISTData(mnist_args(), accelerator)
    data.build(MNIST_CFG)
    data.prepare(Accelerator(num_processes=world))
    per_epoch = data.batches_per_epoch
    batches = list(data.train_batches(epoch, skip))
    assert len(batches) == per_epoch - skip
    expected = iter(
        DiverseMultiMNISTStream(
            'train',
            source='sample',
            seed=7,
            batch_size=3,
            start=epoch * per_epoch + skip,
            rank=rank,
            world_size=world,
        )
    )
    for images, targets in batches:
        want_images, want_targets = next(expected)
        torch.testing.assert_close(images, (want_images - 0.5) / 0.25)
        assert torch.equal(targets, want_targets)
    # the next epoch goes on with the same stream
    following = list(data.train_batches(epoch + 1, 0))
    assert len(following) == per_epoch
    torch.testing.assert_close(following[0][0], (next(expected)[0] - 0.5) / 0.25)


def test_multimnist_stream_with_workers():
    data = MultiMNISTData(mnist_args(num_workers=2, batch_size=2, epoch_size=4), Accelerator())
    data.build(MNIST_CFG)
    data.prepare(Accelerator())
    alone = MultiMNISTData(mnist_args(batch_size=2, epoch_size=4), Accelerator())
    alone.build(MNIST_CFG)
    alone.prepare(Accelerator())
    for (a, x), (b, y) in zip(data.train_batches(0, 0), alone.train_batches(0, 0), strict=True):
        assert torch.equal(a, b) and torch.equal(x, y)


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    return make_image_dataset(tmp_path_factory.mktemp('cifar') / 'data', size=8, mode='RGB', n=(6, 5))


def image_args(folder, **kwargs):
    values = dict(
        dataset='cifar10',
        data_dir=str(folder),
        image_column=None,
        label_column=None,
        train_split='train',
        test_split='test',
        extra_test_splits=[],
        model='m',
        resize=False,
        augment='none',
        seed=3,
        batch_size=4,
        eval_batch_size=3,
        num_workers=0,
    )
    return SimpleNamespace(**dict(values, **kwargs))


CIFAR_CFG = dict(input_size=(3, 8, 8), fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))


def test_image_dataset_from_a_folder(cifar):
    import datasets

    accelerator = Accelerator()
    data = ImageDatasetData(image_args(cifar, extra_test_splits=['train']), accelerator)
    assert accelerator.firsts == 1 and data.source == str(cifar)
    assert (data.image_column, data.label_column) == ('img', 'label')
    assert sorted(data.splits) == ['extra:train', 'test', 'train']
    test = datasets.load_from_disk(str(cifar))['test']
    assert data.chance == chance_level(test['label'])
    assert (data.multi_label, data.num_classes, data.label_names) == (False, 10, tuple(f'c{i}' for i in range(10)))
    data.build(CIFAR_CFG)
    assert data.train_loader.batch_size == 4 and data.test_loader.batch_size == 3
    assert sorted(data.extra_test_loaders) == ['train'] and data.extra_test_loaders['train'].batch_size == 3
    assert data.train_loader.worker_init_fn is ds.quiet_worker
    assert isinstance(data.train_loader.sampler, torch.utils.data.RandomSampler)
    assert isinstance(data.test_loader.sampler, torch.utils.data.SequentialSampler)
    assert isinstance(data.extra_test_loaders['train'].sampler, torch.utils.data.SequentialSampler)
    assert data.train_loader.dataset.augment is False and data.test_loader.dataset.augment is False
    expected = torch.stack([torch.tensor(np.array(im)).permute(2, 0, 1) for im in test['img']])
    expected = (expected.float() / 255 - torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 1.0]
    ).view(1, 3, 1, 1)
    data.accelerator = accelerator
    images = torch.cat([i for i, _ in data.test_batches()])
    torch.testing.assert_close(images, expected)
    assert torch.cat([t for _, t in data.test_batches()]).tolist() == test['label']
    train = datasets.load_from_disk(str(cifar))['train']
    assert sorted(torch.cat([t for _, t in data.test_batches('train')]).tolist()) == sorted(train['label'])


@pytest.mark.parametrize('augment, flip', [('crop-flip', True), ('crop', False), ('none', False)])
def test_image_dataset_augmentation_of_the_training_split_only(cifar, augment, flip):
    data = ImageDatasetData(image_args(cifar, augment=augment, extra_test_splits=['test']), Accelerator())
    data.build(CIFAR_CFG)
    assert data.train_loader.dataset.augment is (augment != 'none')
    assert data.test_loader.dataset.augment is False and data.extra_test_loaders['test'].dataset.augment is False
    assert data.train_loader.dataset.flip is flip and data.train_loader.dataset.seed == 3


def test_image_dataset_prepared_by_accelerate(cifar):
    from accelerate import Accelerator as Real
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    try:
        accelerator = Real(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        data = ImageDatasetData(image_args(cifar, extra_test_splits=['train']), accelerator)
        data.build(CIFAR_CFG)
        data.prepare(accelerator)
        assert data.accelerator is accelerator and data.batches_per_epoch == 2
        first = [t.tolist() for _, t in data.train_batches(0, 0)]
        again = [t.tolist() for _, t in data.train_batches(0, 0)]
        other = [t.tolist() for _, t in data.train_batches(1, 0)]
        assert first == again and first != other  # the shuffle is the epoch's
        assert [len(t) for t in first] == [4, 2]
        assert [t.tolist() for _, t in data.train_batches(0, 1)] == first[1:]
        assert len(list(data.test_batches('train'))) == 2 and len(list(data.test_batches())) == 2
        list(data.train_batches(3, 0))
        assert data.train_loader.dataset.epoch == 3  # the augmentation draws of epoch 3
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_image_dataset_of_another_size(cifar):
    data = ImageDatasetData(image_args(cifar), Accelerator())
    with pytest.raises(SystemExit) as stop:
        data.build(dict(CIFAR_CFG, input_size=(3, 16, 12)))
    assert str(stop.value.code) == (
        f"{ERROR}m takes 16x12 images but the dataset's are 8x8; pass --resize or --model-arg img_size=..."
    )
    data.build(dict(CIFAR_CFG, input_size=(3, 16, 12), fixed_input_size=False))  # any size: resized
    assert next(data.test_batches())[0].shape == (3, 3, 16, 12)
    data = ImageDatasetData(image_args(cifar, resize=True), Accelerator())
    data.build(dict(CIFAR_CFG, input_size=(1, 4, 4), mean=(0.5,), std=(0.5,)))
    assert next(data.test_batches())[0].shape == (3, 1, 4, 4)


def test_hub_style_dataset_columns(cifar):
    data = ImageDatasetData(image_args(cifar, dataset=f'hf:{cifar}', image_column='img', data_dir=None), Accelerator())
    assert (data.source, data.image_column, data.label_column) == (str(cifar), 'img', 'label')
    with pytest.raises(SystemExit) as stop:
        ImageDatasetData(image_args(cifar, dataset=f'hf:{cifar}', data_dir=None), Accelerator())
    assert str(stop.value.code) == (
        f"{ERROR}{cifar} (train) has no column 'image' (columns: ['img', 'label']); pass --image-column / "
        '--label-column'
    )
    with pytest.raises(SystemExit) as stop:
        ImageDatasetData(image_args(cifar, label_column='fine_label'), Accelerator())
    assert "has no column 'fine_label'" in str(stop.value.code)


def test_unknown_dataset_and_missing_split(cifar, monkeypatch):
    with pytest.raises(SystemExit) as stop:
        ImageDatasetData(image_args(cifar, dataset='mnist'), Accelerator())
    assert str(stop.value.code) == (
        f"{ERROR}unknown dataset 'mnist': use diverse_multimnist, cifar10, cifar100 or hf:<id or folder>"
    )
    with pytest.raises(SystemExit) as stop:
        ImageDatasetData(image_args(cifar, test_split='validation'), Accelerator())
    assert str(stop.value.code) == (
        f"{ERROR}cannot load split 'validation' of {cifar}: {cifar} has splits ['test', 'train'], not 'validation'"
    )
    with pytest.raises(SystemExit) as stop:
        ImageDatasetData(image_args(cifar, extra_test_splits=['x']), Accelerator())
    assert "cannot load split 'x' of" in str(stop.value.code)
    monkeypatch.setattr(ds, 'hub_reachable', lambda: (False, 'HF_HUB_OFFLINE=1 is set'))
    with pytest.raises(SystemExit) as stop:
        ImageDatasetData(image_args(cifar, data_dir=str(cifar / 'gone')), Accelerator())
    assert str(stop.value.code) == (
        f"{ERROR}cannot load split 'train' of {cifar / 'gone'}: HF_HUB_OFFLINE=1 is set and the local cache does "
        f'not hold it; {ds.OFFLINE_HINT}'
    )
    monkeypatch.setattr(ds, 'hub_reachable', lambda: (True, None))

    def empty_error(path, split):
        raise RuntimeError()

    import timm_capsules.data.cifar as cifar_module

    monkeypatch.setattr(cifar_module, 'load_image_dataset', empty_error)
    with pytest.raises(SystemExit) as stop:
        ImageDatasetData(image_args(cifar, data_dir=str(cifar / 'gone')), Accelerator())
    assert str(stop.value.code) == f"{ERROR}cannot load split 'train' of {cifar / 'gone'}: RuntimeError()"


def test_a_folder_never_asks_the_hub(cifar, monkeypatch):
    asked = []
    monkeypatch.setattr(ds, 'hub_reachable', lambda: asked.append(1) or (True, None))
    ImageDatasetData(image_args(cifar), Accelerator())
    assert asked == []


def test_offline_hint():
    assert ds.OFFLINE_HINT == (
        'pass --data-dir DIR with a local copy (save_to_disk, parquet or imagefolder), or run once with network to '
        'fill the cache; HF_HUB_OFFLINE=1 uses the cache without trying the network'
    )


def test_load_data_asks_which_kind(cifar):
    for name in ('diverse_multimnist', 'multimnist'):
        assert type(load_data(mnist_args(dataset=name), Accelerator())) is MultiMNISTData
    with pytest.raises(SystemExit) as stop:
        load_data(mnist_args(dataset='multimnist', extra_test_splits=['x']), Accelerator())
    assert str(stop.value.code) == (
        f'{ERROR}--extra-test-split needs an image dataset (DiverseMultiMNIST has one test set)'
    )
    assert type(load_data(image_args(cifar), Accelerator())) is ImageDatasetData


def test_image_dataset_of_another_shape_names_both_sides(cifar, monkeypatch):
    import timm_capsules.data.cifar as cifar_module

    monkeypatch.setattr(cifar_module, 'image_size', lambda dataset, column: (8, 6))
    data = ImageDatasetData(image_args(cifar), Accelerator())
    with pytest.raises(SystemExit) as stop:
        data.build(dict(CIFAR_CFG, input_size=(3, 16, 12)))
    assert "takes 16x12 images but the dataset's are 8x6;" in str(stop.value.code)


def test_multimnist_streams_the_digits_it_loaded(monkeypatch):
    """The training stream draws from the digits the run loaded (here the sample's, inverted), never from a
    source of its own."""
    import timm_capsules.data as data_package
    from timm_capsules.data import DiverseMultiMNISTStream

    load = data_package.load_mnist

    asked = []

    def inverted(split, source):
        asked.append(source)
        digits = load(split, source)
        return digits._replace(images=255 - digits.images, source='inverted')

    monkeypatch.setattr(data_package, 'load_mnist', inverted)
    data = MultiMNISTData(mnist_args(), Accelerator())
    assert data.source == 'inverted' and asked == ['sample', 'sample']  # --mnist-source, both splits
    data.build(MNIST_CFG)
    data.prepare(Accelerator())
    images, _ = next(data.train_batches(0, 0))
    stream = DiverseMultiMNISTStream('train', digits=inverted('train', 'sample'), seed=7, batch_size=3)
    torch.testing.assert_close(images, (next(iter(stream))[0] - 0.5) / 0.25)
    split = data_package.make_split('test', 11, digits=inverted('test', 'sample'), seed=4)
    images = torch.cat([i for i, _ in data.test_batches()])
    torch.testing.assert_close(images, (torch.from_numpy(split.images).float()[:, None] / 255 - 0.5) / 0.25)


def test_multimnist_stream_loader_and_device(monkeypatch):
    made = []

    class Recorded(torch.utils.data.DataLoader):
        def __init__(self, dataset, **kwargs):
            made.append(kwargs)
            super().__init__(dataset, **dict(kwargs, pin_memory=False))  # nothing to pin to without CUDA

    data = MultiMNISTData(mnist_args(num_workers=1), Accelerator())
    data.build(MNIST_CFG)
    data.prepare(Accelerator())
    monkeypatch.setattr(ds.torch.utils.data, 'DataLoader', Recorded)
    monkeypatch.setattr(ds.torch.cuda, 'is_available', lambda: True)
    data.accelerator.device = torch.device('meta')  # the batches go to the run's device
    images, targets = next(data.train_batches(0, 0))
    assert made == [dict(batch_size=None, num_workers=1, worker_init_fn=ds.quiet_worker, pin_memory=True)]
    assert images.device.type == 'meta' and targets.device.type == 'meta' and images.shape == (3, 1, 36, 36)


def test_multi_label_image_dataset(tmp_path):
    import datasets

    folder = make_image_dataset(tmp_path / 'multi', size=8, mode='RGB', n=(6, 5), multi_label=True)
    data = ImageDatasetData(image_args(folder), Accelerator())
    assert (data.multi_label, data.num_classes) == (True, 10)
    test = datasets.load_from_disk(str(folder))['test']['label']
    assert data.chance == chance_level([tuple(sorted(y)) for y in test])


def test_loaders_take_the_workers_and_pin_memory_with_cuda(cifar, monkeypatch):
    data = ImageDatasetData(image_args(cifar, num_workers=1, extra_test_splits=['test']), Accelerator())
    monkeypatch.setattr(ds.torch.cuda, 'is_available', lambda: True)
    data.build(CIFAR_CFG)
    for loader in (data.train_loader, data.test_loader, data.extra_test_loaders['test']):
        assert loader.num_workers == 1 and loader.pin_memory is True


def test_the_augmentation_hears_the_epoch_in_a_run_of_two_processes(cifar):
    """On two processes accelerate's loader hands the epoch to its sharded sampler only, not to the dataset
    (on one it tells both), so train_batches must tell the augmentation itself: rank 0's loader of a two-process
    run, as accelerate prepares it."""
    from accelerate.data_loader import BatchSamplerShard, prepare_data_loader
    from accelerate.state import AcceleratorState, GradientState

    class TwoProcesses(Accelerator):
        def prepare(self, *loaders):
            prepared = [
                prepare_data_loader(loader, num_processes=2, process_index=0, use_seedable_sampler=True)
                for loader in loaders
            ]
            return prepared[0] if len(prepared) == 1 else prepared

    data = ImageDatasetData(image_args(cifar, augment='crop-flip'), Accelerator())
    data.build(CIFAR_CFG)
    try:
        data.prepare(TwoProcesses(num_processes=2))
        assert isinstance(data.train_loader.batch_sampler, BatchSamplerShard)
        for epoch in (3, 1):
            seen = [data.train_loader.dataset.epoch for _ in data.train_batches(epoch, 0)]
            assert seen == [epoch] * data.batches_per_epoch and data.batches_per_epoch == 1
    finally:  # prepare_data_loader sets up accelerate's process state
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
