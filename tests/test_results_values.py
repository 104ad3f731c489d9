"""``timm_capsules/train/results.py`` checked by value on hand-made runs (a small real model, the config, accelerator,
data and training state as plain objects): the opening line and the closing lines written out by hand, and
metrics.json's record field by field (images seen as steps x batch x accumulation x processes, the parameters
counted by hand, the weights' digest recomputed with hashlib). Written for a mutmut run (tests/README.md); fast,
nothing is trained."""

import hashlib
import types

import pytest
import torch
from torch import nn

from timm_capsules.train import results
from timm_capsules.train.results import RunResult, describe_run, results_record, summary


def config(**fields):
    values = dict(
        model='m_net',
        preset='quick',
        dataset='hf:d',
        batch_size=16,
        gradient_accumulation_steps=3,
        output_dir='out/run',
    )
    values.update(fields)
    trackers = dict(values, lr=0.5)
    return types.SimpleNamespace(**values, for_trackers=lambda: trackers)


def accelerator(processes=2):
    return types.SimpleNamespace(num_processes=processes, device=torch.device('cpu'), mixed_precision='bf16')


def data(multi_label=False):
    return types.SimpleNamespace(source='the source', multi_label=multi_label, chance=0.125)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 5, bias=False))  # 3 * 2 + 2 + 2 * 5 = 18 parameters


def digest_by_hand(module):
    h = hashlib.sha256()
    for name in sorted(module.state_dict()):
        h.update(name.encode() + module.state_dict()[name].numpy().tobytes())
    return h.hexdigest()


def test_describe_run_by_hand():
    line = describe_run(config(), accelerator(), model(), {'a': 1}, data(), 4, 25)
    assert line == (
        "m_net {'a': 1} (18 parameters) on hf:d (the source): 4 epochs x 25 steps, batch 16 x 2 processes x 3 "
        'accumulation, cpu, mixed precision bf16'
    )
    big = nn.Linear(1000, 1)
    assert '(1,001 parameters)' in describe_run(config(), accelerator(1), big, {}, data(), 1, 1)


@pytest.mark.parametrize('multi_label', [False, True])
def test_results_record_field_by_field(multi_label):
    net = model()
    evals = [{'step': 3, 'top1': 0.125}, {'step': 5, 'top1': 0.25}, {'step': 10, 'top1': 0.5}]
    history = {'train': [{'step': 1}], 'eval': evals}
    state = types.SimpleNamespace(completed_steps=10, history=history)
    times = dict(training_time_s=7.5, kernel_load_s=0.0, wall_time_s=9.0)
    extra = {'test_x': {'top1': 0.75}}
    record = results_record(config(), accelerator(), data(multi_label), net, {'k': 2}, state, 4, extra, times)
    assert record == dict(
        model='m_net',
        model_kwargs={'k': 2},
        preset='quick',
        dataset='hf:d',
        data_source='the source',
        task='multi-label' if multi_label else 'single-label',
        metric='exact_match' if multi_label else 'top1',
        final={'step': 10, 'top1': 0.5},
        extra_tests=extra,
        chance_level=0.125,
        completed_steps=10,
        epochs=4,
        images_seen=10 * 16 * 3 * 2,
        num_processes=2,
        num_parameters=18,
        training_time_s=7.5,
        kernel_load_s=0.0,
        wall_time_s=9.0,
        weights_sha256=digest_by_hand(net),
        args=config().for_trackers(),
        history=history,
    )
    assert list(record)[:3] == ['model', 'model_kwargs', 'preset'] and list(record)[-2:] == ['args', 'history']


def test_results_record_of_a_run_never_evaluated():
    state = types.SimpleNamespace(completed_steps=3, history={'train': [], 'eval': []})
    record = results_record(
        config(gradient_accumulation_steps=1), accelerator(1), data(), model(), {}, state, 1, {}, {}
    )
    assert record['final'] == {} and record['images_seen'] == 3 * 16 and record['extra_tests'] == {}


@pytest.fixture
def reference(monkeypatch):
    asked = []

    def line(config, metric, source, processes):
        asked.append((config, metric, source, processes))
        return ''

    monkeypatch.setattr(results, 'cnn_reference', line)
    return asked


def closing(**fields):
    values = dict(
        metric='top1',
        final={'top1': 0.98765, 'num_images': 100},
        kernel_load_s=0.0,
        completed_steps=42,
        extra_tests={},
        training_time_s=61.6,
    )
    values.update(fields)
    return values


def test_summary_by_hand(reference):
    cfg = config()
    assert summary(cfg, data(), closing(), 2) == (
        'final test top1: 0.9877 on 100 images after 42 steps\n'
        'chance level: 0.1250 (always the most frequent label)\n'
        '62 s of training; saved to out/run'
    )
    assert reference == [(cfg, 'top1', 'the source', 2)]
    two_splits = {'test_a': {'exact_match': 0.5, 'num_images': 7}, 'test_b': {'exact_match': 0.25, 'num_images': 8}}
    assert summary(cfg, data(True), closing(metric='exact_match', extra_tests=two_splits, kernel_load_s=1.0), 1) == (
        'final test exact_match: nan on 100 images after 42 steps\n'
        'test_a: exact_match 0.5000 (7 images)\n'
        'test_b: exact_match 0.2500 (8 images)\n'
        'chance level: 0.1250 (always the most frequent label set)\n'
        '62 s of training, routing kernel built/loaded in 1 s; saved to out/run'
    )


def test_summary_extra_splits_kernel_note_and_missing_final(reference):
    two_splits = {'test_a': {'top1': 0.5, 'num_images': 7}, 'test_b': {'top1': 0.25, 'num_images': 8}}
    lines = summary(config(), data(), closing(extra_tests=two_splits, kernel_load_s=12.4), 1).split('\n')
    assert lines[1:3] == ['test_a: top1 0.5000 (7 images)', 'test_b: top1 0.2500 (8 images)']
    assert lines[-1] == '62 s of training, routing kernel built/loaded in 12 s; saved to out/run'
    assert summary(config(), data(), closing(kernel_load_s=1.0), 1).endswith(
        ', routing kernel built/loaded in 1 s; saved to out/run'
    )
    assert summary(config(), data(), closing(kernel_load_s=0.99), 1).endswith('62 s of training; saved to out/run')
    first = summary(config(), data(True), closing(metric='exact_match', final={}), 1).split('\n')
    assert first[0] == 'final test exact_match: nan on 0 images after 42 steps'
    assert first[1] == 'chance level: 0.1250 (always the most frequent label set)'


def test_summary_shows_the_reference_line_when_there_is_one(monkeypatch):
    monkeypatch.setattr(results, 'cnn_reference', lambda config, metric, source, processes: f'REF {metric} {processes}')
    lines = summary(config(), data(), closing(), 3).split('\n')
    assert lines == [
        'final test top1: 0.9877 on 100 images after 42 steps',
        'chance level: 0.1250 (always the most frequent label)',
        'REF top1 3',
        '62 s of training; saved to out/run',
    ]


def test_run_result_fields():
    result = RunResult({'a': 1}, 'model', 'out')
    assert (result.metrics, result.model, result.output_dir) == ({'a': 1}, 'model', 'out')
    assert RunResult._fields == ('metrics', 'model', 'output_dir')
