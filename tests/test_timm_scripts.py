"""timm's own scripts (train.py, validate.py, benchmark.py, inference.py, unmodified, from
``../shared/timm-scripts`` beside the project) drive one model of each family, on a tiny ImageFolder written
here, on the CPU. Without that folder these tests skip with the reason, and fail in CI.

The scripts are run as a user runs them after ``import timm_capsules`` (``timm_suite/run_timm_script.py``).
What they report is checked against the same computation done here: train.py's last evaluation and
validate.py's top-1 against the logits of the saved checkpoint on the validation images, inference.py's
logits against them too, and every script's parameter count against the model's.
"""

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image

import timm_capsules  # noqa: F401  (registers the models)

import ci
from ci import unavailable
from timm_suite import fetch
from timm_suite.fetch import SCRIPTS, fetch_timm_scripts

RUNNER = Path(__file__).parent / 'timm_suite' / 'run_timm_script.py'
# model: (create_model keywords, input size): one model of each family at a small input (the smallest the
# dynamic-routing CapsNet takes is 20 x 20; ResNet-18 pools globally), plus a one-channel CapsNet shrunk as
# train_accelerate's quick run. The EM CapsNet keeps 32 x 32: at 16 x 16 (a 1 x 1 grid after its last conv
# capsule layer) its outputs move by 0.1 for an input change of 1e-6, too much for comparing scripts' logits
CASES = {
    'capsnet_simple_cifar10': (dict(img_size=16), (3, 16, 16)),
    'dynamic_capsnet_simple_cifar10': (dict(img_size=20), (3, 20, 20)),
    'em_capsnet_simple_cifar10': ({}, (3, 32, 32)),
    'cnn_baseline_cifar10': (dict(img_size=16), (3, 16, 16)),
    'resnet18_cifar10': ({}, (3, 16, 16)),
    'capsnet_matrix_multimnist': (
        dict(
            img_size=16, backbone_args={'out_chs': 64}, primary_caps=8, pose_dim=16, capsule_layers=[('conv', 8, 3, 1)]
        ),
        (1, 16, 16),
    ),
}
MODELS = list(CASES)
# timm's inference.py reads every image as RGB, whatever the model's input channels
RGB_MODELS = [name for name, (_, input_size) in CASES.items() if input_size[0] == 3]
CLASSES = ('bright', 'dark')  # ImageFolder sorts class folders: bright = 0, dark = 1
BATCH = 4
# every script runs on the CPU, in this process's interpreter, without data-loader worker processes
COMMON = ['--device', 'cpu', '--workers', '0']


@pytest.fixture(scope='module')
def timm_scripts() -> Path:
    return _timm_scripts_or_unavailable()


def _timm_scripts_or_unavailable() -> Path:
    folder, reason = fetch_timm_scripts()
    if folder is None:
        unavailable(reason)  # a visible skip on a user's clone; in CI, where ../shared/timm-scripts is, a failure
    return folder


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """ImageFolders of bright or dark images of one input size (RGB, or grayscale for one channel): 2 x 4 for
    training, 2 x 2 for validation plus one bright image filed under dark, so that validation accuracy is
    neither 0 nor 100 for a model that learnt brightness."""
    roots = {}

    def write(input_size) -> Path:
        if input_size not in roots:
            root = roots[input_size] = tmp_path_factory.mktemp('images')
            channels, height, width = input_size
            rng = np.random.default_rng(0)
            shape = (height, width, 3) if channels == 3 else (height, width)

            def image(bright: bool):
                low = 128 if bright else 0
                return Image.fromarray(rng.integers(low, low + 128, shape, dtype=np.uint8))

            for split, per_class in (('train', 4), ('validation', 2)):
                for name in CLASSES:
                    folder = root / split / name
                    folder.mkdir(parents=True)
                    for i in range(per_class):
                        image(name == 'bright').save(folder / f'{name}_{i}.png')
            image(True).save(root / 'validation' / 'dark' / 'dark_mislabelled.png')
        return roots[input_size]

    return write


def _model_args(model_name: str):
    """What every script is told about the model: its keywords and input size."""
    model_kwargs, input_size = CASES[model_name]
    kwargs = [f'{key}={value!r}' for key, value in model_kwargs.items()]
    return ['--model', model_name, '--input-size', *input_size, *(['--model-kwargs', *kwargs] if kwargs else [])]


def _run(script: Path, args, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(RUNNER), str(script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f'{script.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}'
    return result.stdout


@pytest.fixture(scope='module')
def trained(timm_scripts, image_folder, tmp_path_factory):
    """train.py for 2 epochs, once per model: returns its output folder (last.pth.tar, summary.csv)."""
    runs = {}

    def train(model_name: str) -> Path:
        if model_name not in runs:
            output = tmp_path_factory.mktemp(f'train_{model_name}')
            _run(
                timm_scripts / 'train.py',
                [
                    *_model_args(model_name),
                    '--data-dir',
                    image_folder(CASES[model_name][1]),
                    '--epochs',
                    2,
                    '-b',
                    BATCH,
                    '--lr',
                    0.01,
                    '--warmup-epochs',
                    0,
                    '--drop',
                    0.1,
                    '--no-prefetcher',
                    '--checkpoint-hist',
                    1,
                    '--seed',
                    0,
                    '--output',
                    output,
                    '--experiment',
                    'run',
                    *COMMON,
                ],
                output,
            )
            runs[model_name] = output / 'run'
        return runs[model_name]

    return train


def _reference(model_name: str, checkpoint: Path, image_folder):
    """The checkpoint's outputs on the validation images, with the model's own eval transform."""
    model_kwargs, input_size = CASES[model_name]
    model = timm.create_model(model_name, **model_kwargs).eval()
    with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its arguments beside the weights
        state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    model.load_state_dict(state['state_dict'])
    # the model's eval transform at the input size the scripts are given, as they resolve it
    transform = timm.data.create_transform(**timm.data.resolve_data_config({'input_size': input_size}, model=model))
    dataset = timm.data.create_dataset(
        '',
        root=str(image_folder(input_size)),
        split='validation',
        transform=transform,
        input_img_mode='RGB' if input_size[0] == 3 else 'L',
    )
    images, targets = zip(*(dataset[i] for i in range(len(dataset))))
    with torch.no_grad():
        outputs = model(torch.stack(images))
    return dataset.filenames(basename=True), outputs, torch.tensor(targets)


def _param_count(model_name: str, **kwargs) -> float:
    """As timm's scripts report it: millions, two decimals."""
    model = timm.create_model(model_name, **dict(CASES[model_name][0], **kwargs))
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


@pytest.mark.slow
@pytest.mark.parametrize('model_name', MODELS)
def test_train_py_trains_two_epochs_and_evaluates_the_checkpoint_it_saves(model_name, trained, image_folder):
    run = trained(model_name)
    with open(run / 'summary.csv') as f:
        summary = list(csv.DictReader(f))
    assert [row['epoch'] for row in summary] == ['0', '1']
    assert all(np.isfinite(float(row['train_loss'])) for row in summary)
    _, outputs, targets = _reference(model_name, run / 'last.pth.tar', image_folder)
    last = summary[-1]
    assert float(last['eval_loss']) == pytest.approx(F.cross_entropy(outputs, targets).item(), rel=1e-4)
    assert float(last['eval_top1']) == pytest.approx(100 * (outputs.argmax(-1) == targets).float().mean().item())


@pytest.mark.slow
@pytest.mark.parametrize('model_name', MODELS)
def test_validate_py_on_the_training_checkpoint(model_name, timm_scripts, trained, image_folder, tmp_path):
    checkpoint = trained(model_name) / 'last.pth.tar'
    _run(
        timm_scripts / 'validate.py',
        [
            *_model_args(model_name),
            '--data-dir',
            image_folder(CASES[model_name][1]),
            '--split',
            'validation',
            '--checkpoint',
            checkpoint,
            '-b',
            BATCH,
            '--no-prefetcher',
            '--results-file',
            tmp_path / 'results.json',
            '--results-format',
            'json',
            *COMMON,
        ],
        tmp_path,
    )
    results = json.loads((tmp_path / 'results.json').read_text())
    _, outputs, targets = _reference(model_name, checkpoint, image_folder)
    assert results['model'] == model_name
    assert results['top1'] == pytest.approx(100 * (outputs.argmax(-1) == targets).float().mean().item(), abs=1e-3)
    assert results['param_count'] == _param_count(model_name)


@pytest.mark.slow
@pytest.mark.parametrize('model_name', MODELS)
def test_benchmark_py_inference_and_training(model_name, timm_scripts, tmp_path):
    """benchmark.py builds every model with in_chans=3, so it is given RGB images of the model's size."""
    _, (_, height, width) = CASES[model_name]
    _run(
        timm_scripts / 'benchmark.py',
        [
            *_model_args(model_name),
            '--input-size',
            3,
            height,
            width,
            '--bench',
            'both',
            '--device',
            'cpu',
            '-b',
            2,
            '--num-warm-iter',
            1,
            '--num-bench-iter',
            5,
            '--results-file',
            tmp_path / 'results.json',
            '--results-format',
            'json',
        ],
        tmp_path,
    )
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['model'] == model_name
    assert results['param_count'] == _param_count(model_name, in_chans=3)
    for phase in ('infer', 'train'):
        assert results[f'{phase}_batch_size'] == 2 and results[f'{phase}_img_size'] == height
        assert results[f'{phase}_samples_per_sec'] > 0


@pytest.mark.slow
@pytest.mark.parametrize('model_name', RGB_MODELS)
def test_inference_py_outputs_the_checkpoint_logits(model_name, timm_scripts, trained, image_folder, tmp_path):
    checkpoint = trained(model_name) / 'last.pth.tar'
    _run(
        timm_scripts / 'inference.py',
        [
            *_model_args(model_name),
            '--data-dir',
            image_folder(CASES[model_name][1]),
            '--split',
            'validation',
            '--checkpoint',
            checkpoint,
            '-b',
            BATCH,
            '--output-type',
            'logit',
            '--topk',
            10,
            '--include-index',
            '--label-type',
            'none',
            '--results-dir',
            tmp_path,
            '--results-file',
            'predictions',
            '--results-format',
            'json',
            '--no-console-results',
            *COMMON,
        ],
        tmp_path,
    )
    predictions = json.loads((tmp_path / 'predictions.json').read_text())
    filenames, outputs, _ = _reference(model_name, checkpoint, image_folder)
    assert sorted(predictions) == sorted(filenames)
    for filename, expected in zip(filenames, outputs):
        logits = torch.zeros(len(expected)).index_put_(
            (torch.tensor(predictions[filename]['index']),), torch.tensor(predictions[filename]['logit'])
        )
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# ---- where the scripts come from -------------------------------------------------------------------


def _write_scripts(folder: Path, scripts=SCRIPTS, version=None):
    folder.mkdir(parents=True, exist_ok=True)
    for script in scripts:
        (folder / script).write_text(f'# {script}\n')
    if version:
        (folder / 'timm').mkdir()
        (folder / 'timm' / 'version.py').write_text(f"__version__ = '{version}'\n")
    return folder


def test_scripts_from_a_timm_checkout_of_the_installed_version(monkeypatch, tmp_path):
    checkout = _write_scripts(tmp_path / 'checkout', version=timm.__version__)
    monkeypatch.setenv('TIMM_SCRIPTS_DIR', str(checkout))
    assert fetch_timm_scripts() == (checkout, '')


def test_scripts_from_a_checkout_of_another_version_or_an_incomplete_folder_are_refused(monkeypatch, tmp_path):
    other = _write_scripts(tmp_path / 'other', version='0.9.16')
    monkeypatch.setenv('TIMM_SCRIPTS_DIR', str(other))
    folder, reason = fetch_timm_scripts()
    assert folder is None and '0.9.16' in reason and timm.__version__ in reason
    incomplete = _write_scripts(tmp_path / 'incomplete', scripts=SCRIPTS[:3])
    monkeypatch.setenv('TIMM_SCRIPTS_DIR', str(incomplete))
    folder, reason = fetch_timm_scripts()
    assert folder is None and 'inference.py' in reason and 'train.py' not in reason


def test_scripts_from_beside_the_project(monkeypatch, tmp_path):
    monkeypatch.delenv('TIMM_SCRIPTS_DIR', raising=False)
    shared = _write_scripts(tmp_path / 'shared' / 'timm-scripts')
    monkeypatch.setattr(fetch, 'SHARED_SCRIPTS', shared)
    assert fetch_timm_scripts() == (shared, '')
    (shared / 'validate.py').unlink()
    folder, reason = fetch_timm_scripts()
    assert folder is None and 'validate.py' in reason and str(shared) in reason and 'train.py' not in reason


def test_the_project_finds_the_scripts_at_shared_timm_scripts():
    assert fetch.SHARED_SCRIPTS == Path(__file__).resolve().parents[1].parent / 'shared' / 'timm-scripts'


@pytest.mark.parametrize('in_ci', [False, True])
def test_missing_scripts_skip_with_the_reason_or_fail_in_ci(in_ci, monkeypatch, tmp_path):
    monkeypatch.delenv('TIMM_SCRIPTS_DIR', raising=False)
    monkeypatch.setattr(fetch, 'SHARED_SCRIPTS', tmp_path / 'absent')
    monkeypatch.setattr(ci, 'IN_CI', in_ci)
    with pytest.raises(pytest.fail.Exception if in_ci else pytest.skip.Exception, match='train.py'):
        _timm_scripts_or_unavailable()


def test_runner_registers_the_models_and_hands_the_script_its_arguments(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text(
        'import json, sys, timm\nprint(json.dumps([sys.argv, __name__, timm.is_model("capsnet_simple_cifar10")]))\n'
    )
    argv, name, registered = json.loads(_run(script, ['--model', 'capsnet_simple_cifar10'], tmp_path))
    assert argv == [str(script), '--model', 'capsnet_simple_cifar10']
    assert name == '__main__' and registered
