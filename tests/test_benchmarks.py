"""The benchmark harnesses run in a seconds-long smoke mode, so they cannot rot. No timing is asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))  # as when a script runs: its directory first (harness.py)


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_model_benchmark_smoke(capsys):
    bench = load('bench_models')
    result = bench.main(['--smoke', '--profile', '--models', 'capsnet_simple_cifar10:iterations=2', 'resnet18_cifar10'])
    rows = {row['model']: row for row in result['results']}
    assert set(rows) == {'capsnet_simple_cifar10:iterations=2', 'resnet18_cifar10'}
    for row in rows.values():
        assert 'error' not in row, row
        assert row['step_s'] > 0 and row['peak_memory_mb'] > 0 and row['train_gflop'] > 0
        assert row['inference_peak_memory_mb'] > 0 and row['profile'][0]['self_cpu_ms'] > 0
    assert rows['resnet18_cifar10']['step_time_vs_reference'] == 1.0
    assert rows['capsnet_simple_cifar10:iterations=2']['params'] == 561_297
    assert result['machine']['matmul_gflops'] > 0
    assert '"results"' in capsys.readouterr().out  # machine-readable JSON on stdout
    # the rendered table says how the models ran: eager here, compiled when the rows say so
    report = load('report')
    assert 'torch.compile' not in report.render_record('smoke.json', result)
    compiled = dict(result, results=[dict(row, compiled=True) for row in result['results']])
    assert 'every model `torch.compile`d' in report.render_record('smoke.json', compiled)


@pytest.mark.slow
def test_model_benchmark_smoke_bf16():
    """bf16 autocast through the harness (emulated on CPUs without bf16 units, so the small model only)."""
    result = load('bench_models').main(['--smoke', '--dtypes', 'bf16', '--models', 'capsnet_simple_cifar10'])
    (row,) = result['results']
    assert 'error' not in row, row
    assert row['dtype'] == 'bf16' and row['step_s'] > 0 and row['train_gflop'] > 0


@pytest.mark.slow
def test_model_benchmark_smoke_channels_last():
    """--channels-last converts every model and the input, as timm's train.py flag does, and says so per row."""
    result = load('bench_models').main(
        ['--smoke', '--channels-last', '--models', 'capsnet_simple_cifar10', 'resnet18_cifar10']
    )
    rows = {row['model']: row for row in result['results']}
    assert set(rows) == {'capsnet_simple_cifar10', 'resnet18_cifar10'}
    for row in rows.values():
        assert 'error' not in row, row
        assert row['channels_last'] is True and row['step_s'] > 0
    assert rows['capsnet_simple_cifar10']['step_time_vs_reference'] > 0
    report = load('report')
    assert 'every model and input channels-last' in report.render_record('smoke.json', result)
    contiguous = dict(result, results=[dict(row, channels_last=False) for row in result['results']])
    assert 'channels-last' not in report.render_record('smoke.json', contiguous)


def test_data_benchmark_smoke():
    results = load('bench_data').main(['--images', '2048', '--build', '128'])
    assert results['stream_batch128_images_per_s'] > 0
    assert results['load_dataset_read_array_numpy_images_per_s'] > 0


def test_em_benchmark_smoke(capsys):
    result = load('bench_em').main(['--smoke'])
    assert result['em_images_per_s'] > 0 and result['ida_images_per_s'] > 0 and result['em_over_ida'] > 0
    assert result['batch_size'] == 2 and result['threads'] >= 1
    assert '-march=native' in result['kernel_cflags'] and isinstance(result['environment'], dict)
    assert '"em_over_ida"' in capsys.readouterr().out  # one JSON object on stdout


def test_routing_kernel_benchmark_smoke(capsys, monkeypatch):
    """The kernel alone, fused against plain ops, on every capsule layer of the paper's CIFAR stack; rendered,
    with the kernel's build flags and the allocator setting it ran under recorded."""
    tunables = 'glibc.malloc.trim_threshold=268435456'  # read by glibc at a process's start: no effect here
    monkeypatch.setenv('GLIBC_TUNABLES', tunables)
    monkeypatch.delenv('LD_PRELOAD', raising=False)
    record = load('bench_routing').main(['--smoke', '--threads', '1'])
    from timm_capsules.kernels import KERNEL_CFLAGS

    assert record['machine']['kernel_cflags'] == ' '.join(KERNEL_CFLAGS)
    assert record['machine']['environment']['GLIBC_TUNABLES'] == tunables
    assert 'LD_PRELOAD' not in record['machine']['environment']
    assert f'`GLIBC_TUNABLES={tunables}`' in load('report').render_record('smoke.json', record)
    assert [r['layer'] for r in record['results']] == [layer[0] for layer in load('bench_routing').LAYERS]
    for row in record['results']:
        assert row['batch'] == 2 and row['fused_step_ms'] > 0 and row['plain_step_ms'] > 0
        assert row['step_gflop'] > row['forward_gflop'] > 0  # the FLOP counter sees the fused op's backward too
    assert record['machine']['threads'] == 1 and '"results"' in capsys.readouterr().out
    rendered = load('report').render_record('smoke.json', record)
    assert '| conv 16x16 -> 7x7 (k3 s2), batch 2 |' in rendered and ', 1 thread, ' in rendered


def test_report_renders_every_committed_result():
    """docs/performance.md's tables are rendered from every file in benchmarks/results, EM's throughput included."""
    results = sorted((BENCHMARKS / 'results').glob('*.json'))
    table = load('report').render(results)
    for path in results:
        assert f'**`{path.name}`**' in table
    em = json.loads((BENCHMARKS / 'results' / 'em_throughput_cpu.json').read_text())
    assert f'**{em["em_over_ida"]:.2f}×**' in table
