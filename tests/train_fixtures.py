"""Shared pieces of the training tests (test_train_*.py, test_run_safety.py, test_train_arithmetic.py, ...): the
tiny capsule net on the built-in MNIST sample, ``run`` (a command line run in-process through
``train_accelerate.run``) and ``cli`` (the script in a subprocess), metrics written out independently of the
package, a spy on what reaches the model, and tiny Hub-style image datasets.

Tiny models keep every training step in the milliseconds. Import the fixtures by name
(``from train_fixtures import run  # noqa: F401``)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import timm_capsules  # noqa: F401
import train_accelerate  # the script at the checkout's root (pytest's pythonpath)
from timm_capsules.train import RunResult, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


SCRIPT = ROOT / 'train_accelerate.py'


ENV = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


# a 4-type, 2x2-pose capsule net on DiverseMultiMNIST (built-in MNIST sample): ~2k parameters
TINY_MODEL = [
    '--model-kwargs',
    "backbone_args={'out_chs': 8}",
    'primary_caps=4',
    'pose_dim=4',
    "capsule_layers=[('conv', 4, 3, 1)]",
]


TINY = TINY_MODEL + [
    '--mnist-source',
    'sample',
    '--batch-size',
    '8',
    '--epoch-size',
    '40',
    '--test-size',
    '37',
    '--log-every',
    '2',
    '--lr',
    '0.01',
]


@pytest.fixture
def run():
    """Runs the command line ``argv`` in-process as train_accelerate.py does (``TrainConfig.from_argv``, then
    ``run``): metrics.json's contents with ``model_object``, the trained model, or the
    resolved configuration with --print-config. Each call is a fresh process to accelerate: its process-wide
    state (which a second Accelerator with other settings may not change) is reset afterwards."""
    from accelerate.state import AcceleratorState, GradientState

    def _run(argv):
        try:
            config = TrainConfig.from_argv([str(a) for a in argv])
            if config.print_config:
                print(json.dumps(config.resolved(), indent=2))
                return config.resolved()
            result = train_accelerate.run(config)
            assert isinstance(result, RunResult) and result.output_dir == Path(config.output_dir)
            assert 'model_object' not in result.metrics
            return dict(result.metrics, model_object=result.model)
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()

    return _run


def load_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / 'model.safetensors'))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def cli(*argv, timeout=300):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, argv)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------- metrics written out here, independently of the script
def expected_losses(scores, hot, returns, multi_label):
    """Per-image losses from their definitions (not through timm_capsules.losses); hot: multi-hot targets."""
    if returns == 'lengths':  # Sabour et al.: T_k max(0, 0.9 - s_k)^2 + 0.5 (1 - T_k) max(0, s_k - 0.1)^2, summed
        return (hot * (0.9 - scores).clamp(min=0) ** 2 + 0.5 * (1 - hot) * (scores - 0.1).clamp(min=0) ** 2).sum(1)
    if returns == 'activations':  # spread loss at the evaluation margin 0.9: sum over (target t, non-target i)
        return torch.stack(
            [
                sum(
                    (0.9 - (s[t] - s[i])).clamp(min=0) ** 2
                    for t in range(len(s))
                    if h[t]
                    for i in range(len(s))
                    if not h[i]
                )
                for s, h in zip(scores, hot)
            ]
        )
    if multi_label:  # binary cross-entropy per class, averaged over the classes
        return -(hot * F.logsigmoid(scores) + (1 - hot) * F.logsigmoid(-scores)).mean(1)
    return -(scores.log_softmax(1) * hot).sum(1)  # cross-entropy


def independent_metrics(model, images, targets, multi_label, returns='logits'):
    """The test metrics of `model` on these images in one plain forward, without train_accelerate."""
    with torch.no_grad():
        scores = model.eval()(images).float()
    hot = targets.float() if multi_label else F.one_hot(targets, scores.shape[1]).float()
    metrics = dict(num_images=len(targets), loss=expected_losses(scores, hot, returns, multi_label).mean().item())
    if not multi_label:
        ranked = scores.topk(min(5, scores.shape[1]), 1).indices
        return dict(
            metrics,
            top1=(ranked[:, 0] == targets).float().mean().item(),
            top5=(ranked == targets[:, None]).any(1).float().mean().item(),
        )
    predicted, actual = scores > (0.0 if returns == 'logits' else 0.5), targets.bool()
    counts = zip(
        (predicted & actual).sum(0).tolist(),
        (predicted & ~actual).sum(0).tolist(),
        (~predicted & actual).sum(0).tolist(),
    )
    f1 = [2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0 for tp, fp, fn in counts]
    return dict(
        metrics,
        exact_match=(predicted == actual).all(1).float().mean().item(),
        per_class_f1=f1,
        macro_f1=sum(f1) / len(f1),
    )


def assert_metrics(reported, expected):
    """Every metric the script reports, and only those, equals the independent value."""
    assert set(reported) - {'step', 'epoch'} == set(expected)
    for key, value in expected.items():
        assert reported[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def mean_std(model):
    """The (one-channel) normalisation a model was saved with."""
    return model.pretrained_cfg['mean'][0], model.pretrained_cfg['std'][0]


def multimnist_test_images(size, mean, std, seed=0):
    from timm_capsules.data import make_split

    split = make_split('test', size, source='sample', seed=seed)
    return (torch.from_numpy(split.images).unsqueeze(1).float() / 255 - mean) / std, torch.from_numpy(split.targets)


def spy_on_model(monkeypatch):
    """Wraps the run's create_model so that every forward of the model is recorded: whether it trained, the
    images it received, and, from inside the first convolution (forward hooks of the top module run outside
    the autocast that accelerate wraps around forward), whether autocast was on and the dtype computed in."""
    calls = []
    create = train_accelerate.create_model

    def create_model(args, num_classes):
        model, kwargs = create(args, num_classes)
        model.register_forward_pre_hook(
            lambda module, inputs: calls.append(dict(training=module.training, images=inputs[0].detach().clone()))
        )
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(
            lambda module, inputs, output: calls[-1].update(
                autocast=torch.is_autocast_enabled('cpu'), dtype=output.dtype
            )
        )
        return model, kwargs

    monkeypatch.setattr(train_accelerate, 'create_model', create_model)
    return calls


def evaluated_images(calls):
    """The images of the last evaluation, in the order the model saw them."""
    last = max(k for k, call in enumerate(calls) if call['training']) if any(c['training'] for c in calls) else -1
    return torch.cat([call['images'] for call in calls[last + 1 :]])


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------ Hub-style data
def image_examples(size, mode, n=(12, 7), multi_label=False, split_names=('train', 'test'), plain=False):
    """{split: (PIL images, labels)}, the same on every call; plain: each image one random colour (which
    resizing leaves exact)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (size, size, 3) if mode == 'RGB' else (size, size)
    examples = {}
    for split, count in zip(split_names, n):
        arrays = [
            np.broadcast_to(rng.integers(0, 256, shape[2:], dtype=np.uint8), shape).copy()
            if plain
            else rng.integers(0, 256, shape, dtype=np.uint8)
            for _ in range(count)
        ]
        labels = [
            sorted(set(rng.integers(0, 10, 2).tolist())) if multi_label else int(rng.integers(0, 10))
            for _ in range(count)
        ]
        examples[split] = [Image.fromarray(a, mode) for a in arrays], labels
    return examples


def make_image_dataset(folder, size, mode, n=(12, 7), multi_label=False, form='save_to_disk', **options):
    """A tiny dataset with CIFAR's columns (img / label) and classes c0..c9, as --data-dir takes it: a
    save_to_disk DatasetDict, parquet files <split>.parquet, or an imagefolder <split>/<class>/<k>.png
    (whose columns are image / label, and whose classes are the folder names that occur)."""
    import datasets

    label = datasets.ClassLabel(names=[f'c{i}' for i in range(10)])
    features = datasets.Features({'img': datasets.Image(), 'label': datasets.List(label) if multi_label else label})
    splits = {}
    for split, (images, labels) in image_examples(size, mode, n, multi_label, **options).items():
        splits[split] = datasets.Dataset.from_dict({'img': images, 'label': labels}, features=features)
        for k, (image, y) in enumerate(zip(images, labels)) if form == 'imagefolder' else ():
            (folder / split / f'c{y}').mkdir(parents=True, exist_ok=True)
            image.save(folder / split / f'c{y}' / f'{k:03d}.png')
        if form == 'parquet':
            folder.mkdir(parents=True, exist_ok=True)
            splits[split].to_parquet(str(folder / f'{split}.parquet'))
    if form == 'save_to_disk':
        datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def as_tensors(images, labels, mean, std, multi_label=False, num_classes=10):
    """PIL images -> normalised float (N, C, H, W) written out here; labels -> class indices or multi-hot."""
    arrays = [np.asarray(image, dtype=np.float32).reshape(image.size[1], image.size[0], -1) / 255 for image in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    if multi_label:
        return x, torch.stack([torch.zeros(num_classes).index_fill_(0, torch.tensor(y), 1.0) for y in labels])
    return x, torch.tensor(labels)


CIFAR_TINY = [
    '--model',
    'capsnet_simple_cifar10',
    '--dataset',
    'cifar10',
    '--model-kwargs',
    "backbone_args={'out_chs': 8}",
    'primary_caps=4',
    'pose_dim=4',
]


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.201)  # capsnet_simple_cifar10's
