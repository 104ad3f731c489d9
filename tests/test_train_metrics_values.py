"""``timm_capsules/train/metrics.py`` checked by value beyond tests/test_train_metrics.py: the training curves read
back from the figure (every line's points, style, colour and label, the axes' labels, titles, limits and grid) and
the PNG (its size at 100 dpi and its Title), ``evaluate``'s model modes and an empty test set, and the CNN
reference's line and defaults. Written for a mutmut run (tests/README.md); fast, nothing is trained."""

import json

import matplotlib
import pytest
import torch
from PIL import Image

from timm_capsules.train import metrics
from timm_capsules.train.metrics import CNN_REFERENCE, CNN_REFERENCE_RECORD, cnn_reference, evaluate, plot_curves

from train_fixtures import accelerator  # noqa: F401

matplotlib.use('Agg')

HISTORY = {
    'train': [dict(step=s, loss=1 / s, accuracy=0.1 * s) for s in (1, 2, 3, 4)],
    'eval': [dict(step=2, loss=0.6, top1=0.3), dict(step=4, loss=0.4, top1=0.5)],
}


def line_data(line):
    return list(line.get_xdata()), list(line.get_ydata())


def test_curves_every_line_by_hand(tmp_path):
    fig = plot_curves(HISTORY, tmp_path / 'c.png', 'top1', 'the run', 0.125, ('the CNN', 0.625))
    assert tuple(fig.get_size_inches()) == pytest.approx((10, 4.4))
    ax_loss, ax_acc = fig.axes
    train_loss, test_loss = ax_loss.get_lines()
    assert line_data(train_loss) == ([1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.25]) and train_loss.get_label() == 'train'
    assert line_data(test_loss) == ([2, 4], [0.6, 0.4]) and test_loss.get_label() == 'test'
    assert (train_loss.get_marker(), test_loss.get_marker(), test_loss.get_linestyle()) == ('None', 'o', '-')
    train_acc, test_acc, chance, reference = ax_acc.get_lines()
    assert line_data(train_acc) == ([1, 2, 3, 4], pytest.approx([0.1, 0.2, 0.3, 0.4]))
    assert train_acc.get_label() == 'train (batches)'
    assert line_data(test_acc) == ([2, 4], [0.3, 0.5]) and test_acc.get_label() == 'test'
    assert (test_acc.get_marker(), test_acc.get_linestyle()) == ('o', '-')
    assert list(chance.get_ydata()) == [0.125, 0.125] and chance.get_label() == 'chance level 0.125'
    assert (chance.get_color(), chance.get_linestyle()) == ('grey', ':')
    assert list(reference.get_ydata()) == [0.625, 0.625] and reference.get_label() == 'the CNN 0.625'
    assert (reference.get_color(), reference.get_linestyle()) == ('C2', '--')
    assert (ax_loss.get_xlabel(), ax_loss.get_ylabel(), ax_loss.get_title()) == ('optimizer step', 'loss', 'loss')
    assert (ax_acc.get_xlabel(), ax_acc.get_ylabel(), ax_acc.get_title()) == ('optimizer step', 'top1', 'test top1')
    assert ax_acc.get_ylim() == (0, 1)
    for ax in (ax_loss, ax_acc):
        gridlines = ax.xaxis.get_gridlines() + ax.yaxis.get_gridlines()
        assert all(g.get_visible() and g.get_alpha() == 0.3 for g in gridlines)
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == [line.get_label() for line in ax.get_lines()]
        assert all(
            t.get_fontsize() == matplotlib.font_manager.FontProperties(size='small').get_size()
            for t in legend.get_texts()
        )
    assert fig._suptitle.get_text() == 'the run'
    import matplotlib.pyplot as plt

    assert not plt.fignum_exists(fig.number)  # closed once saved


def test_curves_png_size_and_title(tmp_path):
    with matplotlib.rc_context({'figure.dpi': 50, 'savefig.dpi': 50}):  # 100 dpi whatever the settings
        plot_curves(HISTORY, tmp_path / 'c.png', 'top1', 'resnet on mnist (hub)', 0.5)
    with Image.open(tmp_path / 'c.png') as image:
        assert image.format == 'PNG' and image.size == (1000, 440)
        assert image.info['Title'] == 'resnet on mnist (hub)'


class Probe(torch.nn.Module):
    """Returns its inputs as scores and notes whether it was in training mode at each call."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return x


def test_evaluate_runs_the_model_in_eval_mode_and_gives_it_back_training(accelerator):  # noqa: F811
    model = Probe()
    loader = [(torch.eye(3), torch.arange(3))]
    result = evaluate(model, loader, accelerator, False, 3)
    assert model.modes == [False] and model.training
    assert result == pytest.approx(dict(num_images=3, loss=result['loss'], top1=1.0, top5=1.0))


def test_evaluate_of_an_empty_test_set(accelerator):  # noqa: F811
    assert evaluate(Probe(), [], accelerator, False, 3) == dict(num_images=0, loss=0.0, top1=0.0, top5=0.0)
    empty = evaluate(Probe(), [], accelerator, True, 3)
    assert empty == dict(num_images=0, loss=0.0, exact_match=0.0, per_class_f1=[0.0] * 3, macro_f1=0.0)


def test_evaluate_counts_multi_label_classes_as_longs(accelerator):  # noqa: F811
    """Two batches of one image, each predicted right for class 0 (logits above 0): tp adds to 2, F1 1."""
    loader = [(torch.tensor([[5.0, -5.0]]), torch.tensor([[1.0, 0.0]]))] * 2
    result = evaluate(Probe(), loader, accelerator, True, 2)
    assert result['per_class_f1'] == [1.0, 0.0] and result['exact_match'] == 1.0 and result['macro_f1'] == 0.5


def test_cnn_reference_line_by_hand(monkeypatch):
    record = json.loads(CNN_REFERENCE.read_text())
    asked = []
    monkeypatch.setattr(metrics, 'cnn_reference_record', lambda *a: asked.append(a) or record)
    line = cnn_reference('args', 'exact_match', 'sample')
    assert asked == [('args', 'sample', 1)]
    assert line == (
        f'a CNN of similar size ({record["num_parameters"]:,} parameters) trained with the same recipe: '
        f'exact_match {record["final"]["exact_match"]:.4f} ({CNN_REFERENCE_RECORD})'
    )
    assert CNN_REFERENCE_RECORD == 'benchmarks/records/default_run_cnn_cpu.json' and ',' in line.split('(')[1]
    cnn_reference('args', 'exact_match', 'sample', 4)
    assert asked[-1] == ('args', 'sample', 4)
    monkeypatch.setattr(metrics, 'cnn_reference_record', lambda *a: None)
    assert cnn_reference('args', 'exact_match', 'sample') == ''


def test_curves_side_by_side(tmp_path):
    fig = plot_curves(HISTORY, tmp_path / 'c.png', 'top1', 'the run', 0.125)
    ax_loss, ax_acc = (ax.get_position() for ax in fig.axes)
    assert ax_loss.x1 < ax_acc.x0 and (ax_loss.y0, ax_loss.y1) == pytest.approx((ax_acc.y0, ax_acc.y1))


def test_correct_reads_logits_by_default():
    """Multi-label scores thresholded at 0 unless the model returns lengths or activations (thresholded at 0.5)."""
    scores, targets = torch.tensor([[0.3, -0.2], [0.7, 0.1]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert metrics.correct(scores, targets, True).tolist() == [True, True]
    assert metrics.correct(scores, targets, True, 'lengths').tolist() == [False, False]


def test_cnn_reference_record_for_one_process_by_default():
    from timm_capsules.train.config import TrainConfig

    args = TrainConfig.from_argv([])
    args.max_train_steps = args.max_train_steps or args.epochs * -(-args.epoch_size // args.batch_size)
    record = json.loads(CNN_REFERENCE.read_text())
    assert record['num_processes'] == 1
    assert metrics.cnn_reference_record(args, 'sample') == record
    assert metrics.cnn_reference_record(args, 'sample', 2) is None
