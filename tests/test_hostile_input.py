"""Hostile and careless input: configs whose sizes would exhaust memory, and what a user can get wrong
before, during and after a run. Each case gives one error line naming the input, and loses nothing."""

import json
import re
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import timm
from timm.models import save_for_hf

import timm_capsules  # noqa: F401
from timm_capsules import hub, loading
from timm_capsules.loading import ConfigError

from hub_cache import offline_hub_cache
from train_fixtures import ENV, SCRIPT  # the training script and its offline environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    """An untrained capsnet_simple_cifar10 saved as timm saves it (config.json + model.safetensors)."""
    folder = tmp_path_factory.mktemp('checkpoint') / 'capsnet'
    save_for_hf(timm.create_model('capsnet_simple_cifar10'), folder, safe_serialization=True)
    return folder


def _with_args(checkpoint: Path, folder: Path, **model_args) -> Path:
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['model_args'].update(model_args)
    if 'num_classes' in model_args:
        config['num_classes'] = config['pretrained_cfg']['num_classes'] = model_args['num_classes']
        config['pretrained_cfg'].pop('label_names')
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


# ---- the memory budget -----------------------------------------------------------------------------------

# the oversized configs (each asked for 2 GB to 1.8 TB), and two that pass every per-argument bound but
# not the budget; case: (model_args, what the one-line error says)
OVERSIZED = {
    'img_size 10**6': (dict(img_size=10**6), r'input_size entries must be at most 65536'),
    'img_size 4096': (dict(img_size=4096), r'GiB of parameters.*over the memory budget of 8 GiB .*img_size=4096'),
    'capsule layer of 100,000': (
        dict(capsule_layers=[['conv', 100000, 3, 2], ['conv', 32, 3, 1]]),
        r'model_args.capsule_layers must be at most 65536, got 100000',
    ),
    'capsule layer of 10**7': (
        dict(capsule_layers=[['fc', 10**7]]),
        r'model_args.capsule_layers must be at most 65536, got 10000000',
    ),
    'out_chs 10**6': (
        dict(backbone_args=dict(out_chs=10**6)),
        r'model_args.backbone_args.out_chs must be at most 65536, got 1000000',
    ),
    'pose_dim 10**6': (dict(pose_dim=10**6), r'model_args.pose_dim must be at most 65536, got 1000000'),
    'primary_caps 10**6': (dict(primary_caps=10**6), r'model_args.primary_caps must be at most 65536, got 1000000'),
    'num_classes 10**8': (dict(num_classes=10**8), r'num_classes must be at most 65536, got 100000000'),
    'capsule_layers 100,000 long': (
        dict(capsule_layers=[['fc', 10]] * 100000),
        r'model_args.capsule_layers must hold at most 256 entries, got 100000',
    ),
    'capsule layer of 50,000 (budget)': (
        dict(capsule_layers=[['conv', 50000, 3, 2]]),
        r'GiB of activations for one image, over the memory budget .*capsule_layers=\[\["conv", 50000, 3, 2\]\]',
    ),
    'primary_caps 60,000 (budget)': (dict(primary_caps=60000), r'over the memory budget .*primary_caps=60000'),
}


def test_oversized_configs_are_refused_in_a_second_without_allocating(checkpoint, tmp_path):
    """Each case in a fresh process: refused with one line naming config.json and the argument, in under a
    second of CPU time each, while the process's peak memory grows by less than 200 MB (building any of them takes GBs)."""  # noqa: E501
    folders = {
        case: str(_with_args(checkpoint, tmp_path / f'case{i}', **args))
        for i, (case, (args, _)) in enumerate(sorted(OVERSIZED.items()))
    }
    script = textwrap.dedent("""
        import json, resource, sys, time
        import timm, timm_capsules
        from timm_capsules.loading import ConfigError
        timm.create_model('local-dir:' + sys.argv[2], pretrained=True)  # warm up: a valid one loads
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        results = {}
        for case, folder in json.loads(sys.argv[1]).items():
            start = time.process_time()  # CPU time: other work on a shared machine does not count
            try:
                timm.create_model('local-dir:' + folder, pretrained=True)
                results[case] = ['built', time.process_time() - start]
            except Exception as error:
                results[case] = [f'{type(error).__name__}: {error}', time.process_time() - start]
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps(dict(results=results, grown_mb=grown)))
    """)
    done = subprocess.run(
        [sys.executable, '-c', script, json.dumps(folders), str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for case, (message, seconds) in report['results'].items():
        path = Path(folders[case]) / 'config.json'
        assert message.startswith(f'ConfigError: {path}: '), (case, message)
        assert '\n' not in message, (case, message)
        assert re.search(OVERSIZED[case][1], message), (case, message)
        assert seconds < 1.0, (case, seconds)
    assert report['grown_mb'] < 200, report


@pytest.mark.parametrize('case', ['img_size 4096', 'pose_dim 10**6'])
def test_oversized_configs_are_refused_by_hub_check_and_hf_hub(checkpoint, tmp_path, case):
    args, message = OVERSIZED[case]
    folder = _with_args(checkpoint, tmp_path / 'repo', **args)
    with pytest.raises(ConfigError, match=f'^{folder / "config.json"}: .*{message}'):
        hub.check_checkpoint(folder)
    snapshot = hub.install_in_cache(folder, 'someone/huge', tmp_path / 'cache')
    with offline_hub_cache(tmp_path / 'cache'):
        with pytest.raises(ConfigError, match=f'config.json of hf-hub:someone/huge: .*{message}'):
            timm.create_model('hf-hub:someone/huge', pretrained=True)
    assert snapshot.is_dir()


def test_parse_tree_checkpoint_refuses_an_oversized_config(checkpoint, tmp_path):
    folder = _with_args(checkpoint, tmp_path / 'repo', img_size=4096)
    image = tmp_path / 'x.png'
    from PIL import Image

    Image.new('RGB', (32, 32)).save(image)
    done = subprocess.run(
        [
            sys.executable,
            '-m',
            'timm_capsules.parse_tree',
            str(image),
            '--checkpoint',
            str(folder),
            '--out',
            str(tmp_path / 'out'),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode != 0
    assert 'over the memory budget' in done.stderr and str(folder / 'config.json') in done.stderr
    assert 'Traceback' not in done.stderr, done.stderr[-2000:]


def test_memory_budget_is_set_by_the_environment(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(loading.MEMORY_LIMIT_ENV, '0.001')  # 1 MiB: the paper's model (2 MiB) is over it
    with pytest.raises(ConfigError, match=r'over the memory budget of 0.001 GiB \(set TIMM_CAPSULES_MEMORY_LIMIT_GB'):
        timm.create_model(f'local-dir:{checkpoint}', pretrained=True)
    timm.create_model('capsnet_simple_cifar10')  # only configs read from files are held to it
    monkeypatch.setenv(loading.MEMORY_LIMIT_ENV, 'lots')
    with pytest.raises(ConfigError, match="TIMM_CAPSULES_MEMORY_LIMIT_GB='lots': expected a positive number"):
        timm.create_model(f'local-dir:{checkpoint}', pretrained=True)
    monkeypatch.setenv(loading.MEMORY_LIMIT_ENV, '1')
    timm.create_model(f'local-dir:{checkpoint}', pretrained=True)


def test_memory_estimate_matches_the_built_model():
    from timm_capsules.capsnet import CapsNet

    model = timm.create_model('capsnet_simple_cifar10')
    weights, activations = loading.estimate_model_memory(
        CapsNet, dict(backbone_args=dict(out_chs=256), capsule_layers=[['conv', 32, 3, 2], ['conv', 32, 3, 1]])
    )
    assert weights == sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    assert 0 < activations < 2**30


# ---- the report never destroys ---------------------------------------------------------------------------


@pytest.fixture
def experiments(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # experiments.py imports train_accelerate.py from beside it
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    import experiments

    return experiments


def _readme(tmp_path: Path, experiments) -> Path:
    readme = tmp_path / 'README.md'
    readme.write_text(f'intro\n{experiments.BEGIN}\nthe results\n{experiments.END}\noutro\n')
    return readme


@pytest.mark.parametrize('records', ['missing', 'empty', 'only damaged'])
def test_report_write_refuses_without_records(experiments, tmp_path, records):
    readme = _readme(tmp_path, experiments)
    folder = tmp_path / 'records'
    if records != 'missing':
        (folder / 'cpu').mkdir(parents=True)
    if records == 'only damaged':
        run = experiments.plan('cpu', experiments.STUDIES, [0])[0]
        experiments.record_path(folder, 'cpu', run).write_text('{"run_id": "')
    why = 'no such records folder' if records == 'missing' else 'no sound run record of this scale'
    with pytest.raises(SystemExit, match=f'^{folder / "cpu"}: {why}; {readme} left as it is$'):
        experiments.main(
            ['report', '--records', str(folder), '--plots', str(tmp_path / 'plots'), '--write', str(readme)]
        )
    assert readme.read_text() == f'intro\n{experiments.BEGIN}\nthe results\n{experiments.END}\noutro\n'


DAMAGED = {  # case: (record text from a sound record, what the warning says)
    'truncated': (lambda r: json.dumps(r)[:40], 'not readable JSON'),
    'NaN metric': (
        lambda r: json.dumps(dict(r, metrics=dict(r['metrics'], top1=float('nan')))),
        "metrics that are not finite numbers: {'top1': nan}",
    ),
    'string metric': (
        lambda r: json.dumps(dict(r, metrics=dict(r['metrics'], top1='0.9'))),
        "metrics that are not finite numbers: {'top1': '0.9'}",
    ),
    'no metrics': (
        lambda r: json.dumps({k: v for k, v in r.items() if k != 'metrics'}),
        '"metrics" must be a dict, got None',
    ),
    'a list': (lambda r: '[1, 2]', 'not a JSON object'),
}


@pytest.mark.parametrize('case', sorted(DAMAGED))
def test_damaged_record_is_named_skipped_and_not_done(experiments, tmp_path, capsys, case):
    sys.path.insert(0, str(ROOT / 'tests'))
    from test_experiment_report import fake_record

    runs = [run for run in experiments.plan('cpu', experiments.STUDIES, [0]) if 'table1' in run.studies][:2]
    folder = tmp_path / 'records'
    paths = [experiments.record_path(folder, 'cpu', run) for run in runs]
    paths[0].parent.mkdir(parents=True)
    for run, path in zip(runs, paths):
        path.write_text(json.dumps(fake_record(run, 'cpu', 0.8)))
    text, message = DAMAGED[case]
    paths[1].write_text(text(fake_record(runs[1], 'cpu', 0.7)))
    readme = _readme(tmp_path, experiments)
    assert (
        experiments.main(
            ['report', '--records', str(folder), '--plots', str(tmp_path / 'plots'), '--write', str(readme)]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert f'warning: {paths[1]}: damaged run record, skipped (its run counts as not done): {message}' in err
    assert 'from the 1 run records' in readme.read_text()
    experiments.main(['table1', '--records', str(folder), '--seeds', '1', '--list'])
    out = capsys.readouterr()
    assert f'[done] {runs[0].run_id} ' in out.out and f'[todo] {runs[1].run_id} ' in out.out
    assert f'warning: {paths[1]}: damaged run record ({message}' in out.err


# ---- the smaller cases: one line naming the input ---------------------------------------------------------


def test_another_architecture_with_our_model_args_names_the_file(checkpoint, tmp_path):
    folder = _with_args(checkpoint, tmp_path / 'repo')
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps(dict(config, architecture='resnet18')))
    with pytest.raises(
        ConfigError,
        match=rf"^{folder / 'config.json'}: model_args has arguments \['img_size'\] that "
        r'resnet18 \(ResNet\) does not take',
    ):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    save_for_hf(timm.create_model('resnet18', num_classes=3), tmp_path / 'resnet', safe_serialization=True)
    assert timm.create_model(f'local-dir:{tmp_path / "resnet"}', pretrained=True).num_classes == 3  # as before


def test_deeply_nested_config_names_the_file(checkpoint, tmp_path):
    folder = _with_args(checkpoint, tmp_path / 'repo')
    (folder / 'config.json').write_text('[' * 100000 + ']' * 100000)
    with pytest.raises(ConfigError, match=f'^{folder / "config.json"}: nested too deeply to be a config.json$'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


@pytest.mark.parametrize('what', ['dataset', 'pretrained'])
def test_no_network_fails_at_once_with_the_offline_hint(tmp_path, what):
    """No HF_HUB_OFFLINE, and a Hub that does not answer (an endpoint nothing listens on): the run goes to the
    cache at once and stops with the hint, instead of a minute of retries and a chained traceback. "At once" is
    checked by what is printed (huggingface_hub logs each retry, so two lines in all mean none), not by a clock."""
    env = {k: v for k, v in ENV.items() if k not in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE')}
    env.update(HF_ENDPOINT='http://127.0.0.1:9', HF_HOME=str(tmp_path / 'hf'))
    argv = ['--dataset', 'cifar10'] if what == 'dataset' else ['--pretrained', '--mnist-source', 'sample']
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            '--model',
            'capsnet_simple_cifar10',
            *argv,
            '--output-dir',
            str(tmp_path / 'out'),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert (
        lines[0] == 'warning: the Hub (127.0.0.1) cannot be reached (Connection refused): using the local Hugging '
        'Face cache only'
    ), done.stderr[-3000:]
    assert len(lines) == 2 and 'Traceback' not in done.stderr
    if what == 'dataset':
        assert lines[1] == (
            "train_accelerate.py: error: cannot load split 'train' of uoft-cs/cifar10: the Hub (127.0.0.1) cannot be "
            'reached (Connection refused) and the local cache does not hold it; pass --data-dir DIR with a local '
            'copy (save_to_disk, parquet or imagefolder), or run once with network to fill the cache; '
            'HF_HUB_OFFLINE=1 uses the cache without trying the network'
        )
    else:
        assert (
            'no pretrained weights for capsnet_simple_cifar10.cifar10: HF_HUB_OFFLINE=1 and the Hugging Face '
            'cache' in lines[1]
        )
    assert not (tmp_path / 'out').exists()


def test_accelerate_launch_quiet_gives_the_one_line(tmp_path):
    """Under `accelerate launch`, the launcher wraps a failed child in its own CalledProcessError traceback;
    its --quiet flag leaves our one line (README: Checkpoints, resuming, stopping)."""
    file = tmp_path / 'a_file'
    file.write_text('')
    command = [
        sys.executable,
        '-m',
        'accelerate.commands.launch',
        '--quiet',
        '--num_processes',
        '1',
        '--num_machines',
        '1',
        '--mixed_precision',
        'no',
        '--dynamo_backend',
        'no',
        str(SCRIPT),
        '--output-dir',
        str(file),
    ]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip() == f'train_accelerate.py: error: --output-dir {file}: is a file, not a folder'


EXPORT_ARGS = {  # case: (arguments, the one line's end)
    'train size -5': ('export {out} --train-size -5', 'argument --train-size: must be from 0 to 1000000, got -5'),
    'sizes 0 0': ('export {out} --train-size 0 --test-size 0', '--train-size and --test-size are both 0: nothing'),
    'test size 10**8': (
        'export {out} --test-size 100000000',
        'argument --test-size: must be from 0 to 1000000, got 100000000',
    ),
    'canvas 20': ('export {out} --canvas-size 20', 'argument --canvas-size: must be from 28 to 1024, got 20'),
    'max shift 100': (
        'export {out} --max-shift 100',
        '--canvas-size 36 cannot hold a 28 px digit shifted by up to --max-shift 100 px (needs 228)',
    ),
    'max shift -3': ('export {out} --max-shift -3', 'argument --max-shift: must be from 0 to 498, got -3'),
    'preview count 0': ('preview {out}.png --count 0', 'argument --count: must be from 1 to 1000, got 0'),
    'seed -1': ('export {out} --seed -1', 'argument --seed: must be from 0 to 4294967295, got -1'),
    'seed 2**64': (f'export {{out}} --seed {2**64}', f'argument --seed: must be from 0 to 4294967295, got {2**64}'),
}


@pytest.mark.parametrize('case', sorted(EXPORT_ARGS))
def test_data_export_arguments_give_one_line_and_write_nothing(tmp_path, capsys, case):
    from timm_capsules.data import diverse_multimnist

    argv, message = EXPORT_ARGS[case]
    out = tmp_path / 'data'
    with pytest.raises(SystemExit) as stop:
        diverse_multimnist.main(argv.format(out=out).split())
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists() and not Path(f'{out}.png').exists()


def _idx_folder(folder: Path, labels) -> Path:
    from timm_capsules.data import mnist

    folder.mkdir()
    mnist.write_idx(folder / 't10k-images-idx3-ubyte', np.zeros((len(labels), 28, 28), np.uint8))
    mnist.write_idx(folder / 't10k-labels-idx1-ubyte', np.asarray(labels, np.uint8))
    return folder


def test_idx_labels_out_of_range_name_the_file(tmp_path, capsys):
    from timm_capsules.data import diverse_multimnist, mnist

    folder = _idx_folder(tmp_path / 'idx', [0, 1, 200, 3])
    with pytest.raises(
        ValueError,
        match=f'^{folder / "t10k-labels-idx1-ubyte"}: labels must be 0-9, found 200 '
        r'\(at index 2\)$',
    ):
        mnist.load_idx_folder(folder, 'test')
    with pytest.raises(SystemExit):
        diverse_multimnist.main(
            ['export', str(tmp_path / 'out'), '--source', str(folder), '--train-size', '0', '--test-size', '4']
        )
    err = capsys.readouterr().err
    assert (
        err.strip().splitlines()[-1].endswith('labels must be 0-9, found 200 (at index 2)') and 'Traceback' not in err
    )


def test_idx_header_is_checked_before_decompressing(tmp_path):
    """A small gzip whose header declares 2.35 GB: refused from its 16 header bytes, nothing expanded."""
    import gzip
    import time
    from timm_capsules.data import mnist

    path = tmp_path / 't10k-images-idx3-ubyte.gz'
    header = bytes([0, 0, 8, 3]) + b''.join(d.to_bytes(4, 'big') for d in (3_000_000, 28, 28))
    with gzip.open(path, 'wb', compresslevel=1) as f:
        f.write(header + bytes(1 << 20))
    started = time.perf_counter()
    with pytest.raises(
        ValueError,
        match=f'^{path}: IDX header declares 2352000000 bytes of data, more than the 1073741824 this reader takes',
    ):
        mnist.read_idx(path, mnist.IDX_IMAGES_MAGIC)
    assert time.perf_counter() - started < 1


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height (grey) and holds no pixels: enough for any reader's header check."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    path.write_bytes(
        b'\x89PNG\r\n\x1a\n'
        + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
        + chunk(b'IEND', b'')
    )
    return path


@pytest.mark.parametrize('case', ['text file', 'truncated PNG', '20000x20000 PNG'])
def test_parse_tree_bad_image_gives_one_line_and_no_out_folder(tmp_path, capsys, case):
    from PIL import Image
    from timm_capsules.parse_tree.cli import main

    path = tmp_path / ('notes.txt' if case == 'text file' else 'image.png')
    if case == 'text file':
        path.write_text('not an image')
        message = f'{path}: not a readable image (cannot identify image file'
    elif case == 'truncated PNG':
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:-200])
        message = f'{path}: not a readable image (image file is truncated'
    else:
        _png_header(path, 20000, 20000)
        message = f'{path}: not a readable image (Image size (400000000 pixels) exceeds limit'
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as stop:
        main([str(path), '--model', 'capsnet_simple_cifar10', '--out', str(out)])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_hub_push_dry_run_onto_a_file_names_that_file(checkpoint, tmp_path, capsys):
    file = tmp_path / 'upload'
    file.write_text('keep me')
    assert (
        hub.main(
            [
                'push',
                '--checkpoint',
                str(checkpoint),
                '--config',
                'capsnet_simple_cifar10.cifar10',
                '--dry-run',
                str(file),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == f'error: {file}: the dry-run folder is a file (give a new or empty folder)\n'
    assert file.read_text() == 'keep me'


@pytest.mark.parametrize(
    'argv, message',
    [
        (['export', '{out}', '--test-size', str(10**8)], '--test-size must be <= 1000000, got 100000000'),
        (['export', '{out}', '--seed', str(2**64)], f'--seed must be <= 4294967295, got {2**64}'),
        (['export', '{out}', '--train-size', '0', '--test-size', '0'], '--train-size and --test-size are both 0'),
    ],
)
def test_affine_export_sizes_and_seeds_are_bounded(tmp_path, capsys, argv, message):
    from timm_capsules.data import affine_mnist

    out = tmp_path / 'data'
    with pytest.raises(SystemExit):
        affine_mnist.main([a.format(out=out) for a in argv])
    assert message in capsys.readouterr().err and not out.exists()
