"""What a run is scored with: per-image correctness, the evaluation over a whole test set (every image counted
once across processes), the chance level to beat, the recorded CNN reference for the quick run's exact recipe,
and the training curves."""

import json
from pathlib import Path

import torch

from timm_capsules.losses import EVALUATION_SPREAD_MARGIN, classification_loss, predicted_present
from timm_capsules.presets import get_preset

from .config import TrainConfig, build_parser

__all__ = ['correct', 'evaluate', 'cnn_reference', 'cnn_reference_record', 'plot_curves']

# a CNN of about the quick CapsNet's size trained once on the same images with the same recipe (docs/training.md):
# the metrics of the record CNN_REFERENCE_RECORD, copied into the package (a run reads nothing from benchmarks/)
CNN_REFERENCE = Path(__file__).resolve().parent / 'cnn_reference.json'
CNN_REFERENCE_RECORD = 'benchmarks/records/default_run_cnn_cpu.json'
# what makes a result comparable with the reference's: everything that changes the trained weights or what they
# are scored on, except the model (the quick CapsNet's against the record's CNN)
RECIPE_ARGS = (
    'preset',
    'pretrained',
    'dataset',
    'data_dir',
    'image_column',
    'label_column',
    'train_split',
    'test_split',
    'augment',
    'resize',
    'mnist_source',
    'epoch_size',
    'test_size',
    'data_seed',
    'opt',
    'lr',
    'momentum',
    'weight_decay',
    'batch_size',
    'epochs',
    'max_train_steps',
    'sched',
    'decay_milestones',
    'decay_rate',
    'warmup_epochs',
    'clip_grad',
    'gradient_accumulation_steps',
    'mixed_precision',
    'seed',
    'iterations',
    'routing',
    'layer_norm',
    'activations',
)


def cnn_reference_record(args, data_source, num_processes=1):
    """The recorded CNN run (its metrics.json) to show beside a run of the quick CapsNet with exactly the recipe
    and images the CNN was trained with (``args`` as main resolves them, ``--max-train-steps`` included;
    ``data_source``: the MNIST digits used), or None for any other run."""
    record = json.loads(CNN_REFERENCE.read_text())
    quick, ours = get_preset(None), args.for_trackers()
    # an option the record predates ran as its default
    defaults = build_parser().parse_args([], namespace=TrainConfig()).for_trackers()
    same = (
        args.model == quick['model']
        and args.model_kwargs == quick['model_kwargs']
        and num_processes == record['num_processes']
        and data_source == record['data_source']
        and all(ours[key] == record['args'].get(key, defaults[key]) for key in RECIPE_ARGS)
    )
    return record if same else None


def cnn_reference(args, metric_name, data_source, num_processes=1):
    """The line to print about the recorded CNN (see cnn_reference_record), or ''."""
    record = cnn_reference_record(args, data_source, num_processes)
    if record is None:
        return ''
    return (
        f'a CNN of similar size ({record["num_parameters"]:,} parameters) trained with the same recipe: '
        f'{metric_name} {record["final"][metric_name]:.4f} ({CNN_REFERENCE_RECORD})'
    )


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
        losses = classification_loss(
            outputs, targets, output_type, multi_label, margin=EVALUATION_SPREAD_MARGIN, reduction='none'
        )
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
