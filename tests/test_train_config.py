"""Tests of timm_capsules/train/config.py: presets and explicit overrides, the help text, --print-config and
bad arguments, each stopped with one line naming the option."""

import json

import pytest

import timm
import timm_capsules  # noqa: F401
from timm_capsules.presets import PRESETS
from timm_capsules.train.config import TrainConfig, build_parser

from train_fixtures import ROOT, TINY, cli, make_image_dataset


def test_presets_and_overrides():
    args = TrainConfig.from_argv(
        [
            '--preset',
            'cifar10_resnet',
            '--lr',
            '0.05',
            '--iterations',
            '3',
            '--routing',
            'sequential',
            '--no-layer-norm',
            '--activations',
        ]
    )
    assert (args.model, args.dataset, args.opt, args.lr, args.momentum, args.weight_decay) == (
        'capsnet_resnet_cifar10',
        'cifar10',
        'sgd',
        0.05,
        0.9,
        5e-4,
    )
    assert (args.batch_size, args.epochs, args.decay_milestones, args.decay_rate) == (128, 350, [150, 250], 0.1)
    assert args.model_kwargs == dict(iterations=3, routing='sequential', layer_norm=False, activations=True)
    args = TrainConfig.from_argv(['--preset', 'multimnist_vector', '--model_arg', "backbone_args={'out_chs': 32}"])
    assert (args.model, args.epoch_size, args.test_size) == ('capsnet_vector_multimnist', 60_000, 10_000)
    assert args.model_kwargs == dict(backbone_args={'out_chs': 32})
    for name, preset in PRESETS.items():
        assert timm.is_model(preset['model']), name
    # the quick default's kwargs belong to its model: another model gets none of them
    assert TrainConfig.from_argv([]).model_kwargs['pose_dim'] == 16
    assert TrainConfig.from_argv(['--model', 'capsnet_simple_cifar10']).model_kwargs == {}
    assert (
        TrainConfig.from_argv(['--model-kwargs', 'backbone=resnet18', 'x=[1, 2]']).model_kwargs['backbone']
        == 'resnet18'
    )


def test_help_gives_every_option_a_line_and_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        TrainConfig.from_argv(['--help'])
    assert done.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != 'help']
    assert all(a.help and a.help.strip() for a in options), [a.dest for a in options if not a.help]
    # the defaults shown are the real ones: the quick run's (QUICK) and the parser's own, never "None"
    for shown in (
        'learning rate (default: 0.002)',
        '(default: adam)',
        '(default: cosine)',
        '(default: 8192)',
        '(default: capsnet_matrix_multimnist)',
        '(default: 42)',
        'weight decay (default: 0.0)',
        '(default: 4 with CUDA, else 0)',
        '(default: 2 x batch size)',
    ):
        assert shown in ' '.join(text.split()), shown
    assert 'default: None' not in text and 'default: []' not in text
    for group in ('model:', 'data:', 'optimisation:', 'checkpointing:', 'output:'):
        assert f'\n{group}\n' in text, group
    presets = text[text.index('presets (--preset NAME') :]
    for name, preset in PRESETS.items():  # listed once, with the model they train
        assert text.count(f' {name} ') == 1 and f'{name} ' in presets, name
        assert f' {preset["model"]} on {preset["dataset"]}' in presets


def test_readme_presets_table_lists_every_preset():
    readme = (ROOT / 'README.md').read_text()
    table = readme[readme.index('### Presets') :].split('\n\n')[1]
    rows = [line.split('|')[1] for line in table.splitlines()[2:]]
    named = {name.strip(' `') for row in rows for name in row.split(' / ')}
    assert named == set(PRESETS)


def test_baseline_presets_use_the_papers_optimizers():
    presets = PRESETS
    for data in ('cifar10', 'cifar100'):
        assert presets[f'{data}_dynamic_simple']['opt'] == 'adam' and presets[f'{data}_dynamic_simple']['lr'] == 1e-3
        assert presets[f'{data}_em_resnet']['opt'] == 'adam' and presets[f'{data}_em_resnet']['lr'] == 1e-2
        assert presets[f'{data}_cnn']['opt'] == 'sgd' and presets[f'{data}_resnet18']['lr'] == 0.1
    for name, preset in presets.items():
        assert preset['model'] in timm.list_models(), name


def test_print_config_shows_a_presets_resolved_values(run, capsys, tmp_path):
    config = run(
        [
            '--preset',
            'cifar10_em_simple',
            '--lr',
            '0.5',
            '--iterations',
            '3',
            '--print-config',
            '--output-dir',
            tmp_path,
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == config
    assert (printed['model'], printed['dataset'], printed['opt'], printed['lr'], printed['batch_size']) == (
        'em_capsnet_simple_cifar10',
        'cifar10',
        'adam',
        0.5,
        128,
    )
    assert printed['decay_milestones'] == [150, 250] and printed['eval_batch_size'] == 256
    assert printed['model_kwargs'] == {'iterations': 3}
    assert not any(tmp_path.iterdir())  # nothing trained
    quick = run(['--print-config'])
    assert quick['model_kwargs']['pose_dim'] == 16 and quick['epoch_size'] == 8192


# --------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    'argv, message',
    [
        (['--model', 'no_such_model'], "unknown model 'no_such_model'"),
        (['--model', 'capsnet_simpel_cifar10'], 'closest registered names: capsnet_simple_cifar10, '),  # ours
        (['--model', 'resnet18_cifar'], 'resnet18_cifar10'),  # ours, among timm's ResNets
        (['--model', 'resnt50'], 'resnet50'),  # timm's own
        (['--preset', 'imagenet'], "invalid choice: 'imagenet'"),
        (['--model-arg', 'img_size=8'], 'too small'),
        (['--dataset', 'mnist'], "unknown dataset 'mnist'"),
        (['--model', 'capsnet_simple_cifar10'], "DiverseMultiMNIST's are (1, 36, 36)"),
        (['--checkpointing-steps', 'often'], "--checkpointing_steps: must be a number of steps (>= 1) or 'epoch'"),
        (['--resume-from-checkpoint', '/no/such/dir'], 'checkpoint /no/such/dir does not exist'),
        (['--dataset', 'cifar10', '--model', 'capsnet_simple_cifar10'], "cannot load split 'train' of uoft-cs/cifar10"),
        # accelerate would print "mixed precision fp16" and train in float32: no autocast, no scaler on the CPU
        (TINY + ['--max-train-steps', '1', '--cpu', '--mixed-precision', 'fp16'], '--mixed_precision fp16 needs a GPU'),
        # numbers are checked when parsed, naming the option (they used to divide by zero or crash deep inside)
        (['--epoch-size', '0'], 'argument --epoch-size/--epoch_size: must be >= 1, got 0'),
        (['--max-train-steps', '-3'], 'argument --max-train-steps/--max_train_steps: must be >= 1, got -3'),
        (['--test-size', '-5'], 'argument --test-size/--test_size: must be >= 1, got -5'),
        (['--lr', 'nan'], 'argument --lr: must be a finite number, got nan'),
        (['--lr', '0'], 'argument --lr: must be > 0, got 0'),
        (['--clip-grad', 'nan'], 'argument --clip-grad/--clip_grad: must be a finite number, got nan'),
        (['--weight-decay', 'inf'], 'argument --weight-decay/--weight_decay: must be a finite number, got inf'),
        (['--batch-size', '2.5'], "argument --batch-size/--batch_size: '2.5' is not an integer"),
        (['--num-workers', '-1'], 'argument --num-workers/--num_workers: must be >= 0, got -1'),
        (['--decay-milestones', '3', '-1'], 'argument --decay-milestones/--decay_milestones: must be >= 0, got -1'),
        # a value that is not a Python literal is refused, except for the name arguments
        (['--model-arg', 'primary_caps=eight'], "model argument 'primary_caps=eight': 'eight' is not a Python literal"),
        (['--model-arg', 'global_pool=avg', '--model-arg', 'pose_dim=[4'], "'[4' is not a Python literal"),
        (TINY + ['--opt', 'sgdd'], '--opt sgdd: Optimizer sgdd not found in registry'),
        (TINY + ['--sched', 'cosin'], "--sched cosin: Unknown scheduler 'cosin'"),
    ],
)
def test_bad_arguments_stop_with_one_line(run, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        run(argv + ['--output-dir', tmp_path])
    text = str(stop.value.code) if not isinstance(stop.value.code, int) else capsys.readouterr().err.strip()
    assert message in text and '\n' not in text.strip()
    assert not (tmp_path / 'metrics.json').exists()


@pytest.mark.slow
def test_bad_arguments_cli(tmp_path):
    dataset = make_image_dataset(tmp_path / 'cifar', size=32, mode='RGB', n=(4, 2))
    done = cli(
        '--dataset',
        f'hf:{dataset}',
        '--label-column',
        'fine_label',
        '--model',
        'capsnet_simple_cifar10',
        '--output-dir',
        tmp_path / 'out',
        timeout=120,
    )
    assert done.returncode != 0
    assert 'Traceback' not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "has no column 'image' or 'fine_label'" in done.stderr and "columns: ['img', 'label']" in done.stderr
    assert not (tmp_path / 'out').exists()
