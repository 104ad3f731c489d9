"""What each scale runs: the studies' configurations (a table row, a dataset, its recipe's arguments and the model's)
and their runs, one per configuration and seed. A configuration that several studies read (IDA at its default t:
table1, iterations, ablations) is one run."""

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Sequence

from timm_capsules.presets import PRESETS, QUICK

from .protocols import CPU_RECIPES, GPU_RECIPES, PAPER_AFFINE

STUDIES = ('table1', 'iterations', 'ablations', 'multimnist', 'affine')
# what each study tests: the report heads its table with it, docs/results.md's table of the studies cites it
CLAIMS = {
    'table1': 'IDA matches or beats the CNNs with far fewer parameters, and beats DR and EM (Table 1)',
    'iterations': "IDA's accuracy stays flat or rises with the routing iterations t, while DR and EM degrade "
    '(Figs. 3-4)',
    'ablations': 'each part of the routing matters: LayerNorm (A), concurrent routing (B), no activations (C)',
    'multimnist': 'the CapsNets beat the CNN baselines on overlapping digits (Table 3); routing separates them',
    'affine': 'capsules generalise to unseen affine transforms (Sabour et al. 2017: 79% vs 66% on affNIST, '
    'both about 99% on the translated training distribution)',
}
DATA = Path('outputs') / 'experiments' / 'data'  # where the exported datasets go (part of the runs' arguments)


class Run(NamedTuple):
    """One training run: ``row`` says where its result goes in its studies' tables."""

    run_id: str  # also its record's file name
    studies: tuple
    row: Dict[str, Any]  # e.g. kind='IDA', iterations=2, variant='A: no LayerNorm'
    dataset: str
    seed: int
    image_budget: int  # training images seen
    train_args: List[str]  # train_accelerate.py arguments (without seed and output folder)
    probe: bool = False  # part-whole probe on the trained model (DiverseMultiMNIST)


class Config(NamedTuple):
    """One configuration of a scale's studies, before seeds."""

    studies: tuple
    row: Dict[str, Any]
    dataset: str
    image_budget: int  # 0: the preset's (paper scale)
    train_args: List[str]
    probe: bool = False


# ------------------------------------------------------------------------------------------------ models
# the small models of the cpu scale: the quick run's CapsNet (presets.QUICK) and CNNs of about its size
SMALL_MATRIX = QUICK['model_kwargs']
SMALL_CNN_STAGES = ((80, 3, 2, 1, False, False), (80, 3, 2, 0, False, True), (80, 3, 1, 0, False, True))
ROUTING_MODELS = {
    'IDA': 'capsnet_simple_cifar10',
    'DR': 'dynamic_capsnet_simple_cifar10',
    'EM': 'em_capsnet_simple_cifar10',
}
CNN_MODELS = {'CNN': 'cnn_baseline_cifar10', 'ResNet-18': 'resnet18_cifar10'}
ABLATIONS = {
    'A: no LayerNorm': ['--no-layer-norm'],
    'B: sequential routing': ['--routing', 'sequential'],
    'C: EM-style activations': ['--activations'],
}
FULL_ROUTING = 'IDA (concurrent, LayerNorm)'


def model_args(model: str, **kwargs) -> List[str]:
    args = ['--model', model]
    for key, value in kwargs.items():
        args += ['--model-arg', f'{key}={value!r}']
    return args


def routing_run(kind: str, model: str, t: int):
    """The studies a routing model at t iterations serves, and its table row: every t is in ``iterations``, the
    kind's default t (IDA 2, DR and EM 3) in ``table1``, and IDA at t = 2 in ``ablations`` too (one run for all)."""
    default_t = 2 if kind == 'IDA' else 3
    studies = (
        ('iterations',) + (('table1',) if t == default_t else ()) + (('ablations',) if kind == 'IDA' and t == 2 else ())
    )
    return studies, dict(kind=kind, model=model, iterations=t, variant=FULL_ROUTING)


def fashion_configs(scale: str, data_dir: Path, iterations: Sequence[int]) -> List[Config]:
    """table1, iterations and ablations on Fashion-MNIST, the cpu and gpu scales' stand-in for CIFAR."""
    recipe = (CPU_RECIPES if scale == 'cpu' else GPU_RECIPES)['fashion_mnist']
    fashion_input, budget = recipe.model_input(), recipe.image_budget()
    configs = []
    for kind, model in ROUTING_MODELS.items():
        for t in iterations:
            studies, row = routing_run(kind, model, t)
            args = recipe.argv(data_dir, kind) + model_args(model, iterations=t, **fashion_input)
            configs.append(Config(studies, row, 'fashion_mnist', budget, args))
    for kind, model in CNN_MODELS.items():  # timm's ResNet takes any input size: no img_size argument
        model_input = fashion_input if kind == 'CNN' else dict(in_chans=1)
        args = recipe.argv(data_dir, kind) + model_args(model, **model_input)
        configs.append(Config(('table1',), dict(kind=kind, model=model), 'fashion_mnist', budget, args))
    ida = ROUTING_MODELS['IDA']
    for variant, flags in ABLATIONS.items():
        row = dict(kind='IDA', model=ida, variant=variant, iterations=2)
        args = recipe.argv(data_dir, 'IDA') + model_args(ida, **fashion_input) + flags
        configs.append(Config(('ablations',), row, 'fashion_mnist', budget, args))
    return configs


def cpu_configs(data_dir: Path) -> List[Config]:
    configs = fashion_configs('cpu', data_dir, (1, 2, 3, 4))
    multimnist = CPU_RECIPES['diverse_multimnist']
    cnn_stages = SMALL_CNN_STAGES + ((80, 1, 1, 0, False, False),)
    for kind, model, kwargs, probe in (
        ('matrix CapsNet', 'capsnet_matrix_multimnist', SMALL_MATRIX, True),
        ('vector CapsNet', 'capsnet_vector_multimnist', SMALL_MATRIX, True),
        ('CNN', 'cnn_baseline_multimnist', dict(stages=cnn_stages), False),
        ('CNN, fully connected', 'cnn_fc_multimnist', dict(stages=SMALL_CNN_STAGES, head_hidden_size=80), False),
    ):
        args = multimnist.argv(data_dir) + model_args(model, **kwargs)
        row = dict(kind=kind, model=model)
        configs.append(Config(('multimnist',), row, 'diverse_multimnist', multimnist.image_budget(), args, probe))
    # The CNN pools over positions before its classifier (translation-invariant by construction), the fully
    # connected CNN does not (Sabour et al.'s baseline, sized like the others), and the CapsNet trained three
    # times as long reaches the CNNs' translated accuracy: the gaps then compare routing, pooling and training.
    affine = CPU_RECIPES['affine_mnist']
    affine_input = affine.model_input()
    small_fc_stages = tuple((64,) + stage[1:] for stage in SMALL_CNN_STAGES)
    for kind, model, kwargs, epochs in (
        ('CapsNet', 'capsnet_matrix_multimnist', SMALL_MATRIX, 3),
        ('CapsNet, 9 epochs', 'capsnet_matrix_multimnist', SMALL_MATRIX, 9),
        ('CNN', 'cnn_baseline_multimnist', dict(stages=cnn_stages), 3),
        ('CNN, fully connected', 'cnn_fc_multimnist', dict(stages=small_fc_stages, head_hidden_size=16), 3),
    ):
        args = affine.argv(data_dir, epochs=epochs) + model_args(model, **kwargs, **affine_input)
        row = dict(kind=kind, model=model)
        configs.append(Config(('affine',), row, 'affine_mnist', affine.image_budget(epochs), args))
    return configs


def gpu_configs(data_dir: Path) -> List[Config]:
    """table1, iterations (t = 1..5 for IDA, DR and EM) and ablations on the full Fashion-MNIST (the gpu recipe)."""
    return fashion_configs('gpu', data_dir, (1, 2, 3, 4, 5))


def paper_configs(data_dir: Path) -> List[Config]:
    """The presets as they are; the iterations study is the CIFAR-10 ResNet sweep (Fig. 3)."""
    configs = []
    for data in ('cifar10', 'cifar100'):
        for backbone in ('simple', 'resnet'):
            sweep = (data, backbone) == ('cifar10', 'resnet')
            for kind, preset in (
                ('IDA', f'{data}_{backbone}'),
                ('DR', f'{data}_dynamic_{backbone}'),
                ('EM', f'{data}_em_{backbone}'),
            ):
                default_t = 2 if kind == 'IDA' else 3
                for t in (1, 2, 3, 4, 5) if sweep else (default_t,):
                    studies = (
                        (('iterations',) if sweep else ())
                        + (('table1',) if t == default_t else ())
                        + (('ablations',) if sweep and (kind, t) == ('IDA', 2) else ())
                    )
                    row = dict(kind=kind, model=PRESETS[preset]['model'], iterations=t, variant=FULL_ROUTING)
                    configs.append(Config(studies, row, data, 0, ['--preset', preset, '--iterations', str(t)]))
        for kind, preset in (('CNN', f'{data}_cnn'), ('ResNet-18', f'{data}_resnet18')):
            row = dict(kind=kind, model=PRESETS[preset]['model'])
            configs.append(Config(('table1',), row, data, 0, ['--preset', preset]))
    for variant, flags in ABLATIONS.items():
        row = dict(kind='IDA', model=PRESETS['cifar10_resnet']['model'], variant=variant, iterations=2)
        configs.append(Config(('ablations',), row, 'cifar10', 0, ['--preset', 'cifar10_resnet'] + flags))
    for kind, preset, probe in (
        ('matrix CapsNet', 'multimnist_matrix', True),
        ('vector CapsNet', 'multimnist_vector', True),
        ('CNN', 'multimnist_cnn', False),
        ('CNN, fully connected', 'multimnist_cnn_fc', False),
        ('DR vector CapsNet', 'multimnist_dynamic_vector', False),
    ):
        row = dict(kind=kind, model=PRESETS[preset]['model'])
        configs.append(Config(('multimnist',), row, 'diverse_multimnist', 0, ['--preset', preset], probe))
    for kind, model in (('CapsNet', 'capsnet_matrix_multimnist'), ('CNN', 'cnn_baseline_multimnist')):
        args = PAPER_AFFINE.argv(data_dir) + model_args(model, **PAPER_AFFINE.model_input())
        configs.append(
            Config(('affine',), dict(kind=kind, model=model), 'affine_mnist', PAPER_AFFINE.image_budget(), args)
        )
    return configs


def run_name(row: Dict[str, Any]) -> str:
    """'IDA-t2', 'IDA-t2-A' (ablation A), 'matrixCapsNet', ... for file names."""
    name = row['kind'] + (f'-t{row["iterations"]}' if 'iterations' in row else '')
    if row.get('variant', 'IDA (').startswith(('A:', 'B:', 'C:')):
        name += '-' + row['variant'][0]
    return ''.join(c for c in name if c.isalnum() or c in '-_')


def plan(
    scale: str, studies: Sequence[str], seeds: Sequence[int], data_dir: Path = DATA, extra_args: Sequence[str] = ()
) -> List[Run]:
    """The runs of ``studies`` at ``scale``, one per (configuration, seed); a configuration shared by several
    studies (e.g. IDA at t = 2: table1, iterations, ablations) is one run. A run's id names its dataset and row
    and hashes its arguments: another recipe is another run."""
    configs = {'cpu': cpu_configs, 'gpu': gpu_configs, 'paper': paper_configs}[scale](data_dir)
    runs = []
    for config in configs:
        if not set(config.studies) & set(studies):
            continue
        args = list(config.train_args) + list(extra_args)
        digest = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:8]
        prefix = f'{config.dataset}-{run_name(config.row)}-{digest}'
        for seed in seeds:
            runs.append(
                Run(
                    f'{prefix}-seed{seed}',
                    tuple(config.studies),
                    config.row,
                    config.dataset,
                    seed,
                    config.image_budget,
                    args,
                    config.probe,
                )
            )
    return runs
