#!/usr/bin/env python
"""Train and evaluate the capsule networks of *Capsules with Inverted Dot-Product Attention Routing*
(Tsai et al., ICLR 2020) with Hugging Face Accelerate, from one CPU to many GPUs.

    python train_accelerate.py                                       # quick DiverseMultiMNIST run, CPU-sized
    python train_accelerate.py --preset cifar10_resnet               # a paper recipe (timm_capsules/presets.py)
    accelerate config                                                # once, on a machine with many GPUs; then
    accelerate launch train_accelerate.py --preset multimnist_matrix  # on all of them (README: other launches)

Explicit arguments override a preset. Every option is spelled with dashes or underscores
(``--batch-size`` == ``--batch_size``). The file reads top to bottom: arguments, data, model, evaluation,
checkpoints, outputs, then ``main``: data -> model -> optimizer/scheduler -> loop -> evaluation -> saving.
"""
import argparse
import ast
import collections
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from accelerate.utils import load as load_plain_data  # torch.load(weights_only=True) with numpy's RNG types allowed
from safetensors import safe_open
from tqdm.auto import tqdm

import timm
import timm_capsules  # noqa: F401  (registers the capsule models with timm)
from timm_capsules import hub
from timm_capsules.em_capsnet import EMCapsNet
from timm_capsules.loading import NonFiniteWeightsWarning, non_finite_tensors
from timm_capsules.routing import routing_kernel, use_fused_routing
from timm_capsules.routing_baselines import em_routing_kernel
from timm_capsules.losses import classification_loss, predicted_present
from timm_capsules.base import model_data_config
from timm_capsules.data.cifar import KNOWN_DATASETS
from timm_capsules.presets import PRESETS, QUICK, get_preset
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

PROG = 'train_accelerate.py'
MULTIMNIST_NAMES = ('diverse_multimnist', 'multimnist')
# create_model arguments that are names, so --model-arg takes them as bare words (backbone=resnet18)
STRING_MODEL_ARGS = ('backbone', 'routing', 'global_pool')


# -------------------------------------------------------------------------------------------- arguments
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' where there is a value to show; an option without one says in its help what
    leaving it out means."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS
        if unset or '%(default)' in action.help or not action.option_strings:
            return action.help
        return action.help + ' (default: %(default)s)'


def fail(message):
    """Stop with one clear line (exit status 1)."""
    raise SystemExit(f"{PROG}: error: {' '.join(str(message).split())}")


def number(kind, minimum=None, above=None, maximum=None):
    """An argparse type: a finite int/float, >= minimum or > above, <= maximum (argparse names the option)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}')
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'must be a finite number, got {text}')
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f'must be >= {minimum}, got {text}')
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f'must be > {above}, got {text}')
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f'must be <= {maximum}, got {text}')
        return value
    return parse


def steps_or_epoch(text):
    if text == 'epoch' or (text.isdigit() and int(text) >= 1):
        return text if text == 'epoch' else int(text)
    raise argparse.ArgumentTypeError(f"must be a number of steps (>= 1) or 'epoch', got {text!r}")


def parse_key_values(items):
    """['a=1', "b={'x': 2}", 'backbone=resnet18'] -> {'a': 1, 'b': {'x': 2}, 'backbone': 'resnet18'}: values
    are Python literals (ast.literal_eval); only the name arguments (STRING_MODEL_ARGS) take bare words."""
    result = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            fail(f'model argument {item!r} is not key=value')
        try:
            result[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if key not in STRING_MODEL_ARGS:
                fail(f"model argument {item!r}: {value!r} is not a Python literal (quote a string: {key}='{value}')")
            result[key] = value
    return result


def presets_epilog():
    width = max(map(len, PRESETS))
    lines = [f'  {name:<{width}}  {p["model"]} on {p["dataset"]}, {p["opt"]} lr {p["lr"]}, batch {p["batch_size"]}, '
             f'{p["epochs"]} epochs' for name, p in sorted(PRESETS.items())]
    return ('presets (--preset NAME; --preset NAME --print-config shows everything it sets):\n' + '\n'.join(lines)
            + '\nwithout --preset: the quick CPU run, whose values are the defaults shown above.')


def build_parser():
    parser = Parser(prog=PROG, description=__doc__.split('\n\n')[0], allow_abbrev=False,
                    formatter_class=HelpFormatter, epilog=presets_epilog())
    positive_int, count, positive = number(int, minimum=1), number(int, minimum=0), number(float, above=0)
    non_negative = number(float, minimum=0)
    seed = number(int, minimum=0, maximum=2 ** 32 - 1)  # numpy's and the DataLoader's seed range

    def adder(group):
        def add(name, **kwargs):  # --some-name and --some_name
            names = [f'--{name}'] + ([f"--{name.replace('-', '_')}"] if '-' in name else [])
            group.add_argument(*names, **kwargs)
        return add

    add = adder(parser.add_argument_group('preset'))
    add('preset', choices=sorted(PRESETS), metavar='NAME',
        help='a recipe of the paper (listed below); explicit arguments override its values')
    add('print-config', action='store_true', help='print the resolved configuration (preset + arguments) and exit')

    add = adder(parser.add_argument_group('model'))
    add('model', help='any timm model name (capsnet_*), or local-dir:<dir> / hf-hub:<id>')
    add('model-kwargs', dest='model_kwargs_cli', nargs='+', default=[], metavar='KEY=VALUE',
        help=f'timm.create_model kwargs, values Python literals (e.g. iterations=3 "backbone_args={{\'out_chs\': 64}}"); '
             f'bare words only for {", ".join(STRING_MODEL_ARGS)}. Default: a preset\'s own for its model; without a preset, '
             f'{QUICK["model_kwargs"]} for {QUICK["model"]} (the quick run\'s small CapsNet)'.replace('%', '%%'))
    add('model-arg', dest='model_arg_cli', action='append', default=[], metavar='KEY=VALUE',
        help='one create_model kwarg, as --model-kwargs (repeatable)')
    add('pretrained', action='store_true', help="start from the model's pretrained weights (default: random init)")
    add('iterations', type=positive_int, help="routing iterations (default: the model's, 2)")
    add('routing', choices=['concurrent', 'sequential'], help="routing schedule; sequential is ablation B "
                                                              "(default: the model's, concurrent)")
    add('no-layer-norm', dest='layer_norm', action='store_const', const=False, help='drop LayerNorm (ablation A)')
    add('activations', action='store_const', const=True, help='EM-style capsule activations (ablation C)')

    add = adder(parser.add_argument_group('data'))
    add('dataset', help='diverse_multimnist | cifar10 | cifar100 | hf:<Hub id or local folder>')
    add('data-dir', help='local copy of cifar10/cifar100: save_to_disk, parquet or imagefolder folder '
                         '(default: download from the Hub)')
    add('image-column', help='image column (default: cifar img, hf: image)')
    add('label-column', help='label column (default: cifar10 label, cifar100 fine_label, hf: label)')
    add('train-split', default='train', help='training split (datasets slicing works: train[:90%%])')
    add('test-split', default='test', help='evaluation split')
    add('extra-test-split', dest='extra_test_splits', action='append', default=[], metavar='SPLIT',
        help='another split the final model is evaluated on (repeatable; metrics.json: extra_tests)')
    add('augment', choices=['crop-flip', 'crop', 'none'], default='crop-flip',
        help='training augmentation of image datasets: pad 4 + random crop (+ horizontal flip: the paper\'s CIFAR '
             'recipe); none for data whose flips change the class (digits)')
    add('resize', action='store_true', help="resize images to the model's input size (default: refuse other sizes)")
    add('mnist-source', default='auto',
        help='MNIST digits of DiverseMultiMNIST: auto (Hub when reachable, else the built-in sample) | sample | hub '
             '| fashion_mnist | IDX folder')
    add('epoch-size', type=positive_int, help='DiverseMultiMNIST images per epoch (generated on the fly)')
    add('test-size', type=number(int, minimum=1, maximum=10 ** 6), help='DiverseMultiMNIST fixed test images '
        '(generated up front, at most 1,000,000)')
    add('data-seed', type=seed, default=0, help='seed of the DiverseMultiMNIST test set')
    add('num-workers', type=count, help='DataLoader workers (default: 4 with CUDA, else 0)')

    add = adder(parser.add_argument_group('optimisation'))
    add('opt', help='timm optimizer name (sgd, adam, adamw, ...)')
    add('lr', type=positive, help='learning rate')
    add('momentum', type=non_negative, help='SGD momentum')
    add('weight-decay', type=non_negative, help='weight decay')
    add('batch-size', type=positive_int, help='images per process and step')
    add('eval-batch-size', type=positive_int, help='images per process in evaluation (default: 2 x batch size)')
    add('epochs', type=positive_int, help='epochs')
    add('max-train-steps', type=positive_int, help='optimizer steps in all; overrides --epochs (default: from --epochs)')
    add('sched', help='timm scheduler: multistep | cosine | step | ... | none')
    add('decay-milestones', type=count, nargs='*', help='multistep: epochs at which lr *= decay-rate')
    add('decay-rate', type=positive, help='multistep/step: lr factor at each milestone')
    add('warmup-epochs', type=count, help='epochs of linear lr warm-up')
    add('clip-grad', type=positive, help='clip the gradient norm to this value (default: no clipping)')
    add('gradient-accumulation-steps', type=positive_int, default=1, help='batches per optimizer step')
    add('mixed-precision', choices=['no', 'fp16', 'bf16'], help='autocast dtype (default: the accelerate config)')
    add('cpu', action='store_true', help='train on the CPU even when a GPU is there')
    add('seed', type=seed, default=42, help='seed of the initialisation, shuffling and training images')

    add = adder(parser.add_argument_group('checkpointing'))
    add('checkpointing-steps', type=steps_or_epoch, metavar='N|epoch',
        help='save a resumable checkpoint every N optimizer steps, or each epoch (default: only when stopped by '
             'a signal)')
    add('checkpoints-total-limit', type=count, default=3, help='keep only the last K checkpoints (0: all)')
    add('resume-from-checkpoint', metavar='PATH|latest',
        help='continue a run exactly from a checkpoint folder, or the newest complete one in the output folder')
    add('stop-after-steps', type=positive_int, help='debug: stop after N optimizer steps as if killed')

    add = adder(parser.add_argument_group('output'))
    add('output-dir', default='outputs', help='model, metrics, curves and checkpoints')
    add('log-every', type=positive_int, default=20, help='optimizer steps between logged training losses '
                                                         '(and divergence checks)')
    add('eval-every', type=positive_int, default=1, help='epochs between evaluations (the last always runs)')
    add('with-tracking', action='store_true', help='log to the trackers of --report-to')
    add('report-to', default='tensorboard', help='tensorboard | wandb | all | ...')
    add('project-name', default='timm_capsules', help='tracker project name')
    add('push-to-hub', metavar='REPO_ID', help='publish the final model to the Hugging Face Hub')
    add('hub-private', action='store_true', help='make the pushed repository private')
    add('debug-digests', action='store_true', help='debug: each rank writes a digest of its final weights')
    return parser


def parse_args(argv=None):
    """The arguments over the preset's values (or, without a preset, the quick run's: the parser's defaults)."""
    parser = build_parser()
    parser.set_defaults(**{k: v for k, v in QUICK.items() if k != 'model_kwargs'})  # shown by --help
    known, _ = parser.parse_known_args(argv)
    preset = get_preset(known.preset)
    preset_kwargs = preset.pop('model_kwargs', {})
    parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    # create_model kwargs: the preset's (they belong to its model: naming another model drops them),
    # then --model-kwargs / --model-arg, then the ablation flags
    args.model_kwargs = dict(preset_kwargs if args.model == preset['model'] else {})
    args.model_kwargs.update(parse_key_values(args.model_kwargs_cli + args.model_arg_cli))
    for name in ('iterations', 'routing', 'layer_norm', 'activations'):
        if getattr(args, name) is not None:
            args.model_kwargs[name] = getattr(args, name)
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    if args.num_workers is None:
        args.num_workers = 4 if torch.cuda.is_available() else 0
    if args.resume_from_checkpoint not in (None, 'latest') and not Path(args.resume_from_checkpoint).is_dir():
        fail(f'checkpoint {args.resume_from_checkpoint} does not exist')
    if not (args.model.startswith(('local-dir:', 'hf-hub:')) or timm.is_model(args.model)):
        fail(f'unknown model {args.model!r}; {closest_models(args.model)}')
    return args


def closest_models(name):
    """The registered model names (ours and timm's) closest to a misspelled one, as a hint."""
    import difflib
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    if close:
        return f"closest registered names: {', '.join(close)}"
    return f"capsule models: {', '.join(timm.list_models('capsnet_*'))}"


def resolved_config(args):
    """What a run with these arguments uses, as JSON-ready values (--print-config, metrics.json)."""
    skip = ('model_kwargs_cli', 'model_arg_cli', 'print_config')
    return {k: v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v)
            for k, v in vars(args).items() if k not in skip}


# ------------------------------------------------------------------------------------------------- data
def normalise(images, data_cfg):
    """The one place where images in [0, 1] become model inputs."""
    mean = torch.tensor(data_cfg['mean'], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg['std'], device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


# a CNN of about the quick CapsNet's size trained once on the same images with the same recipe (README)
CNN_REFERENCE = Path(__file__).resolve().parent / 'benchmarks' / 'records' / 'default_run_cnn_cpu.json'
# what makes a result comparable with the reference's: everything that changes the trained weights or what they
# are scored on, except the model (the quick CapsNet's against the record's CNN)
RECIPE_ARGS = (
    'preset', 'pretrained', 'dataset', 'data_dir', 'image_column', 'label_column', 'train_split', 'test_split',
    'augment', 'resize', 'mnist_source', 'epoch_size', 'test_size', 'data_seed', 'opt', 'lr', 'momentum',
    'weight_decay', 'batch_size', 'epochs', 'max_train_steps', 'sched', 'decay_milestones', 'decay_rate',
    'warmup_epochs', 'clip_grad', 'gradient_accumulation_steps', 'mixed_precision', 'seed', 'iterations', 'routing',
    'layer_norm', 'activations')


def cnn_reference_record(args, data_source, num_processes=1):
    """The recorded CNN run (its metrics.json) to show beside a run of the quick CapsNet with exactly the recipe
    and images the CNN was trained with (``args`` as main resolves them, ``--max-train-steps`` included;
    ``data_source``: the MNIST digits used), or None for any other run."""
    if not CNN_REFERENCE.is_file():
        return None
    record = json.loads(CNN_REFERENCE.read_text())['metrics']
    quick, ours = get_preset(None), tracker_config(args)
    # an option the record predates ran as its default
    defaults = tracker_config(build_parser().parse_args([]))
    same = (args.model == quick['model'] and args.model_kwargs == quick['model_kwargs']
            and num_processes == record['num_processes'] and data_source == record['data_source']
            and all(ours[key] == record['args'].get(key, defaults[key]) for key in RECIPE_ARGS))
    return record if same else None


def cnn_reference(args, metric_name, data_source, num_processes=1):
    """The line to print about the recorded CNN (see cnn_reference_record), or ''."""
    record = cnn_reference_record(args, data_source, num_processes)
    if record is None:
        return ''
    return (f"a CNN of similar size ({record['num_parameters']:,} parameters) trained with the same recipe: "
            f"{metric_name} {record['final'][metric_name]:.4f} ({CNN_REFERENCE.relative_to(CNN_REFERENCE.parents[2])})")


def chance_level(labels):
    """The accuracy (top-1, or exact match) of always answering the most frequent label (set) of ``labels``:
    what a model has to beat."""
    counts = collections.Counter(labels)
    return max(counts.values()) / len(labels) if labels else 0.0


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
        test = torch.utils.data.TensorDataset(torch.from_numpy(split.images).unsqueeze(1).float().div_(255),
                                              torch.from_numpy(split.targets))
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
                'train', digits=self.digits['train'], seed=self.args.seed, batch_size=self.args.batch_size,
                start=epoch * self.batches_per_epoch + skip, rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes)
            self.stream = iter(torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.args.num_workers, worker_init_fn=quiet_worker,
                pin_memory=torch.cuda.is_available()))
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


OFFLINE_HINT = ('pass --data-dir DIR with a local copy (save_to_disk, parquet or imagefolder), or run once with '
                'network to fill the cache; HF_HUB_OFFLINE=1 uses the cache without trying the network')


class ImageDatasetData:
    """CIFAR-10/100 or any Hub / local image-classification dataset: shuffled (seedable sampler) and augmented
    from (seed, epoch, index), so a resumed run sees exactly the images of an uninterrupted one."""

    def __init__(self, args, accelerator):
        from timm_capsules.data.cifar import check_columns, label_info, load_image_dataset
        self.args = args
        if args.dataset in KNOWN_DATASETS:
            hub_id, image_column, label_column = KNOWN_DATASETS[args.dataset]
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
                        fail(f'cannot load split {split!r} of {self.source}: {offline} and the local cache does '
                             f'not hold it; {OFFLINE_HINT}')
                    fail(f'cannot load split {split!r} of {self.source}: '
                         f'{str(error).splitlines()[0] if str(error) else repr(error)}')
                try:
                    check_columns(self.splits[role], self.image_column, self.label_column, name=f'{self.source} ({split})')
                except ValueError as error:
                    fail(str(error))
        self.labels = label_info(self.splits['train'], self.label_column)
        test_labels = self.splits['test'][self.label_column]
        self.chance = chance_level([tuple(sorted(y)) if self.labels.multi_label else y for y in test_labels])
        self.multi_label, self.num_classes, self.label_names = (
            self.labels.multi_label, self.labels.num_classes, self.labels.names)

    def build(self, data_cfg):
        from timm_capsules.data.cifar import ImageClassificationData, image_size, image_transform
        size = tuple(data_cfg['input_size'][1:])
        found = image_size(self.splits['train'], self.image_column)
        if data_cfg['fixed_input_size'] and found != size and not self.args.resize:
            fail(f'{self.args.model} takes {size[0]}x{size[1]} images but the dataset\'s are {found[0]}x{found[1]}; '
                 f'pass --resize or --model-arg img_size=...')
        self.data_cfg = data_cfg
        transform = image_transform(data_cfg['input_size'], resize=self.args.resize or found != size)
        channels = data_cfg['input_size'][0]
        loaders = {}
        for role, dataset in self.splits.items():  # images in [0, 1]: normalised by normalise() only
            data = ImageClassificationData(dataset, transform, self.image_column, self.label_column, self.labels,
                                           mean=(0.0,) * channels, std=(1.0,) * channels,
                                           augment=self.args.augment != 'none' and role == 'train',
                                           flip=self.args.augment == 'crop-flip', seed=self.args.seed)
            loaders[role] = torch.utils.data.DataLoader(
                data, batch_size=self.args.batch_size if role == 'train' else self.args.eval_batch_size,
                shuffle=role == 'train', num_workers=self.args.num_workers, worker_init_fn=quiet_worker,
                pin_memory=torch.cuda.is_available())  # workers restart each epoch and see set_epoch
        self.train_loader, self.test_loader = loaders['train'], loaders['test']
        self.extra_test_loaders = {role[len('extra:'):]: loader for role, loader in loaders.items()
                                   if role.startswith('extra:')}

    def prepare(self, accelerator):
        self.accelerator = accelerator
        self.train_loader, self.test_loader = accelerator.prepare(self.train_loader, self.test_loader)
        self.extra_test_loaders = {split: accelerator.prepare(loader) for split, loader in self.extra_test_loaders.items()}
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
    if args.dataset in MULTIMNIST_NAMES:
        if args.extra_test_splits:
            fail('--extra-test-split needs an image dataset (DiverseMultiMNIST has one test set)')
        return MultiMNISTData(args, accelerator)
    return ImageDatasetData(args, accelerator)


# ------------------------------------------------------------------------------------------------ model
def create_model(args, num_classes):
    kwargs = dict(args.model_kwargs)
    if kwargs.setdefault('num_classes', num_classes) != num_classes:
        fail(f"num_classes={kwargs['num_classes']} but the dataset has {num_classes} classes")
    if args.pretrained and not args.model.startswith('local-dir:'):
        hub_reachable()  # offline: the cache at once, not a minute of retries
    try:
        with warnings.catch_warnings():  # said below, as the error it is for training
            warnings.simplefilter('ignore', NonFiniteWeightsWarning)
            model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError, OSError) as error:
        fail(f'cannot create {args.model} with {kwargs}: {error}')
    bad = non_finite_tensors(model.state_dict())
    if bad:
        fail(f'the pretrained weights of {args.model} hold NaN or infinity in {len(bad)} tensor(s): '
             f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}; training cannot start from them')
    return model, kwargs


def load_routing_kernel(model, accelerator):
    """Builds (first use on a machine, about a minute) or loads the fused CPU routing kernel the model uses
    (inverted dot-product attention, or EM routing) before training starts, so that its one-off build is timed
    apart from training. Returns the seconds it took."""
    if accelerator.device.type != 'cpu':
        return 0.0
    if getattr(model, 'fused_routing', False):
        load = routing_kernel
    elif isinstance(model, EMCapsNet) and use_fused_routing():
        load = em_routing_kernel
    else:
        return 0.0
    started = time.time()
    with accelerator.main_process_first():  # one process builds, the others load the cached build
        load()
    return time.time() - started


# ------------------------------------------------------------------------------------------- evaluation
def correct(outputs, targets, multi_label, output_type='logits'):
    """Per image: exact match of the thresholded prediction (multi-label) or top-1 hit."""
    if multi_label:
        return (predicted_present(outputs, output_type) == targets.bool()).all(1)
    return outputs.argmax(1) == targets


@torch.no_grad()
def evaluate(model, batches, accelerator, multi_label, num_classes, output_type='logits'):
    """Metrics over the whole test set (``batches``: of a prepared loader); gather_for_metrics drops the
    samples duplicated to even out the last batch across processes, so every image counts exactly once."""
    model.eval()
    totals = dict(images=0, loss=0.0, correct=0, top5=0)
    tp = fp = fn = torch.zeros(num_classes, dtype=torch.long, device=accelerator.device)
    for images, targets in batches:
        outputs = model(images)
        losses = classification_loss(outputs, targets, output_type, multi_label, margin=0.9, reduction='none')
        outputs, targets, losses = accelerator.gather_for_metrics((outputs.float(), targets, losses))
        totals['images'] += len(targets)
        totals['loss'] += losses.sum().item()
        totals['correct'] += correct(outputs, targets, multi_label, output_type).sum().item()
        if multi_label:
            predicted, actual = predicted_present(outputs, output_type), targets.bool()
            tp = tp + (predicted & actual).sum(0)
            fp = fp + (predicted & ~actual).sum(0)
            fn = fn + (~predicted & actual).sum(0)
        else:
            k = min(5, num_classes)
            totals['top5'] += (outputs.topk(k, 1).indices == targets[:, None]).any(1).sum().item()
    model.train()
    n = max(totals['images'], 1)
    metrics = dict(num_images=totals['images'], loss=totals['loss'] / n)
    if multi_label:
        f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1)).tolist()
        metrics.update(exact_match=totals['correct'] / n, per_class_f1=f1, macro_f1=sum(f1) / len(f1))
    else:
        metrics.update(top1=totals['correct'] / n, top5=totals['top5'] / n)
    return metrics


# ---------------------------------------------------------------------------------------- output folder
# The run holds a lock on --output-dir (an flock, so the kernel releases it when the process dies, however it
# dies); OWNER names the run holding it.
LOCK_NAME, OWNER_NAME = '.train.lock', '.train.lock.owner'
OWNED_NAMES = ('model.safetensors', 'config.json', 'metrics.json', 'training_curves.png', '.tmp_model')


def is_main_launch_process():
    """Rank 0 of a launch (``accelerate launch`` sets RANK), before accelerate's state exists."""
    return int(os.environ.get('RANK', '0')) == 0


def check_output_dir(output_dir):
    """Everything about ``--output-dir`` that can be told before training: it is (or can be made) a writable
    folder, its ``checkpoints`` is a folder, and nothing the run writes or deletes there is a symbolic link."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        fail(f'--output-dir {out}: is a file, not a folder')
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f'--output-dir {out}: cannot create it ({error.strerror}: {error.filename})')
    if not os.access(out, os.W_OK | os.X_OK):
        fail(f'--output-dir {out}: not writable')
    checkpoints = out / 'checkpoints'
    if checkpoints.exists() and not checkpoints.is_dir():
        fail(f'--output-dir {out}: {checkpoints} is a file, not a folder')
    inside = sorted(checkpoints.glob('step_*')) + sorted(checkpoints.glob('.tmp_step_*')) \
        if checkpoints.is_dir() else []
    for path in [checkpoints, *inside, *(out / name for name in OWNED_NAMES)]:
        if path.is_symlink():
            fail(f'--output-dir {out}: {path} is a symbolic link (to {os.readlink(path)}); a run replaces and '
                 f'deletes only real files and folders: remove the link or choose another --output-dir')
    return out


@contextlib.contextmanager
def output_dir_lock(output_dir):
    """Holds ``--output-dir`` for the run: a second run into it stops at once naming this one's PID; the lock
    of a run that was killed is free (the kernel released it) and is taken over with a warning. Temporary
    folders a killed run left behind are removed once the lock is held."""
    from filelock import FileLock, Timeout
    out = Path(output_dir)
    owner_file = out / OWNER_NAME
    lock = FileLock(str(out / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = json.loads(owner_file.read_text())
            who = f"PID {owner['pid']} on {owner['host']}, started {owner['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = 'PID unknown'
        fail(f'--output-dir {out} is in use by another run ({who}); wait for it to end or choose another '
             f'--output-dir')
    except OSError as error:
        fail(f'--output-dir {out}: cannot lock it ({error.strerror}: {error.filename})')
    try:
        try:
            stale = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            stale = None
        if isinstance(stale, dict):
            print(f"warning: --output-dir {out}: a run that ended without releasing it (PID {stale.get('pid')}, "
                  f"started {stale.get('started')}) left its lock; taken over", file=sys.stderr, flush=True)
        owner_file.write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                              started=time.strftime('%Y-%m-%d %H:%M:%S'), argv=sys.argv)))
        for tmp in [out / '.tmp_model', *(out / 'checkpoints').glob('.tmp_step_*')]:
            shutil.rmtree(tmp, ignore_errors=True)  # half-written by a killed run: never complete
        yield out
    finally:
        owner_file.unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def output_dir_for_the_run(args):
    """The checks and the lock, on the main process (the others write into the folder it holds)."""
    if not is_main_launch_process():
        yield Path(args.output_dir)
        return
    created = not Path(args.output_dir).exists()
    check_output_dir(args.output_dir)
    try:
        with output_dir_lock(args.output_dir) as out:
            yield out
    finally:  # a run that stopped before writing anything leaves no folder behind
        if created and {p.name for p in Path(args.output_dir).iterdir()} <= {LOCK_NAME}:
            (Path(args.output_dir) / LOCK_NAME).unlink(missing_ok=True)
            Path(args.output_dir).rmdir()


def check_free_space(output_dir, model, checkpointing):
    """A checkpoint holds the weights, up to two optimizer states per weight and the RNG states (about 64 KiB);
    the final model the weights: refuse to start when the disk cannot hold the first of these that is written."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need = weights * (3 if checkpointing else 1) + (64 << 10)
    free = shutil.disk_usage(output_dir).free
    if free < need:
        fail(f'--output-dir {output_dir}: {free / 2 ** 20:.2f} MiB free on its disk, a '
             f'{"checkpoint" if checkpointing else "model"} of this model needs about {need / 2 ** 20:.2f} MiB')


def write_failure(path, error):
    """One line for a failed write: 'no space left on device: <path>' when that is the cause (torch's own
    writer reports it as 'unexpected pos' or 'file write failed', without the errno)."""
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not full:
        try:
            full = shutil.disk_usage(Path(path).parent).free < (1 << 20)
        except OSError:
            pass
    if full:
        return f'no space left on device: {path}'
    return f'cannot write {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}'


def finite_json(value, where='', found=None):
    """``value`` with every NaN or infinity replaced by None (JSON has neither), and the places replaced."""
    found = [] if found is None else found
    if isinstance(value, float) and not math.isfinite(value):
        found.append(where or '.')
        return None, found
    if isinstance(value, dict):
        return {k: finite_json(v, f'{where}.{k}' if where else str(k), found)[0] for k, v in value.items()}, found
    if isinstance(value, (list, tuple)):
        return [finite_json(v, f'{where}[{i}]', found)[0] for i, v in enumerate(value)], found
    return value, found


def write_json(path, value):
    """Writes ``value`` as strict JSON through a temporary file (the previous file stays whole if writing
    fails); NaN and infinity become null, their places listed under ``non_finite_values``."""
    path = Path(path)
    tmp = path.with_name(f'.tmp_{path.name}')
    value, non_finite = finite_json(value)
    if non_finite and isinstance(value, dict):
        value['non_finite_values'] = non_finite
    try:
        tmp.write_text(json.dumps(value, indent=2, allow_nan=False))
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        fail(write_failure(path, error))


# ------------------------------------------------------------------------------------------ checkpoints
# A checkpoint folder: accelerate's save_state files (model.safetensors; optimizer.bin and random_states_<rank>.pkl,
# read back by accelerate with torch.load(weights_only=True)) and our progress as JSON, with the size and
# SHA-256 of every other file. Nothing in it is ever unpickled as code: a checkpoint is data.
TRAINING_STATE = 'training_state.json'
# the pickle files that accelerate's load_state reads here (others, e.g. sampler.bin, it never reads)
PICKLED_STATE = r'optimizer(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt|dl_state_dict(_\d+)?\.bin'


class TrainState:
    """Progress that accelerate's save_state does not know about."""

    def __init__(self, device):
        self.completed_steps = 0
        self.running = torch.zeros(3, device=device)  # loss sum, correct, images since the last log line
        self.first_nonfinite = torch.zeros((), dtype=torch.long, device=device)  # step of the first nan/inf, 0: none
        self.history = dict(train=[], eval=[])

    def load(self, saved, accelerator):
        """``running`` was summed over the processes when saved: it goes back to rank 0, so that the next
        log line's sum over processes is the same whatever the number of processes."""
        self.completed_steps, self.history = saved['completed_steps'], saved['history']
        running = saved['running'] if accelerator.is_main_process else [0.0, 0.0, 0.0]
        self.running = torch.tensor(running, dtype=torch.float32, device=self.running.device)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dirs(output_dir):
    """Checkpoints, oldest first (a half-written one is still a .tmp dir and never listed)."""
    root = Path(output_dir) / 'checkpoints'
    found = [p for p in root.glob('step_*') if p.is_dir() and re.fullmatch(r'step_\d+', p.name)]
    return sorted(found, key=lambda p: int(p.name.split('_')[1]))


def save_checkpoint(accelerator, output_dir, state, total_limit):
    """Writes into a temporary folder, then renames it: a kill mid-save never leaves a half checkpoint."""
    final = Path(output_dir) / 'checkpoints' / f'step_{state.completed_steps:08d}'
    tmp = final.with_name(f'.tmp_{final.name}')
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    if final.is_symlink():
        fail(f'{final} is a symbolic link; a checkpoint is never written through one')
    accelerator.wait_for_everyone()

    def failed(error):  # the last complete checkpoint and the model are left as they are
        found = checkpoint_dirs(output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        fail(write_failure(tmp, error) + (f'; the last complete checkpoint is {found[-1]}' if found else ''))
    try:
        accelerator.save_state(str(tmp))
    except Exception as error:
        failed(error)
    running = accelerator.reduce(state.running.clone(), 'sum').tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: dict(bytes=p.stat().st_size, sha256=file_sha256(p)) for p in sorted(tmp.iterdir())}
        progress = dict(completed_steps=state.completed_steps, running=running, history=state.history, files=files)
        try:
            (tmp / TRAINING_STATE).write_text(json.dumps(progress, indent=1, allow_nan=False))
        except (OSError, ValueError) as error:
            failed(error)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-total_limit] if total_limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_state_problem(saved, folder):
    """What is wrong with a ``training_state.json`` (types, ranges, agreement with the folder's step), or None.
    Its schema: completed_steps (int >= 0, the N of the folder's name step_N), running (3 finite numbers >= 0:
    loss sum, correct, images), history (train and eval lists of records: str keys, a step from 0 to
    completed_steps, finite numbers or lists of them), files ({name: {bytes: int >= 0, sha256: 64 hex}})."""
    if not isinstance(saved, dict):
        return 'not a JSON object'
    missing = [key for key in ('completed_steps', 'running', 'history', 'files') if key not in saved]
    if missing:
        return f'missing {missing}'
    steps, running, history, files = (saved[k] for k in ('completed_steps', 'running', 'history', 'files'))
    if not _count(steps):
        return f'completed_steps must be an int >= 0, got {steps!r}'
    named = re.fullmatch(r'step_(\d+)', Path(folder).name)
    if named and int(named.group(1)) != steps:
        return f'completed_steps is {steps}, but the checkpoint is {Path(folder).name}'
    if not (isinstance(running, list) and len(running) == 3 and all(_finite(v) and v >= 0 for v in running)):
        return f'running must be 3 finite numbers >= 0 (loss sum, correct, images), got {running!r}'
    if not (isinstance(history, dict) and isinstance(history.get('train'), list)
            and isinstance(history.get('eval'), list)):
        return 'history must be {"train": [...], "eval": [...]}'
    for kind in ('train', 'eval'):
        for record in history[kind]:
            if not (isinstance(record, dict) and _count(record.get('step')) and record['step'] <= steps):
                return f'history.{kind}: each record needs a step from 0 to {steps}, got {record!r}'
            for key, value in record.items():
                if not (_finite(value) or (isinstance(value, list) and all(_finite(v) for v in value))):
                    return f'history.{kind}: {key} must be a finite number, got {value!r} (step {record["step"]})'
    if not (isinstance(files, dict) and all(
            isinstance(v, dict) and _count(v.get('bytes')) and isinstance(v.get('sha256'), str)
            and re.fullmatch(r'[0-9a-f]{64}', v['sha256']) for v in files.values())):
        return 'files must map each file name to its bytes and sha256'
    return None


def verify_checkpoint(folder, model, optimizer):
    """Our progress from ``folder`` after checking, before anything is loaded, that the checkpoint is complete
    (every file listed in training_state.json, with its size and SHA-256), that its pickle files load as plain
    data (torch.load(weights_only=True): a planted object is refused, never run) and that its tensors have the
    shapes of this model and optimizer. Raises CheckpointError naming the file."""
    folder = Path(folder)
    path = folder / TRAINING_STATE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f'{path}: missing (not a complete checkpoint of this script)')
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f'{path}: not a valid training state ({error})')
    problem = training_state_problem(saved, folder)
    if problem:
        raise CheckpointError(f'{path}: not a valid training state: {problem}')
    files, steps = saved['files'], saved['completed_steps']
    for name, expected in files.items():
        file = folder / name
        if Path(name).name != name or not file.is_file():
            raise CheckpointError(f'{file}: missing')
        if file.stat().st_size != expected['bytes']:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, {expected['bytes']} when it was written "
                                  f"(truncated or damaged)")
        if file_sha256(file) != expected['sha256']:
            raise CheckpointError(f'{file}: its contents changed since it was written (damaged)')
    for name in ('model.safetensors', 'optimizer.bin'):
        if name not in files:
            raise CheckpointError(f'{folder / name}: missing')
    for file in folder.glob('custom_checkpoint_*.pkl'):  # accelerate would unpickle it with weights_only=False
        raise CheckpointError(f'{file}: refused, accelerate would load it as code, not data (a checkpoint is data, '
                              f'never code; written by an older version of this script?)')
    weights = folder / 'model.safetensors'
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework='pt') as handle:
            found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as error:
        raise CheckpointError(f'{weights}: unreadable ({error})')
    if found != expected:
        differing = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise CheckpointError(f'{weights}: holds another model (first difference: {differing[0]!r}; '
                              f'other --model or --model-arg?)')
    plain = {}
    for name in sorted(files):
        if re.fullmatch(PICKLED_STATE, name):
            try:
                plain[name] = load_plain_data(str(folder / name), map_location='cpu')
            except Exception as error:
                raise CheckpointError(f'{folder / name}: not plain tensor data, refused (a checkpoint is data, never '
                                      f'code): {str(error).splitlines()[0]}')
    params = [p for group in optimizer.param_groups for p in group['params']]
    state = plain['optimizer.bin'].get('state') if isinstance(plain['optimizer.bin'], dict) else None
    if not isinstance(state, dict) or any(
            not isinstance(i, int) or i >= len(params) or any(torch.is_tensor(v) and v.ndim and v.shape != params[i].shape
                                                             for v in values.values())
            for i, values in state.items()):
        raise CheckpointError(f'{folder / "optimizer.bin"}: does not fit this model\'s optimizer')
    # the optimizer's own step count (Adam and the like; fp16 may skip steps, never add them)
    counted = {int(values['step']) for values in state.values() if isinstance(values, dict)
               and torch.is_tensor(values.get('step', None)) and values['step'].numel() == 1}
    if counted and max(counted) > steps:
        raise CheckpointError(f'{folder / TRAINING_STATE}: completed_steps is {steps}, but the optimizer state '
                              f'was saved after {max(counted)} steps')
    return saved


def find_checkpoint(args, model, optimizer, accelerator):
    """(folder, saved progress) to resume from, or (None, None). ``latest``: the newest checkpoint that verifies,
    warning about each newer damaged one; an explicit path that does not verify stops the run."""
    if args.resume_from_checkpoint is None:
        return None, None
    if args.resume_from_checkpoint != 'latest':
        try:
            return args.resume_from_checkpoint, verify_checkpoint(args.resume_from_checkpoint, model, optimizer)
        except CheckpointError as error:
            fail(f'cannot resume: {error}')
    found = checkpoint_dirs(args.output_dir)
    if not found:
        accelerator.print(f'no checkpoint in {args.output_dir}/checkpoints; starting from scratch')
        return None, None
    problems = []
    for folder in reversed(found):
        try:
            return str(folder), verify_checkpoint(folder, model, optimizer)
        except CheckpointError as error:
            problems.append(str(error))
            accelerator.print(f'warning: checkpoint {folder.name} is damaged or unusable: {error}; '
                              f'trying the one before it', file=sys.stderr)
    fail(f'no usable checkpoint in {args.output_dir}/checkpoints: {"; ".join(problems)}')


# ---------------------------------------------------------------------------------------------- faults
class StopOnSignal:
    """SIGTERM or Ctrl-C: finish the current optimizer step, write a checkpoint and exit non-zero (a second
    Ctrl-C stops at once). With several processes they agree on the step, so that they save together."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            print(f'\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint '
                  f'(Ctrl-C again stops at once)', file=sys.stderr, flush=True)
        self.signum = self.signum or signum

    def requested(self, accelerator):
        asked = self.signum is not None
        if accelerator.num_processes > 1:  # every process must stop at the same step to save together
            asked = accelerator.reduce(torch.tensor(float(asked), device=accelerator.device), 'sum').item() > 0
        return asked

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def stop_with_the_launcher():
    """`accelerate launch` (one process) does not pass SIGTERM on to its child, which would go on training
    alone: when our parent is the launcher, ask Linux to send us SIGTERM when it dies."""
    parent = os.getppid()
    try:
        words = Path(f'/proc/{parent}/cmdline').read_bytes().split(b'\0')
    except OSError:
        return
    if not (any(b'accelerate' in word for word in words) and any(b'launch' in word for word in words)):
        return
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def check_finite(state, accelerator, lr, output_dir):
    """Stops the run when a loss (or clipped gradient norm) became nan/inf: cheap, since it reads one number
    that the steps kept on the device, at the logging interval and before each checkpoint."""
    first = accelerator.gather(state.first_nonfinite[None])
    first = first[first > 0]
    if len(first):
        found = checkpoint_dirs(output_dir)
        fail(f'the run diverged: the training loss or gradient became nan/inf at step {first.min().item()} '
             f'(lr {lr:.3g}); nothing was saved. Try a lower --lr, --clip-grad 1.0, or --mixed-precision no '
             f'(float32){f"; the last checkpoint is {found[-1]}" if found else ""}')


def refuse_non_finite(model):
    """Stops before a model with nan/inf weights is written or pushed, naming the tensors."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        fail(f'the final model has non-finite values (nan/inf) in {", ".join(bad[:5])}'
             f'{" ..." if len(bad) > 5 else ""}; not saved')


# ---------------------------------------------------------------------------------------------- outputs
def weights_digest(model):
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_model(model, output_dir, label_names, data_cfg):
    """The timm way: config.json + model.safetensors, loadable with create_model('local-dir:<dir>').
    Written to a temporary folder first, then moved in. Non-finite weights are never written."""
    refuse_non_finite(model)
    tmp = Path(output_dir) / '.tmp_model'
    shutil.rmtree(tmp, ignore_errors=True)
    model_config = dict(label_names=list(label_names)) if label_names else None
    try:
        timm.models.save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True,
                                data_config=dict(mean=data_cfg['mean'], std=data_cfg['std']))
    except Exception as error:  # the previous model, if any, is left as it was
        shutil.rmtree(tmp, ignore_errors=True)
        fail(write_failure(tmp, error) + '; the model was not saved')
    for file in tmp.iterdir():
        os.replace(file, Path(output_dir) / file.name)
    tmp.rmdir()


def push_to_hub(model, model_kwargs, output_dir, repo_id, private, label_names):
    """A paper model as registered (an architecture with a hub config, built without create_model arguments
    besides num_classes) goes through timm_capsules.hub (validated upload folder, model card from its hub
    config); any other model through timm's own push_to_hf_hub. Safetensors only, either way."""
    architecture = model.pretrained_cfg['architecture']
    as_registered = set(model_kwargs) <= {'num_classes'}
    if as_registered and any(cfg['model'] == architecture for cfg in hub.list_hub_configs()):
        hub.push_checkpoint(output_dir, repo_id, private=private)
    else:
        model_config = dict(label_names=list(label_names)) if label_names else None
        timm.models.push_to_hf_hub(model, repo_id, model_config=model_config, private=private,
                                   safe_serialization=True)


def plot_curves(history, path, metric_name, title, chance, reference=None):
    """Loss and accuracy over the optimizer steps, titled ``title`` (model and data set; also the PNG's Title),
    with the chance level and, when given, the reference ``(label, value)`` as lines. Returns the figure."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.4))
    train, test = history['train'], history['eval']
    ax_loss.plot([r['step'] for r in train], [r['loss'] for r in train], label='train')
    ax_loss.plot([r['step'] for r in test], [r['loss'] for r in test], 'o-', label='test')
    ax_acc.plot([r['step'] for r in train], [r['accuracy'] for r in train], label='train (batches)')
    ax_acc.plot([r['step'] for r in test], [r[metric_name] for r in test], 'o-', label='test')
    ax_acc.axhline(chance, color='grey', linestyle=':', label=f'chance level {chance:.3f}')
    if reference is not None:
        ax_acc.axhline(reference[1], color='C2', linestyle='--', label=f'{reference[0]} {reference[1]:.3f}')
    ax_loss.set(xlabel='optimizer step', ylabel='loss', title='loss')
    ax_acc.set(xlabel='optimizer step', ylabel=metric_name, title=f'test {metric_name}', ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize='small')
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={'Title': title})
    plt.close(fig)
    return fig


def tracker_config(args):
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in resolved_config(args).items()}


# ------------------------------------------------------------------------------------------------- loop
def train(args, accelerator, model, optimizer, scheduler, data, state, updates_per_epoch, epochs):
    """Optimizer steps from ``state.completed_steps`` to ``args.max_train_steps``, evaluating after every
    ``--eval_every`` epochs and at the end, checkpointing as asked. Returns None when done, or why it stopped
    early: '--stop_after_steps' or the name of the signal received."""
    output_type = getattr(accelerator.unwrap_model(model), 'output_type', 'logits')  # timm's own models: logits
    metric_name = 'exact_match' if data.multi_label else 'top1'
    max_steps, completed_steps = args.max_train_steps, state.completed_steps
    starting_epoch, resume_updates = divmod(completed_steps, updates_per_epoch)
    if scheduler is not None:
        scheduler.step_update(num_updates=completed_steps)

    def run_evaluation(epoch):
        metrics = evaluate(model, data.test_batches(), accelerator, data.multi_label, data.num_classes, output_type)
        state.history['eval'].append(dict(step=completed_steps, epoch=epoch, **metrics))
        if accelerator.is_main_process:  # through tqdm, so the progress bar stays intact
            tqdm.write(f"epoch {epoch}: step {completed_steps}, test loss {metrics['loss']:.4f}, "
                       f"{metric_name} {metrics[metric_name]:.4f} ({metrics['num_images']} images)")
        if args.with_tracking:
            accelerator.log({f'test/{k}': v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=completed_steps)

    def checkpoint():
        check_finite(state, accelerator, optimizer.param_groups[0]['lr'], args.output_dir)
        return save_checkpoint(accelerator, args.output_dir, state, args.checkpoints_total_limit)

    evaluated_steps = {record['step'] for record in state.history['eval']}
    if completed_steps and not resume_updates and starting_epoch % args.eval_every == 0 \
            and completed_steps not in evaluated_steps and completed_steps < max_steps:
        run_evaluation(starting_epoch - 1)  # a step checkpoint at the end of an epoch came before its evaluation
    # a progress bar on a terminal; in a log file (stdout not a terminal) one line per --log-every steps instead
    show_bar = accelerator.is_main_process and sys.stdout.isatty()
    progress = tqdm(range(max_steps), initial=completed_steps, disable=not show_bar)
    stop = StopOnSignal()
    stop_with_the_launcher()
    stopped = None
    epoch = starting_epoch
    try:
        for epoch in range(starting_epoch, epochs if completed_steps < max_steps else starting_epoch):
            model.train()
            skip = resume_updates * args.gradient_accumulation_steps if epoch == starting_epoch else 0
            for images, targets in data.train_batches(epoch, skip):
                with accelerator.accumulate(model):
                    outputs = model(images)
                    margin = 0.2 + 0.7 * min(1.0, completed_steps / max_steps)  # spread loss only
                    loss = classification_loss(outputs, targets, output_type, data.multi_label, margin)
                    accelerator.backward(loss)
                    finite = torch.isfinite(loss.detach())
                    if args.clip_grad and accelerator.sync_gradients:
                        norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                        if accelerator.scaler is None:  # fp16's scaler skips inf steps by design
                            finite = finite & torch.isfinite(norm)
                    optimizer.step()
                    optimizer.zero_grad()
                state.first_nonfinite = torch.where(finite | (state.first_nonfinite > 0), state.first_nonfinite,
                                                    completed_steps + 1)  # on the device: no sync per step
                state.running += torch.stack([
                    loss.detach().float() * len(targets),
                    correct(outputs.detach(), targets, data.multi_label, output_type).sum().float(),
                    torch.tensor(float(len(targets)), device=accelerator.device)])
                if not accelerator.sync_gradients:
                    continue
                completed_steps = state.completed_steps = completed_steps + 1
                if scheduler is not None:
                    scheduler.step_update(num_updates=completed_steps)
                progress.update(1)
                if completed_steps % args.log_every == 0 or completed_steps == max_steps:
                    check_finite(state, accelerator, optimizer.param_groups[0]['lr'], args.output_dir)
                    loss_sum, hits, count = accelerator.reduce(state.running.clone(), 'sum').tolist()
                    record = dict(step=completed_steps, epoch=epoch, loss=loss_sum / count, accuracy=hits / count,
                                  lr=optimizer.param_groups[0]['lr'])
                    state.history['train'].append(record)
                    state.running.zero_()
                    progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
                    if not show_bar:
                        accelerator.print(f"step {completed_steps}/{max_steps}: train loss {record['loss']:.4f}, "
                                          f"accuracy {record['accuracy']:.3f} (batches), lr {record['lr']:.3g}")
                    if args.with_tracking:
                        accelerator.log({'train/loss': record['loss'], 'train/accuracy': record['accuracy'],
                                         'lr': record['lr']}, step=completed_steps)
                if args.checkpointing_steps not in (None, 'epoch') and completed_steps % args.checkpointing_steps == 0:
                    checkpoint()
                if completed_steps == args.stop_after_steps:
                    stopped = '--stop_after_steps'
                elif stop.requested(accelerator):
                    stopped = signal.Signals(stop.signum or signal.SIGTERM).name
                if completed_steps >= max_steps or stopped:
                    break
            if stopped:
                break
            last = completed_steps >= max_steps
            if last or (epoch + 1) % args.eval_every == 0:
                run_evaluation(epoch)
            if args.checkpointing_steps == 'epoch':
                checkpoint()
            if last:
                break
            if stop.requested(accelerator):
                stopped = signal.Signals(stop.signum or signal.SIGTERM).name
                break
    finally:
        stop.restore()
        progress.close()

    if stopped and stopped != '--stop_after_steps':  # a checkpoint to resume from (--stop_after_steps: as if killed)
        folder = checkpoint()
        accelerator.print(f'{PROG}: stopped by {stopped} after {completed_steps} steps; checkpoint {folder}; '
                          f'continue with --resume-from-checkpoint latest', file=sys.stderr)
    elif not stopped and completed_steps not in {record['step'] for record in state.history['eval']}:
        run_evaluation(epoch)  # e.g. resumed from a checkpoint written just before the final evaluation
    return stopped


# ------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.print_config:
        print(json.dumps(resolved_config(args), indent=2))
        return resolved_config(args)
    with output_dir_for_the_run(args):  # checked and locked before anything is loaded
        return run_training(args)


def run_training(args):
    started = time.time()
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if accelerator.mixed_precision == 'fp16' and accelerator.device.type == 'cpu':  # accelerate: silently fp32
        fail('--mixed_precision fp16 needs a GPU (on the CPU accelerate trains in float32); use bf16 or no')
    set_seed(args.seed)

    # ---- data and model (everything that can be wrong is checked before training)
    data = load_data(args, accelerator)
    model, model_kwargs = create_model(args, data.num_classes)
    data_cfg = model_data_config(model)
    data.build(data_cfg)
    if accelerator.is_main_process:
        check_free_space(args.output_dir, model, args.checkpointing_steps is not None)
    kernel_load_s = load_routing_kernel(model, accelerator)
    training_started = time.time()

    # ---- optimizer and scheduler (timm factories; the scheduler is stepped by us, once per optimizer step)
    try:
        optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum)
    except ValueError as error:
        fail(f'--opt {args.opt}: {error}')
    model, optimizer = accelerator.prepare(model, optimizer)
    data.prepare(accelerator)
    updates_per_epoch = math.ceil(data.batches_per_epoch / args.gradient_accumulation_steps)
    args.max_train_steps = args.max_train_steps or args.epochs * updates_per_epoch
    epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    scheduler = None
    if args.sched and args.sched != 'none':
        try:
            scheduler, _ = create_scheduler_v2(
                optimizer, sched=args.sched, num_epochs=epochs, decay_milestones=args.decay_milestones or [],
                decay_rate=args.decay_rate, warmup_epochs=args.warmup_epochs or 0, step_on_epochs=False,
                updates_per_epoch=updates_per_epoch)
        except ValueError as error:
            fail(f'--sched {args.sched}: {error}')

    # ---- resume: weights, optimizer and RNG states (accelerate), our progress (JSON), all verified first
    state = TrainState(accelerator.device)
    resume, saved = find_checkpoint(args, accelerator.unwrap_model(model), optimizer, accelerator)
    if resume:
        accelerator.print(f'resuming from {resume}')
        accelerator.load_state(resume)
        state.load(saved, accelerator)

    # ---- the loop and its evaluations
    if args.with_tracking:
        accelerator.init_trackers(args.project_name, tracker_config(args))
    num_params = sum(p.numel() for p in model.parameters())
    accelerator.print(
        f'{args.model} {model_kwargs} ({num_params:,} parameters) on {args.dataset} ({data.source}): {epochs} epochs '
        f'x {updates_per_epoch} steps, batch {args.batch_size} x {accelerator.num_processes} processes x '
        f'{args.gradient_accumulation_steps} accumulation, {accelerator.device}, '
        f'mixed precision {accelerator.mixed_precision}')
    stopped = train(args, accelerator, model, optimizer, scheduler, data, state, updates_per_epoch, epochs)
    unwrapped = accelerator.unwrap_model(model)
    if args.debug_digests:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / f'digest_rank{accelerator.process_index}.txt').write_text(weights_digest(unwrapped))
    if stopped:
        accelerator.end_training()  # last: it ends the process group
        if stopped != '--stop_after_steps':
            raise SystemExit(128 + signal.Signals[stopped].value)
        accelerator.print(f'stopped after {state.completed_steps} steps (--stop_after_steps)')
        return dict(stopped=True, completed_steps=state.completed_steps, model_object=unwrapped)

    # ---- saving
    metric_name = 'exact_match' if data.multi_label else 'top1'
    final = state.history['eval'][-1] if state.history['eval'] else {}
    output_type = getattr(accelerator.unwrap_model(model), 'output_type', 'logits')
    extra_tests = {split: evaluate(model, data.test_batches(split), accelerator, data.multi_label, data.num_classes,
                                   output_type) for split in args.extra_test_splits}
    for split, metrics in extra_tests.items():
        accelerator.print(f'{split}: {metric_name} {metrics[metric_name]:.4f} ({metrics["num_images"]} images)')
    finished = time.time()
    steps = state.completed_steps
    results = dict(
        model=args.model, model_kwargs=model_kwargs, preset=args.preset, dataset=args.dataset,
        data_source=data.source, task='multi-label' if data.multi_label else 'single-label', metric=metric_name,
        final=final, extra_tests=extra_tests, chance_level=data.chance, completed_steps=steps, epochs=epochs,
        images_seen=steps * args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
        num_processes=accelerator.num_processes, num_parameters=num_params,
        training_time_s=finished - training_started, kernel_load_s=kernel_load_s, wall_time_s=finished - started,
        weights_sha256=weights_digest(unwrapped), args=tracker_config(args), history=state.history)
    refuse_non_finite(unwrapped)  # on every process, so that none waits below for one that stopped
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_model(unwrapped, out, data.label_names, data_cfg)
        write_json(out / 'metrics.json', results)
        reference = cnn_reference_record(args, data.source, accelerator.num_processes)
        plot_curves(state.history, out / 'training_curves.png', metric_name,
                    f'{args.model} on {args.dataset} ({data.source})', data.chance,
                    reference and ('CNN of similar size, same recipe', reference['final'][metric_name]))
        if args.push_to_hub:
            push_to_hub(unwrapped, model_kwargs, out, args.push_to_hub, args.hub_private, data.label_names)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    kernel_note = f', routing kernel built/loaded in {kernel_load_s:.0f} s' if kernel_load_s >= 1 else ''
    reference = cnn_reference(args, metric_name, data.source, accelerator.num_processes)
    accelerator.print('\n'.join([
        f"final test {metric_name}: {final.get(metric_name, float('nan')):.4f} on {final.get('num_images', 0)} images "
        f'after {steps} steps',
        f"chance level: {data.chance:.4f} (always the most frequent label{' set' if data.multi_label else ''})",
        *([reference] if reference else []),
        f"{results['training_time_s']:.0f} s of training{kernel_note}; saved to {args.output_dir}"]))
    return dict(results, model_object=unwrapped)


if __name__ == '__main__':
    main()
