"""Tests of timm_capsules/train/metrics.py: evaluation on hand-made confusions (top-1, top-5, exact match, F1,
the loss at the evaluation margin), the threshold each output type implies, the chance level, the training
curves and the CNN reference (package data, shown only for the exact recipe it was measured with)."""

import json
from pathlib import Path
import math

import pytest
import torch
import torch.nn.functional as F

import timm
import timm_capsules  # noqa: F401
from timm_capsules.train.config import TrainConfig
from timm_capsules.train.metrics import CNN_REFERENCE, cnn_reference, correct, evaluate, plot_curves

from train_fixtures import ROOT, expected_losses


# ------------------------------------------------------------------------- evaluation, on known confusions
class Table(torch.nn.Module):
    """A model whose outputs we choose: input i (an image index) -> row i of a fixed table."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer('table', table)

    def forward(self, index):
        return self.table[index]


def evaluate_table(accelerator, table, targets, multi_label, returns, batch_size):
    data = torch.utils.data.TensorDataset(torch.arange(len(targets)), targets)
    loader = accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=batch_size))
    return evaluate(Table(table), loader, accelerator, multi_label, table.shape[1], returns)


def ranked_scores(targets, ranks, levels):
    """Scores in [0, 1] (valid logits, lengths and activations alike) in which image i's true class has the
    ranks[i]-th highest score (0: the highest)."""
    rows = []
    for target, rank in zip(targets, ranks):
        order = [c for c in range(len(levels)) if c != target]
        order.insert(rank, target)  # order[p]: the class with the p-th highest score
        rows.append(torch.empty(len(levels)).index_copy_(0, torch.tensor(order), torch.tensor(levels)))
    return torch.stack(rows)


@pytest.mark.parametrize('returns', ['logits', 'lengths', 'activations'])
def test_evaluate_single_label_top1_top5_and_loss(accelerator, returns):
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    # 6 classes: top-1 hits images 0 and 4 (rank 0), top-5 all but images 3 and 6 (rank 5, the last)
    scores = ranked_scores(targets.tolist(), [0, 1, 4, 5, 0, 2, 5], [0.95, 0.8, 0.6, 0.4, 0.2, 0.05])
    metrics = evaluate_table(accelerator, scores, targets, False, returns, batch_size=3)  # 3 + 3 + 1
    losses = expected_losses(scores, F.one_hot(targets, 6).float(), returns, False)
    assert metrics == pytest.approx(dict(num_images=7, top1=2 / 7, top5=5 / 7, loss=losses.mean().item()), rel=1e-6)


@pytest.mark.parametrize('returns', ['logits', 'lengths', 'activations'])
def test_evaluate_multi_label_f1_and_exact_match(accelerator, returns):
    actual = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0]]).bool()
    predicted = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]]).bool()
    # per class (tp, fp, fn): 0: (3, 0, 1), 1: (2, 0, 0), 2: (1, 1, 1), 3: (0, 0, 0); F1 = 2tp / (2tp + fp + fn),
    # and 0 for class 3, which is neither present nor predicted anywhere
    f1 = [2 * 3 / (2 * 3 + 0 + 1), 2 * 2 / (2 * 2 + 0 + 0), 2 * 1 / (2 * 1 + 1 + 1), 0.0]
    # 0.9 / 0.7: predicted rightly / wrongly; 0.1 / 0.3: absent rightly / wrongly (thresholds 0.5, logits 0)
    scores = torch.where(predicted, torch.where(actual, 0.9, 0.7), torch.where(actual, 0.3, 0.1))
    scores = scores - 0.5 if returns == 'logits' else scores
    metrics = evaluate_table(accelerator, scores, actual.float(), True, returns, batch_size=2)  # 2 + 2 + 1
    losses = expected_losses(scores, actual.float(), returns, True)
    assert metrics.pop('per_class_f1') == pytest.approx(f1, rel=1e-6)
    assert metrics == pytest.approx(
        dict(
            num_images=5,
            exact_match=2 / 5,
            macro_f1=sum(f1) / 4,  # images 0 and 4
            loss=losses.mean().item(),
        ),
        rel=1e-6,
    )


def test_threshold_follows_what_the_model_returns():
    assert timm.create_model('dynamic_capsnet_vector_multimnist', device='meta').output_type == 'lengths'
    assert timm.create_model('em_capsnet_simple_cifar10', device='meta').output_type == 'activations'
    assert timm.create_model('cnn_baseline_multimnist', device='meta').output_type == 'logits'
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.7, 0.4]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert correct(scores, targets, True, 'lengths').tolist() == [True, False]  # 0.4 < 0.5: digit missed
    assert correct(scores, targets, True, 'logits').tolist() == [False, False]  # logits: every class > 0
    assert correct(scores - 0.5, targets, True, 'logits').tolist() == [True, False]
    assert correct(scores, torch.tensor([0, 2]), False).tolist() == [True, False]  # top-1: 0.7 beats 0.4


def test_training_curves_name_the_run_and_draw_chance_and_reference(tmp_path):
    history = {
        'train': [dict(step=s, loss=1 / s, accuracy=0.1 * s) for s in (1, 2, 3)],
        'eval': [dict(step=3, loss=0.4, top1=0.5)],
    }
    fig = plot_curves(
        history,
        tmp_path / 'curves.png',
        'top1',
        'resnet18_cifar10 on cifar10 (hub)',
        0.125,
        ('CNN of similar size, same recipe', 0.625),
    )
    assert fig._suptitle.get_text() == 'resnet18_cifar10 on cifar10 (hub)'
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[1].get_lines()}
    assert lines['chance level 0.125'] == [0.125, 0.125]
    assert lines['CNN of similar size, same recipe 0.625'] == [0.625, 0.625]
    assert lines['test'] == [0.5] and (tmp_path / 'curves.png').is_file()
    fig = plot_curves(history, tmp_path / 'curves.png', 'top1', 'a run', 0.125)
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ['train (batches)', 'test', 'chance level 0.125']


def resolved_quick_args(argv=()):
    """parse_args as main resolves them: --max-train-steps from the epochs (DiverseMultiMNIST: epoch size / batch)."""
    args = TrainConfig.from_argv(list(argv))
    args.max_train_steps = args.max_train_steps or args.epochs * math.ceil(args.epoch_size / args.batch_size)
    return args


def test_cnn_reference_only_for_the_exact_recipe_it_was_measured_with():
    """The record is a CNN trained once with the quick run's recipe on the built-in sample: any other recipe,
    data, model or process count (a 60-step run among them) gets no reference."""
    record = json.loads(CNN_REFERENCE.read_text())
    for argv in ([], ['--max-train-steps', record['args']['max_train_steps']], ['--output-dir', 'elsewhere']):
        line = cnn_reference(resolved_quick_args(map(str, argv)), 'exact_match', 'sample')
        assert f'{record["num_parameters"]:,} parameters' in line, argv
        assert f'exact_match {record["final"]["exact_match"]:.4f}' in line
    for argv in (
        ['--max-train-steps', 60],
        ['--epochs', 2],
        ['--lr', 0.01],
        ['--batch-size', 64],
        ['--seed', 1],
        ['--opt', 'sgd'],
        ['--sched', 'none'],
        ['--epoch-size', 4096],
        ['--test-size', 100],
        ['--data-seed', 1],
        ['--mnist-source', 'hub'],
        ['--iterations', 3],
        ['--clip-grad', 1],
        ['--model-arg', 'pose_dim=4'],
        ['--model', 'cnn_baseline_multimnist'],
        ['--preset', 'multimnist_matrix'],
    ):
        assert cnn_reference(resolved_quick_args(map(str, argv)), 'exact_match', 'sample') == '', argv
    quick = resolved_quick_args()
    assert cnn_reference(quick, 'exact_match', 'hub:ylecun/mnist') == ''
    assert cnn_reference(quick, 'exact_match', 'sample', num_processes=2) == ''


def test_cnn_reference_lives_in_the_package_and_reads_nothing_from_benchmarks(monkeypatch):
    """The reference's numbers are package data (the record's metrics, copied): a run reads nothing under
    benchmarks/, which an installed package does not have."""
    from timm_capsules.train import metrics

    assert CNN_REFERENCE.parent == Path(metrics.__file__).parent
    record = json.loads((ROOT / 'benchmarks' / 'records' / 'default_run_cnn_cpu.json').read_text())['metrics']
    assert json.loads(CNN_REFERENCE.read_text()) == record  # the copy is the record
    opened = []
    real_read_text = Path.read_text

    def read_text(path, *args, **kwargs):
        opened.append(Path(path).resolve())
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, 'read_text', read_text)
    line = cnn_reference(resolved_quick_args(), 'exact_match', 'sample')
    assert f'exact_match {record["final"]["exact_match"]:.4f} (benchmarks/records/default_run_cnn_cpu.json)' in line
    assert opened and not any('benchmarks' in path.parts for path in opened), opened
