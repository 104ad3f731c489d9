#!/usr/bin/env python
"""The paper's comparisons as one experiment runner: every run is one ``train_accelerate.main`` call (the
same training code path as the script, so ``accelerate launch`` spreads every study over many GPUs), and
every finished run is one JSON record. Finished runs are skipped, so a study goes on across sessions.

    python experiments.py table1 iterations --scale cpu     # run studies (all: every study)
    python experiments.py all --scale cpu --list             # the runs and their commands, nothing trained
    python experiments.py table1 iterations ablations --scale gpu --shard 0/4 --time-limit 300   # one GPU shard
    accelerate config                                        # once, on a machine with many GPUs; then
    accelerate launch experiments.py all --scale paper       # on all of them (docs/training.md: other launches)
    python experiments.py report --write docs/results.md     # tables and plots from the records

Studies: ``table1`` (routing kinds and CNN baselines: accuracy, parameters), ``iterations`` (accuracy vs
routing iterations per routing kind), ``ablations`` (A: no LayerNorm, B: sequential routing, C: EM-style
activations), ``multimnist`` (DiverseMultiMNIST exact match and the part-whole probe) and ``affine``
(train on translated digits, test on affinely transformed ones; Sabour et al. 2017).

Scales. ``paper``: the paper's recipes as they are (``timm_capsules.presets``: CIFAR-10/100 and the full
DiverseMultiMNIST, 350 epochs). ``cpu``: a reduced protocol for a 2-core machine with no network, described
in ``CPU_PROTOCOL`` and printed beside every result: real Fashion-MNIST (Debian's ``dataset-fashion-mnist``)
in place of CIFAR with a fixed image budget, DiverseMultiMNIST and Affine MNIST from the built-in MNIST
sample, small capsule and CNN models where the paper's would not fit; 3 seeds by default, as in docs/results.md.
``gpu``: ``table1``, ``iterations`` and ``ablations`` on the full Fashion-MNIST for one GPU (``GPU_PROTOCOL``), sized by
``gpu_estimate`` to about 6 minutes of an H200 over 4 shards (``benchmarks/gpu_check.sh full`` runs it); 2 seeds by
default there and at paper scale.
"""
import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent
STUDIES = ('table1', 'iterations', 'ablations', 'multimnist', 'affine')
RECORDS = ROOT / 'results'
DATA = Path('outputs') / 'experiments' / 'data'

CPU_PROTOCOL = {
    'fashion_mnist': 'Fashion-MNIST (real, 60k/10k, 28x28 grey; in place of CIFAR): the first 12,800 training '
                     'images, one epoch, batch 64, Adam 2e-3 with cosine decay, no augmentation; top-1 on all '
                     '10,000 test images; models built with in_chans=1, img_size=28',
    'diverse_multimnist': 'DiverseMultiMNIST from the built-in MNIST sample (4,000 train / 1,000 test digits): '
                          '8 epochs of 8,192 generated images, batch 32, Adam 2e-3 with cosine decay; exact match '
                          "on a fixed 2,000-image test set; small models (0.12-0.96M parameters; the paper's: 10-42M)",
    'affine_mnist': 'Affine MNIST from the built-in MNIST sample: 20,000 translated 40x40 training images, 3 '
                    'epochs, batch 32, Adam 2e-3 with cosine decay, no augmentation; top-1 on 5,000 translated '
                    'and 5,000 affinely transformed test images of the held-out digits; models about 0.13M '
                    'parameters',
}


# The GPU protocol (``--scale gpu``): the Fashion-MNIST studies at full size for one GPU, the budget sized by
# ``gpu_estimate`` from the models' training FLOPs and the throughputs in GPU_ASSUMPTIONS (see there).
GPU_EPOCHS = 2
GPU_LR = {'IDA': 2e-3, 'DR': 1e-3, 'EM': 2e-3, 'CNN': 2e-3, 'ResNet-18': 2e-3}
GPU_PROTOCOL = {
    'fashion_mnist': f'Fashion-MNIST (real, 60k/10k, 28x28 grey; in place of CIFAR): all 60,000 training images, '
                     f'{GPU_EPOCHS} epochs, batch 128, bf16 autocast, light augmentation (pad 4 + random crop + '
                     f'horizontal flip), Adam with cosine decay and no warm-up: lr {GPU_LR["DR"]:g} for DR '
                     f'(the paper\'s Adam rate for it), {GPU_LR["IDA"]:g} for IDA, EM and the CNNs (the CPU '
                     f'protocol\'s, which trained all of them; '
                     f'the paper\'s SGD 0.1 schedule is made for 350 epochs); top-1 on all 10,000 test images; '
                     f'models built with in_chans=1, img_size=28',
}
# What the GPU budget is sized with. First stated, before any GPU had run the studies: 50 TFLOP/s sustained over the
# shards for every FLOP, 2,000 augmented images/s per DataLoader worker (this project's 2-core CPU: 460 us a sample),
# 8 s a run: the 40 runs at 4.4 min over 4 shards. The first H200 call (results/gpu/, 2026-12-04; 4 shards side by
# side, 4 workers each on the machine's 16 cores) measured otherwise: data-bound runs (IDA t = 1, 2; DR) fed 3,300
# images/s a shard, 830 a worker, and the routing passes that need votes (the FLOPs a model has beyond its t = 1
# count), in plain tensor ops, are bound by the GPU's memory traffic: IDA t = 3 and t = 5 ran them at 0.57 and 0.66
# TFLOP/s over the shards, while the rest runs at the dense rate of ResNet-18's bf16 step in the speed harness
# (benchmarks/results/cuda_b128_eager.json: 426 GFLOP in 12 ms, 35 TFLOP/s). The figures below are those
# measurements, so the estimates and the time limit say what a call can finish.
GPU_ASSUMPTIONS = dict(dense_tflops=35.0, routing_tflops=0.6, images_per_s_per_worker=830.0, workers=4, shards=4,
                       overhead_s=4.0)


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


# ------------------------------------------------------------------------------------------------ studies
# cpu-scale models: (row name, timm model, create_model kwargs)
SMALL_MATRIX = dict(backbone_args={'out_chs': 64}, primary_caps=8, pose_dim=16, capsule_layers=[('conv', 8, 3, 1)])
SMALL_CNN_STAGES = ((80, 3, 2, 1, False, False), (80, 3, 2, 0, False, True), (80, 3, 1, 0, False, True))
ROUTING_MODELS = {'IDA': 'capsnet_simple_cifar10', 'DR': 'dynamic_capsnet_simple_cifar10',
                  'EM': 'em_capsnet_simple_cifar10'}
CNN_MODELS = {'CNN': 'cnn_baseline_cifar10', 'ResNet-18': 'resnet18_cifar10'}
ABLATIONS = {'A: no LayerNorm': ['--no-layer-norm'], 'B: sequential routing': ['--routing', 'sequential'],
             'C: EM-style activations': ['--activations']}


def model_args(model: str, **kwargs) -> List[str]:
    args = ['--model', model]
    for key, value in kwargs.items():
        args += ['--model-arg', f'{key}={value!r}']
    return args


def routing_run(kind: str, model: str, t: int):
    """The studies a routing model at t iterations serves, and its table row: every t is in ``iterations``, the
    kind's default t (IDA 2, DR and EM 3) in ``table1``, and IDA at t = 2 in ``ablations`` too (one run for all)."""
    default_t = 2 if kind == 'IDA' else 3
    studies = ('iterations',) + (('table1',) if t == default_t else ()) + (
        ('ablations',) if kind == 'IDA' and t == 2 else ())
    return studies, dict(kind=kind, model=model, iterations=t, variant='IDA (concurrent, LayerNorm)')


def cpu_runs(data_dir: Path) -> List[Run]:
    fashion = ['--dataset', f'hf:{data_dir / "fashion_mnist"}', '--train-split', 'train[:12800]', '--epochs', '1',
               '--batch-size', '64', '--opt', 'adam', '--lr', '2e-3', '--weight-decay', '0', '--sched', 'cosine',
               '--warmup-epochs', '0', '--augment', 'none']
    small = ['--batch-size', '32', '--opt', 'adam', '--lr', '2e-3', '--weight-decay', '0', '--sched', 'cosine',
             '--warmup-epochs', '0']
    multimnist = ['--dataset', 'diverse_multimnist', '--mnist-source', 'sample', '--epoch-size', '8192',
                  '--test-size', '2000', '--epochs', '8'] + small
    def affine(epochs):
        return ['--dataset', f'hf:{data_dir / "affine_mnist"}', '--train-split', 'train_translated', '--test-split',
                'test_affine', '--extra-test-split', 'test_translated', '--epochs', str(epochs),
                '--augment', 'none'] + small
    fashion_input = dict(in_chans=1, img_size=28)
    specs = []  # (studies, row, dataset, budget, arguments, probe)
    for kind, model in ROUTING_MODELS.items():
        for t in (1, 2, 3, 4):
            studies, row = routing_run(kind, model, t)
            specs.append((studies, row, 'fashion_mnist', 12800,
                          fashion + model_args(model, iterations=t, **fashion_input), False))
    for kind, model in CNN_MODELS.items():  # timm's ResNet takes any input size: no img_size argument
        model_input = fashion_input if kind == 'CNN' else dict(in_chans=1)
        specs.append((('table1',), dict(kind=kind, model=model), 'fashion_mnist', 12800,
                      fashion + model_args(model, **model_input), False))
    for variant, flags in ABLATIONS.items():
        specs.append((('ablations',), dict(kind='IDA', model=ROUTING_MODELS['IDA'], variant=variant, iterations=2),
                      'fashion_mnist', 12800,
                      fashion + model_args(ROUTING_MODELS['IDA'], **fashion_input) + flags, False))
    for kind, model, kwargs, probe in (
            ('matrix CapsNet', 'capsnet_matrix_multimnist', SMALL_MATRIX, True),
            ('vector CapsNet', 'capsnet_vector_multimnist', SMALL_MATRIX, True),
            ('CNN', 'cnn_baseline_multimnist', dict(stages=SMALL_CNN_STAGES + ((80, 1, 1, 0, False, False),)), False),
            ('CNN, fully connected', 'cnn_fc_multimnist', dict(stages=SMALL_CNN_STAGES, head_hidden_size=80), False)):
        specs.append((('multimnist',), dict(kind=kind, model=model), 'diverse_multimnist', 8 * 8192,
                      multimnist + model_args(model, **kwargs), probe))
    # The CNN pools over positions before its classifier (translation-invariant by construction), the fully
    # connected CNN does not (Sabour et al.'s baseline, sized like the others), and the CapsNet trained three
    # times as long reaches the CNNs' translated accuracy: the gaps then compare routing, pooling and training.
    small_fc_stages = tuple((64,) + stage[1:] for stage in SMALL_CNN_STAGES)
    for kind, model, kwargs, epochs in (
            ('CapsNet', 'capsnet_matrix_multimnist', dict(SMALL_MATRIX, img_size=40), 3),
            ('CapsNet, 9 epochs', 'capsnet_matrix_multimnist', dict(SMALL_MATRIX, img_size=40), 9),
            ('CNN', 'cnn_baseline_multimnist',
             dict(stages=SMALL_CNN_STAGES + ((80, 1, 1, 0, False, False),), img_size=40), 3),
            ('CNN, fully connected', 'cnn_fc_multimnist',
             dict(stages=small_fc_stages, head_hidden_size=16, img_size=40), 3)):
        specs.append((('affine',), dict(kind=kind, model=model), 'affine_mnist', epochs * 20000,
                      affine(epochs) + model_args(model, **kwargs), False))
    return specs


def gpu_runs(data_dir: Path) -> List[Run]:
    """table1, iterations (t = 1..5 for IDA, DR and EM) and ablations on the full Fashion-MNIST (GPU_PROTOCOL)."""
    def fashion(kind):
        return ['--dataset', f'hf:{data_dir / "fashion_mnist"}', '--epochs', str(GPU_EPOCHS), '--batch-size', '128',
                '--opt', 'adam', '--lr', str(GPU_LR[kind]), '--weight-decay', '0', '--sched', 'cosine',
                '--warmup-epochs', '0', '--augment', 'crop-flip', '--mixed-precision', 'bf16']
    fashion_input, budget = dict(in_chans=1, img_size=28), GPU_EPOCHS * 60000
    specs = []
    for kind, model in ROUTING_MODELS.items():
        for t in (1, 2, 3, 4, 5):
            studies, row = routing_run(kind, model, t)
            specs.append((studies, row, 'fashion_mnist', budget,
                          fashion(kind) + model_args(model, iterations=t, **fashion_input), False))
    for kind, model in CNN_MODELS.items():
        model_input = fashion_input if kind == 'CNN' else dict(in_chans=1)
        specs.append((('table1',), dict(kind=kind, model=model), 'fashion_mnist', budget,
                      fashion(kind) + model_args(model, **model_input), False))
    for variant, flags in ABLATIONS.items():
        specs.append((('ablations',), dict(kind='IDA', model=ROUTING_MODELS['IDA'], variant=variant, iterations=2),
                      'fashion_mnist', budget,
                      fashion('IDA') + model_args(ROUTING_MODELS['IDA'], **fashion_input) + flags, False))
    return specs


def paper_runs(data_dir: Path) -> List[Run]:
    from timm_capsules.presets import PRESETS
    specs = []
    for data in ('cifar10', 'cifar100'):
        for backbone in ('simple', 'resnet'):
            for kind, preset in (('IDA', f'{data}_{backbone}'), ('DR', f'{data}_dynamic_{backbone}'),
                                 ('EM', f'{data}_em_{backbone}')):
                default_t = 2 if kind == 'IDA' else 3
                for t in (1, 2, 3, 4, 5) if (data, backbone) == ('cifar10', 'resnet') else (default_t,):
                    studies = (('iterations',) if (data, backbone) == ('cifar10', 'resnet') else ()) + (
                        ('table1',) if t == default_t else ()) + (
                        ('ablations',) if (kind, data, backbone, t) == ('IDA', 'cifar10', 'resnet', 2) else ())
                    row = dict(kind=kind, model=PRESETS[preset]['model'], iterations=t,
                               variant='IDA (concurrent, LayerNorm)')
                    specs.append((studies, row, data, None, ['--preset', preset, '--iterations', str(t)], False))
        for kind, preset in (('CNN', f'{data}_cnn'), ('ResNet-18', f'{data}_resnet18')):
            specs.append((('table1',), dict(kind=kind, model=PRESETS[preset]['model']), data, None,
                          ['--preset', preset], False))
    for variant, flags in ABLATIONS.items():
        specs.append((('ablations',), dict(kind='IDA', model=PRESETS['cifar10_resnet']['model'], variant=variant,
                                            iterations=2), 'cifar10', None,
                      ['--preset', 'cifar10_resnet'] + flags, False))
    for kind, preset, probe in (('matrix CapsNet', 'multimnist_matrix', True),
                                ('vector CapsNet', 'multimnist_vector', True), ('CNN', 'multimnist_cnn', False),
                                ('CNN, fully connected', 'multimnist_cnn_fc', False),
                                ('DR vector CapsNet', 'multimnist_dynamic_vector', False)):
        specs.append((('multimnist',), dict(kind=kind, model=PRESETS[preset]['model']), 'diverse_multimnist', None,
                      ['--preset', preset], probe))
    affine = ['--dataset', f'hf:{data_dir / "affine_mnist_full"}', '--train-split', 'train_translated',
              '--test-split', 'test_affine', '--extra-test-split', 'test_translated', '--epochs', '50',
              '--batch-size', '128', '--opt', 'adam', '--lr', '1e-3', '--weight-decay', '0', '--sched', 'cosine',
              '--augment', 'none']
    for kind, model, kwargs in (('CapsNet', 'capsnet_matrix_multimnist', dict(img_size=40)),
                                ('CNN', 'cnn_baseline_multimnist', dict(img_size=40))):
        specs.append((('affine',), dict(kind=kind, model=model), 'affine_mnist', 50 * 60000,
                      affine + model_args(model, **kwargs), False))
    return specs


def run_name(row: Dict[str, Any]) -> str:
    """'IDA-t2', 'IDA-t2-A' (ablation A), 'matrixCapsNet', ... for file names."""
    name = row['kind'] + (f"-t{row['iterations']}" if 'iterations' in row else '')
    if row.get('variant', 'IDA (').startswith(('A:', 'B:', 'C:')):
        name += '-' + row['variant'][0]
    return ''.join(c for c in name if c.isalnum() or c in '-_')


def plan(scale: str, studies: Sequence[str], seeds: Sequence[int], data_dir: Path = DATA,
         extra_args: Sequence[str] = ()) -> List[Run]:
    """The runs of ``studies`` at ``scale``, one per (configuration, seed); a configuration shared by several
    studies (e.g. IDA at t = 2: table1, iterations, ablations) is one run."""
    specs = {'cpu': cpu_runs, 'gpu': gpu_runs, 'paper': paper_runs}[scale](data_dir)
    runs = []
    for run_studies, row, dataset, budget, args, probe in specs:
        if not set(run_studies) & set(studies):
            continue
        args = list(args) + list(extra_args)
        digest = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:8]
        name = run_name(row)
        for seed in seeds:
            runs.append(Run(f'{dataset}-{name}-{digest}-seed{seed}', tuple(run_studies), row, dataset, seed,
                            budget or 0, args, probe))
    return runs


# ---------------------------------------------------------------------------------------------------- data
def prepare_data(scale: str, runs: Sequence[Run], data_dir: Path) -> None:
    """Writes the image datasets the runs read (once): Fashion-MNIST and Affine MNIST as parquet folders."""
    needed = {run.dataset for run in runs}
    if 'fashion_mnist' in needed and not (data_dir / 'fashion_mnist' / 'data').is_dir():
        from timm_capsules.data.mnist import export_parquet
        print(f'writing Fashion-MNIST to {data_dir / "fashion_mnist"}', flush=True)
        export_parquet(data_dir / 'fashion_mnist', 'fashion_mnist')
    name = 'affine_mnist' if scale == 'cpu' else 'affine_mnist_full'
    if 'affine_mnist' in needed and not (data_dir / name / 'README.md').is_file():
        from timm_capsules.data.affine_mnist import export
        print(f'writing Affine MNIST to {data_dir / name}', flush=True)
        if scale == 'cpu':
            export(data_dir / name, train_size=20000, test_size=5000, source='sample')
        else:
            export(data_dir / name)


# ------------------------------------------------------------------------------------------------- running
def record_path(records: Path, scale: str, run: Run) -> Path:
    return records / scale / f'{run.run_id}.json'


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                   if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    gpu = f', {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''
    return f'{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}'


def commit() -> Optional[str]:
    if os.environ.get('TIMM_CAPSULES_COMMIT'):  # a copy of the tree without its .git (e.g. on a lent GPU machine)
        return os.environ['TIMM_CAPSULES_COMMIT']
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def probe(model, samples: int = 500) -> Dict[str, Any]:
    """The part-whole probe (``timm_capsules.parse_tree``) on two-digit DiverseMultiMNIST test images."""
    from timm_capsules.parse_tree import part_whole_probe
    from timm_capsules.parse_tree.inputs import diverse_multimnist_samples, prepare_arrays
    images, masks, labels, _, source = diverse_multimnist_samples(samples, source='sample', two_digit_only=True)
    x, masks = prepare_arrays(model, images, masks)
    result = part_whole_probe(model.eval(), x, masks, labels)
    return dict({k: v for k, v in result.items() if k != 'per_image'}, chance=0.5, source=source)


def execute(run: Run, scale: str, records: Path, outputs: Path, probe_samples: int,
            stop_after_steps: Optional[int] = None) -> Dict[str, Any]:
    import train_accelerate
    output_dir = outputs / scale / run.run_id
    argv = run.train_args + ['--seed', str(run.seed), '--output-dir', str(output_dir),
                             '--checkpointing-steps', 'epoch', '--resume-from-checkpoint', 'latest']
    argv += ['--stop-after-steps', str(stop_after_steps)] if stop_after_steps else []
    resumed = (output_dir / 'checkpoints').is_dir() and any((output_dir / 'checkpoints').iterdir())
    started = time.time()
    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState
    try:
        results = train_accelerate.main(argv)
        main_process = PartialState().is_main_process
    finally:  # the next run starts accelerate afresh (end_training may have ended the process group)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    model = results.pop('model_object')
    if results.get('stopped'):  # --stop-after-steps (a signal already ended the process above)
        raise SystemExit(3)
    if not main_process:
        return {}
    history = results.pop('history')
    record = dict(
        run_id=run.run_id, studies=list(run.studies), scale=scale, row=run.row, model=results['model'],
        model_kwargs=results['model_kwargs'], dataset=run.dataset, data_source=results['data_source'],
        seed=run.seed, image_budget=results['images_seen'], metric=results['metric'],
        metrics=dict(results['final'], **{f'{split}/{k}': v for split, m in results['extra_tests'].items()
                                          for k, v in m.items()}),
        chance_level=results['chance_level'], num_parameters=results['num_parameters'],
        training_time_s=results['training_time_s'], wall_time_s=time.time() - started, threads=torch.get_num_threads(),
        resumed_from_checkpoint=resumed,  # then the times cover the resumed part only
        eval_history=history['eval'], protocol=PROTOCOLS.get(scale, {}).get(run.dataset, 'paper recipe'),
        commit=commit(), machine=machine(),
        command='python train_accelerate.py ' + ' '.join(_quote(a) for a in run.train_args + ['--seed', str(run.seed)]),
        train_args=run.train_args)
    if scale == 'gpu':
        record['estimated_s'] = round(gpu_estimate(run), 1)  # what the budget was sized with, beside what it took
    if run.probe:
        record['part_whole_probe'] = probe(model, probe_samples)
    path = record_path(records, scale, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return record


PROTOCOLS = {'cpu': CPU_PROTOCOL, 'gpu': GPU_PROTOCOL}
_GFLOP_CACHE: Dict[str, float] = {}


def train_gflop_per_image(train_args: Sequence[str], **override) -> float:
    """Training GFLOP per 28x28 image (forward and backward, torch's FLOP counter) of a run's model, counted on the
    meta device: nothing is allocated, and routing runs in plain tensor ops (the fused kernels are the CPU's), as on
    a GPU."""
    key = json.dumps([list(train_args), override], sort_keys=True)
    if key not in _GFLOP_CACHE:
        import timm
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        import train_accelerate
        args = train_accelerate.parse_args(list(train_args))
        model = timm.create_model(args.model, device='meta', **dict(args.model_kwargs, num_classes=10, **override))
        images = torch.zeros(2, args.model_kwargs.get('in_chans', 3), 28, 28, device='meta')
        with FlopCounterMode(display=False) as counter:
            model(images).float().sum().backward()
        _GFLOP_CACHE[key] = counter.get_total_flops() / 2 / 1e9
    return _GFLOP_CACHE[key]


def gpu_estimate(run: Run, test_images: int = 10000) -> float:
    """Seconds one run takes on its shard under GPU_ASSUMPTIONS: the slower of its data (training images and one
    evaluation per epoch through the shard's DataLoader workers) and its GPU work (training FLOPs, evaluation at a
    third of them: the routing passes' share, those beyond the model's t = 1 count, at the routing rate, the rest at
    the dense rate, each the shard's share of the GPU), plus the fixed cost per run."""
    a = GPU_ASSUMPTIONS
    epochs = max(1, run.image_budget // 60000)
    images = run.image_budget + epochs * test_images / 3  # in training-step equivalents
    data_s = (run.image_budget + epochs * test_images) / (a['images_per_s_per_worker'] * a['workers'])
    total = train_gflop_per_image(run.train_args)
    dense = train_gflop_per_image(run.train_args, iterations=1) if 'iterations' in run.row else total
    seconds_per_image = (dense / a['dense_tflops'] + (total - dense) / a['routing_tflops']) / 1e3  # GFLOP / TFLOP/s
    gpu_s = images * seconds_per_image * a['shards']
    return max(data_s, gpu_s) + a['overhead_s']


def _quote(arg: str) -> str:
    return arg if all(c.isalnum() or c in '-_=.:/[]' for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


def run_studies(args) -> int:
    runs = plan(args.scale, args.studies, args.seeds, args.data_dir, args.train_args)
    if args.only:
        runs = [run for run in runs if any(word in run.run_id for word in args.only)]
    runs.sort(key=lambda run: run.seed)  # every configuration's first seed before any second: a cut-off call says most
    if args.shard:  # over all runs, not those left, so that shards started at slightly different times never overlap
        index, count = args.shard
        runs = runs[index::count]
    todo = [run for run in runs if read_record(record_path(args.records, args.scale, run))[0] is None]
    for path, problem in damaged_records(args.records, args.scale, runs).items():
        print(f'warning: {path}: damaged run record ({problem}): the run is run again', file=sys.stderr, flush=True)
    print(f'{len(runs)} runs in {", ".join(args.studies)} at scale {args.scale}'
          f'{" (shard %d/%d)" % args.shard if args.shard else ""}: {len(runs) - len(todo)} finished, '
          f'{len(todo)} to run', flush=True)
    if args.list:
        datasets = sorted({str(args.data_dir / name) for name in ('fashion_mnist', 'affine_mnist', 'affine_mnist_full')
                           if any(name in ' '.join(run.train_args) for run in runs)})
        if datasets:
            print(f"the commands below read {', '.join(datasets)}: experiments.py without --list writes "
                  f"{'it' if len(datasets) == 1 else 'them'} there first")
        for run in runs:
            done = 'done' if run not in todo else 'todo'
            estimate = f' [~{gpu_estimate(run):.0f} s]' if args.scale == 'gpu' else ''
            print(f'[{done}] {run.run_id} ({", ".join(run.studies)}){estimate}: python train_accelerate.py '
                  + ' '.join(_quote(a) for a in run.train_args + ['--seed', str(run.seed)]))
        if args.scale == 'gpu':
            total = sum(gpu_estimate(run) for run in todo)
            print(f'estimated GPU time of the {len(todo)} runs to do: {total / 60:.1f} min on one shard, '
                  f'{total / GPU_ASSUMPTIONS["shards"] / 60:.1f} min over {GPU_ASSUMPTIONS["shards"]} shards '
                  f'(assumptions: {GPU_ASSUMPTIONS})')
        return 0
    prepare_data(args.scale, todo, args.data_dir)
    if args.prepare:
        return 0
    failed, started = [], time.time()
    for index, run in enumerate(todo):
        needed = gpu_estimate(run) if args.scale == 'gpu' else 0.0
        if args.time_limit is not None and time.time() - started + needed > args.time_limit:
            print(f'== time limit: {len(todo) - index} runs left for a next call (a finished run is never rerun)',
                  flush=True)
            break
        print(f'== run {index + 1}/{len(todo)}: {run.run_id}', flush=True)
        try:
            record = execute(run, args.scale, args.records, args.outputs, args.probe_images, args.stop_after_steps)
        except SystemExit as error:  # train_accelerate's one-line errors: the other runs go on; a signal stops all
            if not isinstance(error.code, str) or len(todo) == 1:
                raise
            print(f'== {run.run_id} failed: {error}', flush=True)
            failed.append(run.run_id)
            continue
        if record:
            print(f"== {run.run_id}: {record['metric']} {record['metrics'][record['metric']]:.4f}, "
                  f"{record['training_time_s']:.0f} s", flush=True)
    if failed:
        raise SystemExit(f'{len(failed)} of {len(todo)} runs failed: {", ".join(failed)}')
    return 0


# -------------------------------------------------------------------------------------------------- report
BEGIN, END = '<!-- experiments:begin -->', '<!-- experiments:end -->'


def markers(scale: str):
    """The docs/results.md block a scale's report replaces: each scale has its own, so a GPU report never mixes with
    the CPU's."""
    return (BEGIN, END) if scale == 'cpu' else (f'<!-- experiments-{scale}:begin -->',
                                                f'<!-- experiments-{scale}:end -->')
CLAIMS = {
    'table1': 'IDA matches or beats the CNNs with far fewer parameters, and beats DR and EM (Table 1)',
    'iterations': "IDA's accuracy stays flat or rises with the routing iterations t, while DR and EM degrade "
                  '(Figs. 3-4)',
    'ablations': 'each part of the routing matters: LayerNorm (A), concurrent routing (B), no activations (C)',
    'multimnist': 'the CapsNets beat the CNN baselines on overlapping digits (Table 3); routing separates them',
    'affine': 'capsules generalise to unseen affine transforms (Sabour et al. 2017: 79% vs 66% on affNIST, '
              'both about 99% on the translated training distribution)',
}


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_record(path: Path) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(record, None) for a sound run record; (None, what is wrong) for a damaged one (truncated JSON, a
    missing field, a NaN or non-numeric metric): such a run is not done, and the report leaves it out."""
    try:
        record = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        return None, f'not readable JSON ({error})'
    if not isinstance(record, dict):
        return None, 'not a JSON object'
    for key, kind in (('run_id', str), ('metric', str), ('metrics', dict), ('model', str), ('machine', str)):
        if not isinstance(record.get(key), kind):
            return None, f'"{key}" must be a {kind.__name__}, got {record.get(key)!r}'
    if record['run_id'] != path.stem:
        return None, f'"run_id" is {record["run_id"]!r}, not the file\'s name'
    bad = {k: v for k, v in record['metrics'].items()  # a list: per-class values
           if not (_finite_number(v) or (isinstance(v, list) and all(_finite_number(x) for x in v)))}
    if bad:
        return None, f'metrics that are not finite numbers: {bad}'
    if not _finite_number(record['metrics'].get(record['metric'])):
        return None, f'its metric {record["metric"]!r} is not a number among its metrics'
    for key in ('num_parameters', 'wall_time_s'):
        if not _finite_number(record.get(key)) or record[key] < 0:
            return None, f'"{key}" must be a number >= 0, got {record.get(key)!r}'
    probe = record.get('part_whole_probe')
    if probe is not None and not (isinstance(probe, dict) and _finite_number(probe.get('own_fraction'))):
        return None, f'"part_whole_probe" has no numeric own_fraction: {probe!r}'
    return record, None


def damaged_records(records: Path, scale: str, runs: Sequence[Run]) -> Dict[str, str]:
    """{path: what is wrong} of the planned runs' records that exist but are damaged."""
    damaged = {}
    for run in runs:
        path = record_path(records, scale, run)
        if path.is_file():
            problem = read_record(path)[1]
            if problem:
                damaged[str(path)] = problem
    return damaged


def load_records(records: Path, scale: str, runs: Sequence[Run], warn: bool = True) -> Dict[str, Dict[str, Any]]:
    """The sound records of the planned runs (records of other configurations, e.g. an older protocol, are left
    out); a damaged one is named on stderr and skipped (the runner reruns it)."""
    found = {}
    for run in runs:
        path = record_path(records, scale, run)
        if path.is_file():
            record, problem = read_record(path)
            if record is not None:
                found[run.run_id] = record
            elif warn:
                print(f'warning: {path}: damaged run record, skipped (its run counts as not done): {problem}',
                      file=sys.stderr, flush=True)
    return found


def mean_std(values: Sequence[float]) -> str:
    """'83.1 ± 0.4 (2)' in % over seeds (sample std), '—' for none."""
    import statistics
    if not values:
        return '—'
    values = [100 * v for v in values]
    spread = f' ± {statistics.stdev(values):.1f}' if len(values) > 1 else ''
    return f'{statistics.mean(values):.1f}{spread} ({len(values)})'


def rows_of(study: str, runs: Sequence[Run], records: Dict[str, Dict[str, Any]]):
    """{row key: (row, [records over seeds])} for one study, in plan order."""
    grouped: Dict[str, Any] = {}
    for run in runs:
        if study in run.studies:
            key = json.dumps(run.row, sort_keys=True)
            grouped.setdefault(key, (run.row, []))[1].extend([records[run.run_id]] if run.run_id in records else [])
    return list(grouped.values())


def metric_values(found: Sequence[Dict[str, Any]], name: Optional[str] = None) -> List[float]:
    return [r['metrics'][name or r['metric']] for r in found if (name or r['metric']) in r['metrics']]


def params(found: Sequence[Dict[str, Any]]) -> str:
    return f"{found[0]['num_parameters']:,}" if found else '—'


def study_table(study: str, runs: Sequence[Run], records: Dict[str, Dict[str, Any]]) -> List[str]:
    rows = rows_of(study, runs, records)
    if study == 'table1':
        lines = ['| model | routing | parameters | top-1 (%), mean ± std (seeds) |', '|---|---|---:|---|']
        lines += [f"| `{row['model']}` | {row['kind']}{' t = %d' % row['iterations'] if 'iterations' in row else ''} "
                  f'| {params(found)} | {mean_std(metric_values(found))} |' for row, found in rows]
    elif study == 'iterations':
        ts = sorted({row['iterations'] for row, _ in rows})
        lines = ['| routing | ' + ' | '.join(f't = {t}' for t in ts) + ' |', '|---|' + '---|' * len(ts)]
        for kind in dict.fromkeys(row['kind'] for row, _ in rows):
            cells = {row['iterations']: mean_std(metric_values(found)) for row, found in rows if row['kind'] == kind}
            lines.append(f'| {kind} | ' + ' | '.join(cells.get(t, '—') for t in ts) + ' |')
    elif study == 'ablations':
        lines = ['| variant (IDA, t = 2) | top-1 (%) |', '|---|---|']
        lines += [f"| {row['variant']} | {mean_std(metric_values(found))} |" for row, found in rows]
    elif study == 'multimnist':
        lines = ['| model | parameters | exact match (%) | part-whole probe: own fraction (chance 0.5) |',
                 '|---|---:|---|---|']
        for row, found in rows:
            probes = [r['part_whole_probe']['own_fraction'] for r in found if 'part_whole_probe' in r]
            probe_cell = ' / '.join(f'{v:.3f}' for v in probes) if probes else '—'
            lines.append(f"| {row['kind']} (`{row['model']}`) | {params(found)} | {mean_std(metric_values(found))} "
                         f'| {probe_cell} |')
    else:  # affine
        lines = ['| model | parameters | translated test (%) | affine test (%) | gap (points) |',
                 '|---|---:|---|---|---|']
        for row, found in rows:
            translated, affine = metric_values(found, 'test_translated/top1'), metric_values(found)
            gap = [t - a for t, a in zip(translated, affine)]
            lines.append(f"| {row['kind']} (`{row['model']}`) | {params(found)} | {mean_std(translated)} "
                         f'| {mean_std(affine)} | {mean_std(gap)} |')
    return lines


def _mean(found: Sequence[Dict[str, Any]], name: Optional[str] = None) -> Optional[float]:
    values = metric_values(found, name)
    return 100 * sum(values) / len(values) if values else None


# ---- differences over seeds: 95% Welch confidence intervals
# a clause of the verdicts claims a difference (one of these words) only when its interval excludes zero
CLAIM_WORDS = ('beats', 'trails', 'better', 'worse', 'costs', 'adds', 'rises', 'falls', 'wider', 'narrower')


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (continued fraction, Numerical Recipes' betacf)."""
    import math
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    c, d, f = 1.0, 1.0 - (a + b) * x / (a + 1), 0.0
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    f = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + numerator / c
            c = c if abs(c) > 1e-300 else 1e-300
            f *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * f


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 0.5) of Student's t distribution with ``df`` (real, > 0) degrees of freedom."""
    def upper_tail(t):  # P(T > t) for t >= 0
        return 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))
    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if upper_tail(middle) > 1 - p else (low, middle)
    return (low + high) / 2


class Difference(NamedTuple):
    """mean(a) - mean(b) in points, with its 95% confidence interval over seeds."""
    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:+.1f} [{self.low:+.1f}, {self.high:+.1f}]{'*' if self.excludes_zero else ''}"


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[Difference]:
    """mean(a) - mean(b) (fractions in, points out) with Welch's 95% interval (unequal variances,
    Welch-Satterthwaite degrees of freedom); None unless both have 2 values or more. With b empty: the mean of a
    with its one-sample t interval (for paired differences, e.g. a gap per seed)."""
    import statistics
    if len(a) < 2 or (b and len(b) < 2):
        return None
    a = [100 * v for v in a]
    b = [100 * v for v in b]
    parts = [statistics.variance(x) / len(x) for x in (a, b) if x]
    se2 = sum(parts)
    value = statistics.mean(a) - (statistics.mean(b) if b else 0.0)
    if se2 == 0:
        return Difference(value, value, value)
    df = se2 ** 2 / sum(part ** 2 / (len(x) - 1) for part, x in zip(parts, [x for x in (a, b) if x]))
    half = t_quantile(0.975, df) * se2 ** 0.5
    return Difference(value, value - half, value + half)


def claim(d: Optional[Difference], subject: str, positive: str, negative: str, other: str = '') -> str:
    """'<d>: <subject> <positive|negative> <other>' when the interval excludes zero, else says that it does not."""
    if d is None:
        return 'n/a (fewer than 2 seeds)'
    if not d.excludes_zero:
        return f'{d}: not distinguishable from 0'
    return f"{d}: {subject} {positive if d.value > 0 else negative}{' ' + other if other else ''}"


INTERVALS = 'points, 95% Welch interval over seeds in brackets, * where it excludes 0'


def verdict(study: str, runs: Sequence[Run], records: Dict[str, Dict[str, Any]]) -> str:
    """What the table says about the claim, computed from the same records: every difference of seed means with its
    95% Welch interval; a clause claims a difference only when its interval excludes zero. '' while the runs it
    needs are missing."""
    rows = rows_of(study, runs, records)
    if study == 'table1':
        ida = next((found for row, found in rows if row['kind'] == 'IDA'), [])
        others = [f"{row['kind']} " + claim(welch(metric_values(ida), metric_values(found)), 'IDA', 'beats',
                                             'trails', row['kind'])
                  for row, found in rows if row['kind'] != 'IDA' and found]
        return f"IDA minus each other model ({INTERVALS}): {'; '.join(others)}." if ida and others else ''
    if study == 'iterations':
        steps = []
        for kind in dict.fromkeys(row['kind'] for row, _ in rows):
            points = sorted(((row['iterations'], found) for row, found in rows if row['kind'] == kind and found),
                            key=lambda point: point[0])
            for (t0, a), (t1, b) in zip(points, points[1:]):
                steps.append(f'{kind} t = {t0} to {t1} ' + claim(welch(metric_values(b), metric_values(a)), kind,
                                                                 'rises', 'falls'))
            if len(points) > 2:
                (t0, a), (t1, b) = points[0], points[-1]
                steps.append(f'{kind} t = {t0} to {t1} ' + claim(welch(metric_values(b), metric_values(a)), kind,
                                                                 'rises', 'falls'))
        return f"Change of top-1 with the routing iterations ({INTERVALS}): {'; '.join(steps)}." if steps else ''
    if study == 'ablations':
        base = rows[0][1] if rows else []
        changes = [f"{row['variant'].split(':')[0]} " + claim(welch(metric_values(found), metric_values(base)),
                                                             'the ablation', 'adds', 'costs', 'accuracy')
                   for row, found in rows[1:] if found]
        return (f"Each ablation minus the full routing ({INTERVALS}): {'; '.join(changes)}."
                if base and changes else '')
    if study == 'multimnist':
        caps = [(row['kind'], found) for row, found in rows if 'CapsNet' in row['kind'] and found]
        cnns = [(row['kind'], found) for row, found in rows if 'CNN' in row['kind'] and found]
        pairs = [f'{c} minus {n} ' + claim(welch(metric_values(a), metric_values(b)), f'the {c}', 'beats', 'trails',
                                          f'the {n}')
                 for c, a in caps for n, b in cnns]
        return f"Exact match, each CapsNet minus each CNN ({INTERVALS}): {'; '.join(pairs)}." if pairs else ''
    found_rows = [(row['kind'], found) for row, found in rows_of('affine', runs, records) if found]
    if len(found_rows) < 2:
        return ''

    def gap(found):
        return [t - a for t, a in zip(metric_values(found, 'test_translated/top1'), metric_values(found))]
    (first, a), (second, b) = found_rows[:2]
    parts = [f'{kind} gap (translated minus affine test, per seed) {welch(gap(found), [])}'
             for kind, found in found_rows]
    parts.append(f'{first} minus {second} on the translated test '
                 + claim(welch(metric_values(a, 'test_translated/top1'), metric_values(b, 'test_translated/top1')),
                         f'the {first}', 'beats', 'trails', f'the {second} on its own training distribution'))
    parts.append(f'{first} gap minus {second} gap '
                 + claim(welch(gap(a), gap(b)), f"the {first}'s gap is", 'wider', 'narrower', f"than the {second}'s"))
    return f"Affine generalisation ({INTERVALS}): {'; '.join(parts)}."


def _setup(runs: Sequence[Run], records: Dict[str, Dict[str, Any]], study: str) -> str:
    """'<dataset>, <budget> training images, <n> seeds' of a study's records, for plot titles."""
    found = [records[run.run_id] for run in runs if study in run.studies and run.run_id in records]
    datasets = sorted({r['dataset'] for r in found})
    budgets = sorted({r['image_budget'] for r in found})
    seeds = sorted({len([r for r in found if r['run_id'].rsplit('-seed', 1)[0] == key])
                    for key in {r['run_id'].rsplit('-seed', 1)[0] for r in found}})
    return (f"{', '.join(datasets)}, {' / '.join(f'{b:,}' for b in budgets)} training images, "
            f"{'-'.join(map(str, sorted({seeds[0], seeds[-1]})))} seeds")


ERROR_BARS = 'error bars: ± sample std over seeds, as in the table'


def plot_iterations(runs: Sequence[Run], records: Dict[str, Dict[str, Any]], path: Path) -> Optional[Path]:
    """Accuracy vs routing iterations, one line per routing kind (mean ± sample std over seeds, as the table):
    Fig. 3's shape."""
    import statistics
    rows = rows_of('iterations', runs, records)
    if not any(found for _, found in rows):
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for kind in dict.fromkeys(row['kind'] for row, _ in rows):
        points = [(row['iterations'], [100 * v for v in metric_values(found)]) for row, found in rows
                  if row['kind'] == kind and found]
        if points:
            ts, values = zip(*points)
            means = [statistics.mean(v) for v in values]
            spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(ts, means, yerr=spread, marker='o', capsize=3, label=kind)
    ax.set(xlabel='routing iterations t', ylabel='test top-1 (%)', xticks=sorted({r['iterations'] for r, _ in rows}))
    ax.set_title(f"accuracy vs routing iterations\n{_setup(runs, records, 'iterations')}\n{ERROR_BARS}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_affine(runs: Sequence[Run], records: Dict[str, Dict[str, Any]], path: Path) -> Optional[Path]:
    """Translated vs affine test accuracy per model (mean ± sample std over seeds, as the table): the
    generalisation gap. The legend sits above the bars."""
    import statistics
    rows = [(row, found) for row, found in rows_of('affine', runs, records) if found]
    if not rows:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    width = 0.38
    for offset, (name, metric) in zip((-width / 2, width / 2), (('translated', 'test_translated/top1'),
                                                                 ('affine', None))):
        values = [[100 * v for v in metric_values(found, metric)] for _, found in rows]
        means = [statistics.mean(v) for v in values]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        bars = ax.bar([i + offset for i in range(len(rows))], means, width, yerr=spread, capsize=3,
                      label=f'{name} test')
        ax.bar_label(bars, fmt='%.1f', fontsize=8, padding=3)
    ax.set(xticks=range(len(rows)), xticklabels=[row['kind'] for row, _ in rows], ylabel='test top-1 (%)',
           ylim=(0, 130), yticks=range(0, 101, 20))
    ax.set_title(f"trained on translated digits\n{_setup(runs, records, 'affine')}\n{ERROR_BARS}", fontsize=9)
    ax.legend(loc='upper center', ncol=2)  # above the bars: they end below 105 of 130
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def render_report(scale: str, records_dir: Path, plots_dir: Path, link_base: Path = ROOT, data_dir: Path = DATA,
                  train_args: Sequence[str] = ()) -> str:
    """The results of docs/results.md (Markdown) for one scale, with its plots written to ``plots_dir`` and linked
    relative to ``link_base`` (the folder of the file it goes into)."""
    runs = plan(scale, STUDIES, range(100), data_dir, train_args)
    records = load_records(records_dir, scale, runs)
    lines = [f'Generated by `python experiments.py report --scale {scale}` from the {len(records)} run records in '
             f'`{records_dir.name}/{scale}/` (one JSON per run: model, arguments, dataset, seed, image budget, '
             f'metrics, wall time, commit, machine, command). Mean ± sample std over seeds, seed count in '
             f'brackets; — : not run yet. Below each table, every difference it is read by, with its 95% Welch '
             f'confidence interval over seeds; only a difference whose interval excludes 0 (marked *) is called one '
             f'(beats, trails, costs, rises, falls ...). The plots show the same mean ± sample std as the tables.']
    if records:
        machines = sorted({r['machine'] for r in records.values()})
        lines.append(f"Machine: {'; '.join(machines)}. Wall time of all runs: "
                     f"{sum(r['wall_time_s'] for r in records.values()) / 3600:.1f} h ("
                     + ('on a machine shared with other work' if scale != 'gpu' else 'shards side by side on one GPU')
                     + ': not a speed figure; see Performance).')
        if scale == 'gpu':  # the budget's estimates beside what the runs took
            done = [run for run in runs if run.run_id in records]
            left = [run for run in runs if run.run_id not in records and run.seed < 2]
            lines.append(
                f"Run time of these runs: estimated {sum(r.get('estimated_s', 0) for r in records.values()) / 60:.1f} "
                f'min when they were started (each record\'s `estimated_s`), taken '
                f"{sum(r['wall_time_s'] for r in records.values()) / 60:.1f} min; today's `GPU_ASSUMPTIONS` "
                f'(measured on them) estimate {sum(map(gpu_estimate, done)) / 60:.1f} min for them and '
                f'{sum(map(gpu_estimate, left)) / 60:.1f} min for the {len(left)} runs of 2 seeds left '
                f"({sum(map(gpu_estimate, left)) / 60 / GPU_ASSUMPTIONS['shards']:.1f} min over "
                f"{GPU_ASSUMPTIONS['shards']} shards).")
    for study in STUDIES:
        if not any(study in run.studies for run in runs):  # the gpu scale runs three of the studies
            continue
        datasets = sorted({run.dataset for run in runs if study in run.studies})
        protocol = (' '.join(PROTOCOLS[scale][d] + '.' for d in datasets) if scale in PROTOCOLS
                    else "the paper's recipe.")
        lines += ['', f'**{study}** — claim: {CLAIMS[study]}. Protocol: {protocol}', '']
        lines += study_table(study, runs, records)
        summary = verdict(study, runs, records)
        lines += ['', summary] if summary else []
        plot = {'iterations': plot_iterations, 'affine': plot_affine}.get(study)
        if plot and plot(runs, records, plots_dir / f'{study}_{scale}.png'):
            link = Path(os.path.relpath(plots_dir / f'{study}_{scale}.png', link_base)).as_posix()
            lines += ['', f'![{study}]({link})']
    return '\n'.join(lines) + '\n'


def record_hub_results(records_dir: Path, scale: str = 'paper', train_args: Sequence[str] = ()) -> List[str]:
    """Writes the per-seed accuracies of runs that trained a hub config's model as registered (only its
    preset's iterations, no other create_model argument) on that config's dataset into the config, through
    ``hub.record_results``. Returns the tags written."""
    from timm_capsules import hub
    runs = plan(scale, STUDIES, range(100), DATA, train_args)
    records = load_records(records_dir, scale, runs)
    written = []
    for cfg in hub.list_hub_configs():
        # the runs' dataset name: the config's eval_id, else its tag's suffix ('capsnet_resnet_cifar10.cifar10')
        dataset = cfg['dataset'].get('eval_id', cfg['tag'].partition('.')[2])
        matching = [r for r in records.values()
                    if r['model'] == cfg['model'] and r['dataset'] == dataset
                    and set(r['model_kwargs']) <= {'num_classes', 'iterations'}
                    and r['model_kwargs'].get('iterations', cfg['architecture']['routing_iterations'])
                    == cfg['architecture']['routing_iterations']]
        if matching:
            by_seed = sorted(matching, key=lambda r: r['seed'])
            hub.record_results(cfg['tag'], [100 * r['metrics'][r['metric']] for r in by_seed])
            written.append(cfg['tag'])
    return written


def report_main(argv: Sequence[str], train_args: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog='experiments.py report', description='tables and plots from the run records')
    parser.add_argument('--scale', choices=['cpu', 'gpu', 'paper'], default='cpu')
    parser.add_argument('--records', type=Path, default=RECORDS)
    parser.add_argument('--plots', type=Path, default=RECORDS / 'plots', help='where the PNG plots go')
    parser.add_argument('--write', type=Path, metavar='docs/results.md',
                        help=f'replace the text between {BEGIN} and {END} (gpu: experiments-gpu) in this file '
                             f'(else print it)')
    parser.add_argument('--data-dir', type=Path, default=DATA, help="the runs' --data-dir (part of their ids)")
    parser.add_argument('--record-hub', action='store_true',
                        help="fill the hub configs' measured results from matching runs (paper scale)")
    args = parser.parse_args(argv)
    begin, end = markers(args.scale)
    readme = None if args.write is None else args.write.read_text()
    if readme is not None and (begin not in readme or end not in readme):  # before any plot is written
        raise SystemExit(f'{args.write} has no {begin} ... {end} block to replace')
    if readme is not None:  # never replace results with an empty report
        folder = args.records / args.scale
        if not folder.is_dir():
            raise SystemExit(f'{folder}: no such records folder; {args.write} left as it is')
        runs = plan(args.scale, STUDIES, range(100), args.data_dir, train_args)
        if not load_records(args.records, args.scale, runs, warn=False):
            raise SystemExit(f'{folder}: no sound run record of this scale; {args.write} left as it is')
    target = args.write or ROOT / 'docs' / 'results.md'  # the plots are linked relative to its folder
    text = render_report(args.scale, args.records, args.plots, target.resolve().parent,
                         data_dir=args.data_dir, train_args=train_args)
    if args.record_hub:
        tags = record_hub_results(args.records, args.scale, train_args)
        print(f"hub configs updated: {', '.join(tags) if tags else 'none (no run trained a hub model as registered)'}")
    if readme is None:
        print(text)
        return 0
    head, rest = readme.split(begin, 1)
    args.write.write_text(head + begin + '\n' + text + end + rest.split(end, 1)[1])
    print(f'wrote the {args.scale} results into {args.write}')
    return 0


# -------------------------------------------------------------------------------------------------- main
def shard(text: str):
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split('/'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not I/N (e.g. 0/4)') from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f'shard {text}: I must be in 0..N-1')
    return index, count


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if '--' in argv:  # everything after -- goes to every train_accelerate.py call (and is part of the runs' ids)
        argv, train_args = argv[:argv.index('--')], argv[argv.index('--') + 1:]
    if argv[:1] == ['report']:
        return report_main(argv[1:], train_args)
    parser = argparse.ArgumentParser(prog='experiments.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('studies', nargs='+', choices=STUDIES + ('all',), metavar='STUDY',
                        help=f'{", ".join(STUDIES)} or all ("report" instead: tables and plots, see report --help)')
    parser.add_argument('--scale', choices=['cpu', 'gpu', 'paper'], default='cpu',
                        help='reduced CPU protocol, the Fashion-MNIST studies for one GPU, or the paper')
    parser.add_argument('--seeds', type=int, help="seeds per configuration (0, 1, ...; default 3 at cpu scale, as the "
                        "tables of docs/results.md, else 2)")
    parser.add_argument('--only', nargs='+', metavar='WORD', help='only runs whose id contains one of these')
    parser.add_argument('--list', action='store_true', help='list the runs and their commands, run nothing')
    parser.add_argument('--records', type=Path, default=RECORDS, help='where run records go (one JSON per run)')
    parser.add_argument('--outputs', type=Path, default=Path('outputs') / 'experiments',
                        help='checkpoints and trained models of the runs')
    parser.add_argument('--data-dir', type=Path, default=DATA, help='where the exported datasets go')
    parser.add_argument('--stop-after-steps', type=int, metavar='N',
                        help='debug: stop each run after N optimizer steps as if killed (a rerun continues it)')
    parser.add_argument('--probe-images', type=int, default=500, help='two-digit images for the part-whole probe')
    parser.add_argument('--shard', type=shard, metavar='I/N', help='only every N-th run to do, from the I-th '
                        '(shards started side by side share one GPU)')
    parser.add_argument('--time-limit', type=float, metavar='SECONDS',
                        help='start no run that would end past this many seconds (gpu scale: by gpu_estimate)')
    parser.add_argument('--prepare', action='store_true', help='write the datasets the runs need, train nothing')
    args = parser.parse_args(argv)
    args.studies = list(STUDIES) if 'all' in args.studies else args.studies
    seeds = args.seeds if args.seeds is not None else (3 if args.scale == 'cpu' else 2)
    args.seeds, args.train_args = list(range(seeds)), train_args
    return run_studies(args)


if __name__ == '__main__':
    sys.exit(main())
