"""The training run's settings: the command line (grouped options, one-line errors), the paper's presets under
it, and ``TrainConfig``, the resolved values a run reads (``TrainConfig.from_argv(argv)``)."""

import argparse
import ast
import math
from pathlib import Path

import torch

import timm
import timm_capsules  # noqa: F401  (registers the capsule models with timm)
from timm_capsules.presets import PRESETS, QUICK, get_preset

__all__ = ['TrainConfig', 'build_parser', 'fail', 'PROG']

DESCRIPTION = (
    'Train and evaluate the capsule networks of *Capsules with Inverted Dot-Product Attention Routing*\n'
    '(Tsai et al., ICLR 2020) with Hugging Face Accelerate, from one CPU to many GPUs.'
)


PROG = 'train_accelerate.py'
# create_model arguments that are names, so --model-arg takes them as bare words (backbone=resnet18)
STRING_MODEL_ARGS = ('backbone', 'routing', 'global_pool')


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' where there is a value to show; an option without one says in its help what
    leaving it out means."""

    def _get_help_string(self, action):
        unset = (
            action.default is None
            or action.default is False
            or action.default == []
            or action.default == argparse.SUPPRESS
        )
        if unset or '%(default)' in action.help or not action.option_strings:
            return action.help
        return action.help + ' (default: %(default)s)'


def fail(message):
    """Stop with one clear line (exit status 1)."""
    raise SystemExit(f'{PROG}: error: {" ".join(str(message).split())}')


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
    lines = [
        f'  {name:<{width}}  {p["model"]} on {p["dataset"]}, {p["opt"]} lr {p["lr"]}, batch {p["batch_size"]}, '
        f'{p["epochs"]} epochs'
        for name, p in sorted(PRESETS.items())
    ]
    return (
        'presets (--preset NAME; --preset NAME --print-config shows everything it sets):\n'
        + '\n'.join(lines)
        + '\nwithout --preset: the quick CPU run, whose values are the defaults shown above.'
    )


def build_parser():
    parser = Parser(
        prog=PROG, description=DESCRIPTION, allow_abbrev=False, formatter_class=HelpFormatter, epilog=presets_epilog()
    )
    positive_int, count, positive = number(int, minimum=1), number(int, minimum=0), number(float, above=0)
    non_negative = number(float, minimum=0)
    seed = number(int, minimum=0, maximum=2**32 - 1)  # numpy's and the DataLoader's seed range

    def adder(group):
        def add(name, **kwargs):  # --some-name and --some_name
            names = [f'--{name}'] + ([f'--{name.replace("-", "_")}'] if '-' in name else [])
            group.add_argument(*names, **kwargs)

        return add

    add = adder(parser.add_argument_group('preset'))
    add(
        'preset',
        choices=sorted(PRESETS),
        metavar='NAME',
        help='a recipe of the paper (listed below); explicit arguments override its values',
    )
    add('print-config', action='store_true', help='print the resolved configuration (preset + arguments) and exit')

    add = adder(parser.add_argument_group('model'))
    add('model', help='any timm model name (capsnet_*), or local-dir:<dir> / hf-hub:<id>')
    add(
        'model-kwargs',
        dest='model_kwargs_cli',
        nargs='+',
        default=[],
        metavar='KEY=VALUE',
        help='timm.create_model kwargs, values Python literals '
        f'(e.g. iterations=3 "backbone_args={{\'out_chs\': 64}}"); '
        f"bare words only for {', '.join(STRING_MODEL_ARGS)}. Default: a preset's own for its model; without a preset, "
        f"{QUICK['model_kwargs']} for {QUICK['model']} (the quick run's small CapsNet)".replace('%', '%%'),
    )
    add(
        'model-arg',
        dest='model_arg_cli',
        action='append',
        default=[],
        metavar='KEY=VALUE',
        help='one create_model kwarg, as --model-kwargs (repeatable)',
    )
    add('pretrained', action='store_true', help="start from the model's pretrained weights (default: random init)")
    add('iterations', type=positive_int, help="routing iterations (default: the model's, 2)")
    add(
        'routing',
        choices=['concurrent', 'sequential'],
        help="routing schedule; sequential is ablation B (default: the model's, concurrent)",
    )
    add('no-layer-norm', dest='layer_norm', action='store_const', const=False, help='drop LayerNorm (ablation A)')
    add('activations', action='store_const', const=True, help='EM-style capsule activations (ablation C)')

    add = adder(parser.add_argument_group('data'))
    add('dataset', help='diverse_multimnist | cifar10 | cifar100 | hf:<Hub id or local folder>')
    add(
        'data-dir',
        help='local copy of cifar10/cifar100: save_to_disk, parquet or imagefolder folder '
        '(default: download from the Hub)',
    )
    add('image-column', help='image column (default: cifar img, hf: image)')
    add('label-column', help='label column (default: cifar10 label, cifar100 fine_label, hf: label)')
    add('train-split', default='train', help='training split (datasets slicing works: train[:90%%])')
    add('test-split', default='test', help='evaluation split')
    add(
        'extra-test-split',
        dest='extra_test_splits',
        action='append',
        default=[],
        metavar='SPLIT',
        help='another split the final model is evaluated on (repeatable; metrics.json: extra_tests)',
    )
    add(
        'augment',
        choices=['crop-flip', 'crop', 'none'],
        default='crop-flip',
        help="training augmentation of image datasets: pad 4 + random crop (+ horizontal flip: the paper's CIFAR "
        'recipe); none for data whose flips change the class (digits)',
    )
    add('resize', action='store_true', help="resize images to the model's input size (default: refuse other sizes)")
    add(
        'mnist-source',
        default='auto',
        help='MNIST digits of DiverseMultiMNIST: auto (Hub when reachable, else the built-in sample) | sample | hub '
        '| fashion_mnist | IDX folder',
    )
    add('epoch-size', type=positive_int, help='DiverseMultiMNIST images per epoch (generated on the fly)')
    add(
        'test-size',
        type=number(int, minimum=1, maximum=10**6),
        help='DiverseMultiMNIST fixed test images (generated up front, at most 1,000,000)',
    )
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
    add(
        'max-train-steps', type=positive_int, help='optimizer steps in all; overrides --epochs (default: from --epochs)'
    )
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
    add(
        'checkpointing-steps',
        type=steps_or_epoch,
        metavar='N|epoch',
        help='save a resumable checkpoint every N optimizer steps, or each epoch (default: only when stopped by '
        'a signal)',
    )
    add('checkpoints-total-limit', type=count, default=3, help='keep only the last K checkpoints (0: all)')
    add(
        'resume-from-checkpoint',
        metavar='PATH|latest',
        help='continue a run exactly from a checkpoint folder, or the newest complete one in the output folder',
    )
    add('stop-after-steps', type=positive_int, help='debug: stop after N optimizer steps as if killed')

    add = adder(parser.add_argument_group('output'))
    add('output-dir', default='outputs', help='model, metrics, curves and checkpoints')
    add(
        'log-every',
        type=positive_int,
        default=20,
        help='optimizer steps between logged training losses (and divergence checks)',
    )
    add('eval-every', type=positive_int, default=1, help='epochs between evaluations (the last always runs)')
    add('with-tracking', action='store_true', help='log to the trackers of --report-to')
    add('report-to', default='tensorboard', help='tensorboard | wandb | all | ...')
    add('project-name', default='timm_capsules', help='tracker project name')
    add('push-to-hub', metavar='REPO_ID', help='publish the final model to the Hugging Face Hub')
    add('hub-private', action='store_true', help='make the pushed repository private')
    add('debug-digests', action='store_true', help='debug: each rank writes a digest of its final weights')
    return parser


def closest_models(name):
    """The registered model names (ours and timm's) closest to a misspelled one, as a hint."""
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    if close:
        return f'closest registered names: {", ".join(close)}'
    return f'capsule models: {", ".join(timm.list_models("capsnet_*"))}'


class TrainConfig(argparse.Namespace):
    """A run's settings: the command line's values over the preset's (or, without a preset, the quick run's: the
    parser's defaults), with ``model_kwargs`` (the create_model arguments) resolved. The one way to make one is
    ``TrainConfig.from_argv(argv)``; ``run()`` and ``train_accelerate.py`` read nothing else."""

    @classmethod
    def from_argv(cls, argv=None):
        parser = build_parser()
        parser.set_defaults(**{k: v for k, v in QUICK.items() if k != 'model_kwargs'})  # shown by --help
        known, _ = parser.parse_known_args(argv)
        preset = get_preset(known.preset)
        preset_kwargs = preset.pop('model_kwargs', {})
        parser.set_defaults(**preset)
        args = parser.parse_args(argv, namespace=cls())
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

    def resolved(self):
        """What a run with these settings uses, as JSON-ready values (--print-config, metrics.json)."""
        skip = ('model_kwargs_cli', 'model_arg_cli', 'print_config')
        return {
            k: v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v)
            for k, v in vars(self).items()
            if k not in skip
        }

    def for_trackers(self):
        """``resolved()`` with every value a scalar (trackers' hyperparameters; metrics.json's ``args``)."""
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.resolved().items()}
