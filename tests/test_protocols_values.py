"""``timm_capsules/experiments/protocols.py`` checked by value: each recipe's arguments, prose, image budget and model
input against the committed records of its runs (written when they ran: each holds its ``train_args``, whose first
part is the recipe's arguments, its protocol's words, its image budget and its model's arguments), and a recipe
written here by hand for what no committed recipe uses (a dict value without a kind, the augmentation's and the
optimiser's words, a missing ``folder``). Written for a mutmut run (tests/README.md); fast, nothing is trained."""

import json
from pathlib import Path

import pytest

from timm_capsules.experiments import protocols
from timm_capsules.experiments.protocols import (
    CPU_RECIPES,
    GPU_RECIPES,
    PAPER_AFFINE,
    RECIPES,
    Recipe,
    protocol_of,
)

ROOT = Path(__file__).resolve().parents[1]
OLDER_MULTIMNIST = "models about 0.13M parameters (the paper's: 10-42M)"
DATA = Path('outputs/experiments/data')  # the data directory of the committed runs


def committed(scale):
    return [json.loads(path.read_text()) for path in sorted((ROOT / 'results' / scale).glob('*.json'))]


def recipe_part(train_args):
    """A run's train_args up to its model: the recipe's arguments."""
    return train_args[: train_args.index('--model')]


# ---- against the committed records ----------------------------------------------------------------------------


@pytest.mark.parametrize('scale', ['cpu', 'gpu'])
def test_argv_is_the_committed_runs_arguments(scale):
    records = committed(scale)
    assert records
    for record in records:
        recipe = RECIPES[scale][record['dataset']]
        epochs = recipe_part(record['train_args'])
        epochs = epochs[epochs.index('--epochs') + 1]
        override = {} if epochs == str(recipe.arguments['epochs']) else {'epochs': int(epochs)}
        argv = recipe.argv(DATA, record['row']['kind'], **override)
        assert argv == recipe_part(record['train_args']), record['run_id']


@pytest.mark.parametrize('scale', ['cpu', 'gpu'])
def test_protocol_is_the_committed_runs_words(scale):
    """Word for word the prose of the dataset's runs; three DiverseMultiMNIST runs carry an older sentence (one
    model's size, before the CNNs joined the study)."""
    older = {r['run_id'] for r in committed(scale) if r['protocol'].endswith(OLDER_MULTIMNIST)}
    assert len(older) == (3 if scale == 'cpu' else 0)
    for record in committed(scale):
        if record['run_id'] not in older:
            assert RECIPES[scale][record['dataset']].protocol() == record['protocol'], record['run_id']
            assert protocol_of(scale, record['dataset']) == record['protocol']


def test_image_budget_is_the_cpu_runs_images():
    """The cpu runs see exactly their budget (the epoch sizes are whole batches); an overridden epoch count too."""
    for record in committed('cpu'):
        recipe = CPU_RECIPES[record['dataset']]
        args = record['train_args']
        epochs = int(args[args.index('--epochs') + 1])
        assert recipe.image_budget(epochs) == record['image_budget'], record['run_id']
        if epochs == recipe.arguments['epochs']:
            assert recipe.image_budget() == record['image_budget']
            assert recipe.image_budget(None) == record['image_budget']


def test_image_budget_of_the_gpu_runs_within_a_batch():
    """The gpu runs' last batch is whole, so the images seen exceed the budget by less than a batch."""
    recipe = GPU_RECIPES['fashion_mnist']
    for record in committed('gpu'):
        assert 0 <= record['image_budget'] - recipe.image_budget() < recipe.arguments['batch_size']
    assert recipe.image_budget() == 2 * 60000


def test_model_input_is_in_the_committed_runs_model_arguments():
    """Every capsule run is built with its recipe's model input (the fashion CNNs build on in_chans alone)."""
    for scale in ('cpu', 'gpu'):
        for record in committed(scale):
            given = RECIPES[scale][record['dataset']].model_input()
            if record['row']['kind'] not in ('CNN', 'ResNet-18') or record['dataset'] != 'fashion_mnist':
                assert {k: record['model_kwargs'].get(k) for k in given} == given, record['run_id']


# ---- by hand -----------------------------------------------------------------------------------------------------


def test_model_input_by_hand():
    assert CPU_RECIPES['fashion_mnist'].model_input() == {'in_chans': 1, 'img_size': 28}
    assert CPU_RECIPES['affine_mnist'].model_input() == {'img_size': 40}
    assert PAPER_AFFINE.model_input() == {'img_size': 40}
    assert CPU_RECIPES['diverse_multimnist'].model_input() == {}
    given = CPU_RECIPES['fashion_mnist'].model_input()
    given['in_chans'] = 3  # a copy: the recipe keeps its own
    assert CPU_RECIPES['fashion_mnist'].model_input() == {'in_chans': 1, 'img_size': 28}


def test_argv_by_hand():
    assert GPU_RECIPES['fashion_mnist'].argv(Path('d'), 'DR') == [
        '--dataset',
        'hf:d/fashion_mnist',
        '--epochs',
        '2',
        '--batch-size',
        '128',
        '--opt',
        'adam',
        '--lr',
        '0.001',
        '--weight-decay',
        '0',
        '--sched',
        'cosine',
        '--warmup-epochs',
        '0',
        '--augment',
        'crop-flip',
        '--mixed-precision',
        'bf16',
    ]
    assert CPU_RECIPES['diverse_multimnist'].argv(Path('d'))[:8] == [
        '--dataset',
        'diverse_multimnist',
        '--mnist-source',
        'sample',
        '--epoch-size',
        '8192',
        '--test-size',
        '2000',
    ]
    assert PAPER_AFFINE.argv(Path('/x'))[:2] == ['--dataset', 'hf:/x/affine_mnist_full']
    # an override replaces a value in its place, and a new one comes last
    argv = CPU_RECIPES['affine_mnist'].argv(Path('d'), batch_size=7, label_smoothing=0.1)
    assert argv[argv.index('--batch-size') + 1] == '7' and argv[-2:] == ['--label-smoothing', '0.1']
    assert CPU_RECIPES['affine_mnist'].argv(Path('d'))[-12:-10] == ['--batch-size', '32']


def test_a_recipe_without_folder_or_kind():
    """Facts fill the string values; without a ``folder`` fact none is made; a dict value is picked by kind."""
    recipe = Recipe(
        'x',
        dict(dataset='plain', train_split='train[:{n}]', lr={'A': 1, 'B': 2}, some_flag_name=True),
        dict(n=5),
    )
    assert recipe.argv(Path('data'), 'B') == [
        '--dataset',
        'plain',
        '--train-split',
        'train[:5]',
        '--lr',
        '2',
        '--some-flag-name',
        'True',
    ]
    with pytest.raises(KeyError):
        recipe.argv(Path('data'))  # no kind for a per-kind value
    assert recipe.model_input() == {}


def test_protocol_words_by_hand():
    prose = '{epochs_words}|{optimizer}|{augmentation}|{input_arguments}|{lr}|{n:,}|{mark}'
    for epochs, words in ((1, 'one epoch'), (2, '2 epochs'), ('1', 'one epoch'), (0, '0 epochs')):
        recipe = Recipe('x', dict(epochs=epochs, opt='sgd', lr=0.5), dict(n=12345, mark='m'), prose)
        assert recipe.protocol() == f'{words}|SGD|||0.5|12,345|m'
    recipe = Recipe(
        'x',
        dict(epochs=3, opt='adam', lr='2e-3', augment='crop-flip'),
        dict(n=1, mark='', model_input=dict(in_chans=1, img_size=28)),
        prose,
    )
    assert recipe.protocol() == (
        '3 epochs|Adam|light augmentation (pad 4 + random crop + horizontal flip)|in_chans=1, img_size=28|2e-3|1|'
    )
    recipe = Recipe('x', dict(epochs=1, opt='adam', augment='none'), dict(model_input=dict(img_size=40)), prose[:59])
    assert recipe.protocol() == 'one epoch|Adam|no augmentation|img_size=40'
    unknown = Recipe('x', dict(epochs=1, opt='adam', augment='mixup'), {}, '{augmentation}')
    assert unknown.protocol() == ''


def test_protocol_of_by_hand():
    assert protocol_of('cpu', 'fashion_mnist') == CPU_RECIPES['fashion_mnist'].protocol()
    assert protocol_of('cpu', 'fashion_mnist').startswith(protocols.FASHION_MNIST + ': the first 12,800 training')
    assert protocol_of('gpu', 'fashion_mnist') == GPU_RECIPES['fashion_mnist'].protocol()
    assert protocol_of('gpu', 'affine_mnist') == 'paper recipe'  # a dataset the scale has no recipe for
    assert protocol_of('paper', 'affine_mnist') == 'paper recipe'
    assert protocol_of('nowhere', 'cifar10') == 'paper recipe'
