"""Values of timm_capsules/train/config.py, function by function: the command line as an interface (every
option's names, default, choices, help line and what its type makes of a set of probe strings, against the
reviewed snapshot tests/train_options.json), the number checks against their bounds by hand, the model
arguments, and what ``TrainConfig.from_argv`` resolves.

When an option changes on purpose: ``python tests/test_train_config_values.py > tests/train_options.json``,
then read the diff."""

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import timm_capsules  # noqa: F401
from timm_capsules.presets import PRESETS, QUICK
from timm_capsules.train import config as train_config
from timm_capsules.train.config import (
    PROG,
    STRING_MODEL_ARGS,
    HelpFormatter,
    TrainConfig,
    build_parser,
    closest_models,
    fail,
    number,
    parse_key_values,
    steps_or_epoch,
)

SNAPSHOT = Path(__file__).with_name('train_options.json')
PROBES = ['-1', '0', '1', '2.5', 'nan', 'inf', '1000000', '1000001', '4294967295', '4294967296', 'epoch', 'x']


def probe(action):
    out = {}
    for text in PROBES:
        try:
            out[text] = action.type(text)
        except argparse.ArgumentTypeError as error:
            out[text] = f'error: {error}'
    return out


def snapshot():
    """What the parser offers, as JSON: argparse's own help action and group titles left out."""
    parser = build_parser()
    formatter = HelpFormatter(parser.prog)
    actions = [
        dict(
            options=a.option_strings,
            dest=a.dest,
            kind=type(a).__name__,
            default=a.default,
            const=a.const,
            nargs=a.nargs,
            choices=a.choices,
            metavar=a.metavar,
            required=a.required,
            help=formatter._get_help_string(a),
            probes=probe(a) if a.type else None,
        )
        for a in parser._actions
        if a.dest != 'help'
    ]
    groups = [[g.title, [a.dest for a in g._group_actions]] for g in parser._action_groups[2:]]
    return json.loads(
        json.dumps(
            dict(
                prog=parser.prog,
                description=parser.description,
                epilog=parser.epilog,
                allow_abbrev=parser.allow_abbrev,
                groups=groups,
                actions=actions,
            ),
            default=repr,
        )
    )


def test_the_command_line_is_the_reviewed_one():
    expected = json.loads(SNAPSHOT.read_text())
    found = snapshot()
    assert {k: v for k, v in found.items() if k != 'actions'} == {k: v for k, v in expected.items() if k != 'actions'}
    assert [a['dest'] for a in found['actions']] == [a['dest'] for a in expected['actions']]
    for got, want in zip(found['actions'], expected['actions']):
        assert got == want, want['dest']


def test_every_dashed_option_has_its_underscore_twin():
    for action in build_parser()._actions:
        dashed = [o for o in action.option_strings if o.startswith('--') and '-' in o[2:]]
        for option in dashed:
            assert option.replace('-', '_').replace('__', '--', 1) in action.option_strings


def test_the_epilog_lists_each_preset_in_one_aligned_line():
    epilog = train_config.presets_epilog().splitlines()
    assert epilog[0] == 'presets (--preset NAME; --preset NAME --print-config shows everything it sets):'
    assert epilog[-1] == 'without --preset: the quick CPU run, whose values are the defaults shown above.'
    width = max(len(name) for name in PRESETS)
    assert len(epilog) == len(PRESETS) + 2
    for line, name in zip(epilog[1:-1], sorted(PRESETS)):
        p = PRESETS[name]
        assert line == '  ' + name.ljust(width) + '  ' + (
            f'{p["model"]} on {p["dataset"]}, {p["opt"]} lr {p["lr"]}, batch {p["batch_size"]}, {p["epochs"]} epochs'
        )


def test_help_shows_a_default_only_where_there_is_one():
    formatter = HelpFormatter('x')

    def shown(**kwargs):
        action = argparse.Action(['--x'], 'x', help='text', **kwargs)
        return formatter._get_help_string(action)

    for unset in (None, False, [], argparse.SUPPRESS):
        assert shown(default=unset) == 'text'
    for value in (0, 0.0, 'a', [1], True):
        assert shown(default=value) == 'text (default: %(default)s)'
    positional = argparse.Action([], 'x', help='text', default=3)
    assert formatter._get_help_string(positional) == 'text'
    own = argparse.Action(['--x'], 'x', help='text %(default)s', default=3)
    assert formatter._get_help_string(own) == 'text %(default)s'


def test_parser_errors_are_one_line_with_the_program_name(capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(['--lr', 'x'])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"{PROG}: error: argument --lr: 'x' is not a number (see --help)\n"
    with pytest.raises(SystemExit):  # no abbreviations: --lea is not --learning...
        build_parser().parse_args(['--batch', '3'])


def test_fail_stops_with_one_line_of_single_spaces():
    with pytest.raises(SystemExit) as stop:
        fail('a  b\n  c\t d ')
    assert stop.value.code == 'train_accelerate.py: error: a b c d'
    with pytest.raises(SystemExit) as stop:
        fail(ValueError('x'))
    assert stop.value.code == 'train_accelerate.py: error: x'


@settings(max_examples=60, deadline=None)
@given(
    value=st.one_of(st.integers(-10, 10), st.floats(-10, 10, allow_nan=False), st.sampled_from(['nan', 'inf'])),
    minimum=st.one_of(st.none(), st.integers(-3, 3)),
    above=st.one_of(st.none(), st.integers(-3, 3)),
    maximum=st.one_of(st.none(), st.integers(-3, 3)),
    kind=st.sampled_from([int, float]),
)
def test_number_accepts_exactly_the_values_within_its_bounds(value, minimum, above, maximum, kind):
    text = str(value)
    parse = number(kind, minimum=minimum, above=above, maximum=maximum)
    try:
        expected = kind(text)
    except ValueError:
        with pytest.raises(argparse.ArgumentTypeError) as error:
            parse(text)
        assert str(error.value) == f'{text!r} is not {"an integer" if kind is int else "a number"}'
        return
    messages = []
    if not math.isfinite(expected):
        messages.append(f'must be a finite number, got {text}')
    if minimum is not None and expected < minimum:
        messages.append(f'must be >= {minimum}, got {text}')
    if above is not None and not expected > above:
        messages.append(f'must be > {above}, got {text}')
    if maximum is not None and expected > maximum:
        messages.append(f'must be <= {maximum}, got {text}')
    if messages:  # the first broken rule, in the order finite, minimum, above, maximum
        with pytest.raises(argparse.ArgumentTypeError) as error:
            parse(text)
        assert str(error.value) == messages[0]
    else:
        got = parse(text)
        assert got == expected and type(got) is kind


def test_steps_or_epoch():
    assert steps_or_epoch('epoch') == 'epoch'
    assert steps_or_epoch('1') == 1 and steps_or_epoch('250') == 250
    for bad in ('0', '-1', '1.5', 'Epoch', '', 'x'):
        with pytest.raises(argparse.ArgumentTypeError) as error:
            steps_or_epoch(bad)
        assert str(error.value) == f"must be a number of steps (>= 1) or 'epoch', got {bad!r}"


def test_model_arguments_are_literals_or_the_name_arguments_bare_words():
    assert STRING_MODEL_ARGS == ('backbone', 'routing', 'global_pool')
    assert parse_key_values(None) == {} and parse_key_values([]) == {}
    values = parse_key_values(['a=1', "b={'x': 2}", "c='a=b'", 'backbone=resnet18', 'routing=x', 'global_pool=avg'])
    assert values == dict(a=1, b={'x': 2}, c='a=b', backbone='resnet18', routing='x', global_pool='avg')
    assert parse_key_values(['a=1', 'a=2']) == {'a': 2}
    assert parse_key_values(['backbone=[1']) == {'backbone': '[1'}  # a SyntaxError, still a bare word
    for item in ('a', '=1', '1a=2', 'a-b=1'):
        with pytest.raises(SystemExit) as stop:
            parse_key_values([item])
        assert stop.value.code == f'{PROG}: error: model argument {item!r} is not key=value'
    for item, value in (('pose_dim=eight', 'eight'), ('x=[4', '[4')):
        key = item.split('=')[0]
        with pytest.raises(SystemExit) as stop:
            parse_key_values([item])
        assert stop.value.code == (
            f'{PROG}: error: model argument {item!r}: {value!r} is not a Python literal (quote a string: '
            f"{key}='{value}')"
        )


def test_closest_models_hint():
    assert closest_models('capsnet_simpel_cifar10').startswith('closest registered names: capsnet_simple_cifar10, ')
    assert len(closest_models('resnt50').split(': ')[1].split(', ')) == 5
    import timm

    assert closest_models('zzzzzzzzzzzz') == f'capsule models: {", ".join(timm.list_models("capsnet_*"))}'


def test_from_argv_resolves_the_quick_run(monkeypatch):
    monkeypatch.setattr(train_config.torch.cuda, 'is_available', lambda: False)
    args = TrainConfig.from_argv([])
    assert isinstance(args, TrainConfig)
    for key, value in QUICK.items():
        if key != 'model_kwargs':
            assert getattr(args, key) == value, key
    assert args.model_kwargs == QUICK['model_kwargs'] and args.model_kwargs is not QUICK['model_kwargs']
    assert args.eval_batch_size == 2 * QUICK['batch_size'] and args.num_workers == 0
    assert (args.train_split, args.test_split, args.augment, args.seed, args.data_seed) == (
        'train',
        'test',
        'crop-flip',
        42,
        0,
    )
    assert (args.checkpoints_total_limit, args.log_every, args.eval_every, args.gradient_accumulation_steps) == (
        3,
        20,
        1,
        1,
    )
    monkeypatch.setattr(train_config.torch.cuda, 'is_available', lambda: True)
    assert TrainConfig.from_argv([]).num_workers == 4
    assert TrainConfig.from_argv(['--num-workers', '0']).num_workers == 0
    assert TrainConfig.from_argv(['--eval-batch-size', '5']).eval_batch_size == 5
    assert TrainConfig.from_argv(['--batch-size', '3']).eval_batch_size == 6


def test_from_argv_model_kwargs_in_their_order_of_precedence(tmp_path):
    preset = PRESETS['cifar10_resnet']
    args = TrainConfig.from_argv(['--preset', 'cifar10_resnet'])
    assert args.model_kwargs == preset.get('model_kwargs', {})
    args = TrainConfig.from_argv(
        ['--model-kwargs', 'iterations=5', 'pose_dim=4', '--model-arg', 'iterations=6', '--iterations', '7']
    )
    assert args.model_kwargs == dict(QUICK['model_kwargs'], pose_dim=4, iterations=7)
    args = TrainConfig.from_argv(['--model-arg', 'routing=x', '--routing', 'sequential', '--no-layer-norm'])
    assert args.model_kwargs['routing'] == 'sequential' and args.model_kwargs['layer_norm'] is False
    assert 'activations' not in args.model_kwargs and 'iterations' not in args.model_kwargs
    args = TrainConfig.from_argv(['--activations'])
    assert args.model_kwargs['activations'] is True and 'layer_norm' not in args.model_kwargs
    # local-dir: and hf-hub: are taken as they are; the checkpoint folder must exist
    assert TrainConfig.from_argv(['--model', f'local-dir:{tmp_path}']).model_kwargs == {}
    assert TrainConfig.from_argv(['--model', 'hf-hub:a/b']).model == 'hf-hub:a/b'
    assert TrainConfig.from_argv(['--resume-from-checkpoint', str(tmp_path)]).resume_from_checkpoint == str(tmp_path)
    assert TrainConfig.from_argv(['--resume-from-checkpoint', 'latest']).resume_from_checkpoint == 'latest'
    with pytest.raises(SystemExit) as stop:
        TrainConfig.from_argv(['--resume-from-checkpoint', str(tmp_path / 'none')])
    assert stop.value.code == f'{PROG}: error: checkpoint {tmp_path / "none"} does not exist'
    (tmp_path / 'file').write_text('')
    with pytest.raises(SystemExit):
        TrainConfig.from_argv(['--resume-from-checkpoint', str(tmp_path / 'file')])
    with pytest.raises(SystemExit) as stop:
        TrainConfig.from_argv(['--model', 'capsnet_simpel_cifar10'])
    assert stop.value.code == f"{PROG}: error: unknown model 'capsnet_simpel_cifar10'; " + closest_models(
        'capsnet_simpel_cifar10'
    )


def test_from_argv_takes_the_preset_under_the_command_line():
    for name, preset in PRESETS.items():
        args = TrainConfig.from_argv(['--preset', name])
        for key, value in preset.items():
            if key != 'model_kwargs':
                assert getattr(args, key) == value, (name, key)
        assert args.model_kwargs == preset.get('model_kwargs', {}), name
    args = TrainConfig.from_argv(['--preset', 'cifar10_resnet', '--batch-size', '7', '--opt', 'adam'])
    assert (args.batch_size, args.opt, args.eval_batch_size) == (7, 'adam', 14)


def test_resolved_and_for_trackers_are_json_ready(tmp_path):
    args = TrainConfig.from_argv(['--output-dir', str(tmp_path), '--print-config', '--model-arg', 'pose_dim=4'])
    args.path = tmp_path
    resolved = args.resolved()
    assert not {'model_kwargs_cli', 'model_arg_cli', 'print_config'} & set(resolved)
    expected = {
        k: v for k, v in vars(args).items() if k not in ('model_kwargs_cli', 'model_arg_cli', 'print_config', 'path')
    }
    assert {k: v for k, v in resolved.items() if k != 'path'} == expected
    assert resolved['path'] == str(tmp_path) and resolved['resume_from_checkpoint'] is None
    assert resolved['model_kwargs'] == dict(QUICK['model_kwargs'], pose_dim=4)
    json.dumps(resolved, allow_nan=False)
    trackers = args.for_trackers()
    assert set(trackers) == set(resolved)
    for key, value in resolved.items():
        if isinstance(value, (int, float, str, bool)):
            assert trackers[key] == value and type(trackers[key]) is type(value), key
        else:
            assert trackers[key] == str(value), key
    assert trackers['resume_from_checkpoint'] == 'None' and trackers['extra_test_splits'] == '[]'


if __name__ == '__main__':
    json.dump(snapshot(), sys.stdout, indent=1)
    print()


def test_help_shows_the_quick_run_s_values_as_defaults(capsys, monkeypatch):
    monkeypatch.setenv('COLUMNS', '200')
    with pytest.raises(SystemExit) as done:
        TrainConfig.from_argv(['--help'])
    assert done.value.code == 0
    text = capsys.readouterr().out
    flat = ' '.join(text.split())
    helps = {a.dest: ' '.join(a.help.split()) for a in build_parser()._actions}
    shown = [key for key, value in QUICK.items() if key in helps and value not in (None, [], False)]
    assert len(shown) >= 8, shown
    for key in shown:
        assert f'{helps[key]} (default: {QUICK[key]})' in flat, key
    assert build_parser().formatter_class is HelpFormatter
    assert 'seed of the initialisation, shuffling and training images (default: 42)' in text
