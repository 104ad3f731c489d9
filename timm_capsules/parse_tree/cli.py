"""``python -m timm_capsules.parse_tree``: routing introspection of a CapsNet on image files and DiverseMultiMNIST
test images, written as JSON, raw coefficients and pictures (see docs/parse_tree.md)."""

import argparse
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .analysis import (
    Iteration,
    class_heatmaps,
    class_names,
    class_primary_mass,
    digit_ownership,
    entropy_table,
    own_fraction,
    part_whole_probe,
    part_whole_tree,
    primary_receptive_fields,
    receptive_field_matrix,
    routing_summary,
    routing_trace,
)
from .inputs import DATASETS, diverse_multimnist_samples, display_image, load_images, model_dataset, prepare_arrays
from .plots import plot_entropy, plot_heatmaps, plot_part_whole_tree

__all__ = ['main', 'tree_file_names']

PROG = 'python -m timm_capsules.parse_tree'


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or more, got {value}')
    return value


def _iteration_option(text: str) -> Iteration:
    if text == 'used':
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an iteration index or 'used', got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Routing introspection of a timm_capsules CapsNet: class scores, routing coefficients, '
        'entropies and pose norms per layer and iteration (JSON), heat maps, part-whole trees, '
        'routing entropy plots and the DiverseMultiMNIST part-whole probe.',
    )
    parser.add_argument('images', nargs='*', help="image files (PNG/JPG), preprocessed with timm's data config")
    parser.add_argument('--model', help='timm model name, e.g. capsnet_matrix_multimnist')
    parser.add_argument(
        '--checkpoint',
        help='timm folder (config.json + model.safetensors), loaded with '
        'timm.create_model("local-dir:" + DIR, pretrained=True)',
    )
    parser.add_argument('--pretrained', action='store_true', help="load the model's published weights")
    parser.add_argument('--model-kwargs', help='JSON dict of create_model kwargs, e.g. \'{"iterations": 4}\'')
    parser.add_argument(
        '--dataset',
        choices=sorted(DATASETS),
        default=None,
        help="the model's dataset: class names, sigmoid scores for DiverseMultiMNIST, and whether "
        "--diverse-multimnist/--probe apply (default: the model's pretrained_cfg, its "
        "'dataset' field or pretrained tag)",
    )
    parser.add_argument(
        '--diverse-multimnist',
        type=_count,
        default=0,
        metavar='N',
        help='also inspect the first N two-digit DiverseMultiMNIST test images',
    )
    parser.add_argument('--mnist-source', default=None, help='MNIST digits: auto | sample | hub | IDX folder')
    parser.add_argument('--data-seed', type=int, default=0, help='DiverseMultiMNIST seed')
    parser.add_argument(
        '--probe',
        type=_count,
        default=0,
        metavar='N',
        help='run the part-whole probe on N two-digit DiverseMultiMNIST test images',
    )
    parser.add_argument('--ownership', choices=('soft', 'hard'), default='soft', help='probe ownership rule')
    parser.add_argument(
        '--iteration',
        type=_iteration_option,
        default=-1,
        help='coefficients for heat maps / trees / probe: an iteration index (default -1: '
        'the last) or "used" (those that fed the logits)',
    )
    parser.add_argument(
        '--heat',
        choices=('gain', 'mass'),
        default='gain',
        help='heat map of routing mass relative to the uniform first pass (gain) or raw (mass)',
    )
    parser.add_argument(
        '--top-k', type=_count, default=0, help='classes shown per image (default 2 for multi-label scores, else 1)'
    )
    parser.add_argument(
        '--multi-label',
        choices=('auto', 'yes', 'no'),
        default='auto',
        help='sigmoid scores (yes) or softmax (no); auto: yes for DiverseMultiMNIST',
    )
    parser.add_argument(
        '--save-raw',
        choices=('none', 'npz', 'safetensors'),
        default='none',
        help='also save every raw routing coefficient',
    )
    parser.add_argument('--tree-top', type=_count, default=6, help='capsules kept per layer in the tree')
    parser.add_argument('--dpi', type=int, default=100)
    parser.add_argument('--out', required=True, help='output folder')
    return parser


def _fail(message: str):
    """One line on stderr, status 2, no traceback: for an input the user named that is not there."""
    raise SystemExit(f'{PROG}: error: {message}')


def _check_inputs(args):
    """The files and folders the arguments name exist, before anything is built."""
    import difflib
    import timm
    import timm_capsules  # noqa: F401  (registers the models)

    if args.checkpoint and not (Path(args.checkpoint) / 'config.json').is_file():
        _fail(
            f'--checkpoint {args.checkpoint}: no trained model there (config.json + model.safetensors); train '
            f'one first, e.g. python train_accelerate.py --output-dir {args.checkpoint}'
        )
    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:
        _fail(f'no such image file: {", ".join(missing)}')
    if not args.checkpoint and args.model and not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=5, cutoff=0.6)
        _fail(f'unknown model {args.model!r}' + (f'; closest registered names: {", ".join(close)}' if close else ''))


def _create_model(args, parser):
    import timm
    import timm_capsules  # noqa: F401  (registers the models)
    from timm_capsules.loading import ConfigError, WeightsError, WeightsNotPublishedError

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    try:
        if args.checkpoint:
            model = timm.create_model('local-dir:' + str(args.checkpoint), pretrained=True, **kwargs)
        elif args.model:
            model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
        else:
            parser.error('give --model NAME or --checkpoint DIR')
    except (ConfigError, WeightsError, WeightsNotPublishedError) as error:
        parser.exit(1, f'{parser.prog}: error: {error}\n')  # says what and where: no traceback
    return model.eval()


def _raw_tensors(trace) -> Dict[str, Tensor]:
    """Logits and every routing coefficient, keyed image{b}/iteration{k}/{layer}."""
    tensors = {}
    for b in range(trace.logits.shape[0]):
        tensors[f'image{b}/logits'] = trace.logits[b].contiguous()
        for k, step in enumerate(trace.coefficients):
            for l, r in enumerate(step):
                tensors[f'image{b}/iteration{k + 1}/{trace.layer_names[l + 1]}'] = r[b].contiguous()
    return tensors


def tree_file_names(image_names: Sequence[str]) -> List[str]:
    """``tree_<image>.png`` for each image (its file name without the suffix), unique in the output folder."""
    files, seen = [], set()
    for name in image_names:
        stem = re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(name).stem if Path(name).suffix else name)
        file, n = f'tree_{stem}.png', 1
        while file in seen:
            n += 1
            file = f'tree_{stem}_{n}.png'
        seen.add(file)
        files.append(file)
    return files


def _draw_pictures(
    out: Path,
    model,
    trace,
    x: Tensor,
    names: List[str],
    masks: List[Optional[Tensor]],
    truths: List[Optional[List[int]]],
    classes: List[List[int]],
    trees: List[str],
    label_names: List[str],
    boxes: np.ndarray,
    args,
) -> None:
    """heatmaps.png (a row per image, a map per shown class), a tree per image and entropy.png."""
    titles = [
        n
        if t is None
        else f'{n}\ntrue: ' + ', '.join(f'{label_names[c]} ({colour})' for c, colour in zip(t, ('red', 'blue')))
        for n, t in zip(names, truths)
    ]
    heat = class_heatmaps(
        trace, range(model.num_classes), boxes, model.img_size, args.iteration, heat=args.heat
    )  # (B, H, W, classes)
    covered = (receptive_field_matrix(boxes, *model.img_size).sum(0) > 0).reshape(model.img_size).numpy()
    has_masks = any(m is not None for m in masks)
    mask_array = (
        np.stack([(m if m is not None else torch.zeros(2, *model.img_size)).numpy() for m in masks])
        if has_masks
        else None
    )
    primary_mass = class_primary_mass(trace, None, args.iteration).sum(3).flatten(1, 2)  # (B, P, classes)
    panel_titles = []
    for b, row in enumerate(classes):
        panel_titles.append([])
        for c in row:
            title = f'routes to "{label_names[c]}" (logit {float(trace.logits[b, c]):+.1f})'
            if truths[b] is not None and len(truths[b]) == 2 and c in truths[b]:
                owner = digit_ownership(boxes, torch.as_tensor(mask_array[b : b + 1]))[0]
                own = own_fraction(primary_mass[b, :, c], owner, truths[b].index(c))
                title += f'\n{own:.0%} of its digit mass from its own digit'
            panel_titles[b].append(title)
    heatmaps = [[np.where(covered, heat[b, :, :, c].numpy(), np.nan) for c in row] for b, row in enumerate(classes)]
    display = np.stack([display_image(model, image) for image in x])
    colour_label = 'routing gain over uniform routing' if args.heat == 'gain' else 'top-down routing mass'
    plot_heatmaps(out / 'heatmaps.png', display, heatmaps, panel_titles, titles, colour_label, mask_array, args.dpi)
    for b in range(len(x)):
        tree = part_whole_tree(trace, b, classes[b], args.tree_top, args.iteration, label_names)
        plot_part_whole_tree(
            out / trees[b], tree, f'{titles[b]}\ncapsules carrying most routing mass to its top classes', args.dpi
        )
    plot_entropy(
        out / 'entropy.png',
        entropy_table(trace),
        [f'{trace.layer_names[l]} -> {trace.layer_names[l + 1]}' for l in range(len(trace.geometry))],
        args.dpi,
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(0)
    _check_inputs(args)
    model = _create_model(args, parser)
    # a model built by name without --pretrained has random weights: its scores and routing mean nothing yet
    untrained = not args.checkpoint and not args.pretrained
    cfg = model.pretrained_cfg or {}
    dataset = args.dataset or model_dataset(cfg)
    if (args.diverse_multimnist or args.probe) and dataset != 'diverse_multimnist':
        parser.error(
            f"--diverse-multimnist/--probe need a DiverseMultiMNIST model, and the model's dataset is "
            f'{dataset!r} (from {"--dataset" if args.dataset else "its pretrained_cfg"}); '
            f'pass --dataset diverse_multimnist to use these images anyway'
        )
    known = DATASETS.get(dataset, {})
    multi_label = known.get('multi_label', False) if args.multi_label == 'auto' else args.multi_label == 'yes'
    top_k = args.top_k or (2 if multi_label else 1)
    label_names = class_names(cfg.get('label_names') or known.get('label_names'), model.num_classes)
    try:  # read before anything is written: a bad file leaves no --out folder behind
        file_inputs = load_images(model, args.images) if args.images else None
    except ValueError as error:
        parser.exit(1, f'{parser.prog}: error: {error}\n')
    out.mkdir(parents=True, exist_ok=True)

    # the images: files, then DiverseMultiMNIST test images (with their digit masks)
    inputs, names, masks, truths = [], [], [], []
    summary: Dict[str, Any] = dict(
        model=args.model,
        checkpoint=args.checkpoint,
        dataset=dataset,
        dataset_from='--dataset' if args.dataset else 'pretrained_cfg',
        iterations=model.iterations,
        routing=model.routing,
        multi_label=multi_label,
        heatmap_iteration=args.iteration,
        heat=args.heat,
        weights='untrained (random initialisation)' if untrained else 'trained',
        images=[],
    )
    if args.images:
        inputs.append(file_inputs)
        names += [Path(p).name for p in args.images]
        masks += [None] * len(args.images)
        truths += [None] * len(args.images)
    if args.diverse_multimnist:
        images, digit_masks, labels, ids, summary['mnist_source'] = diverse_multimnist_samples(
            args.diverse_multimnist, seed=args.data_seed, source=args.mnist_source, two_digit_only=True
        )
        x, m = prepare_arrays(model, images, digit_masks)
        inputs.append(x)
        names += [f'diverse_multimnist_test_{i}' for i in ids]
        masks += list(m)
        truths += [[int(c) for c in label if c >= 0] for label in labels]
    boxes = primary_receptive_fields(model) if inputs or args.probe else None
    if inputs:
        x = torch.cat(inputs)
        trace = routing_trace(model, x)
        trees = tree_file_names(names)
        classes = []
        for b in range(len(x)):
            item = routing_summary(trace, b, label_names, multi_label, top_k)
            item.update(image=names[b], tree=trees[b], heatmaps_row=b + 1)
            if truths[b] is not None:
                item['true'] = [label_names[c] for c in truths[b]]
            summary['images'].append(item)
            classes.append(item['predicted_index'])
        _draw_pictures(out, model, trace, x, names, masks, truths, classes, trees, label_names, boxes, args)
        summary['entropy_normalized_mean'] = entropy_table(trace).mean(0).tolist()  # [iteration][layer]
        summary['pictures'] = dict(
            {'heatmaps.png': names, 'entropy.png': names}, **{tree: [name] for tree, name in zip(trees, names)}
        )
        if args.save_raw == 'npz':
            np.savez_compressed(
                out / 'coefficients.npz', **{k: v.float().numpy() for k, v in _raw_tensors(trace).items()}
            )
            summary['raw'] = 'coefficients.npz'
        elif args.save_raw == 'safetensors':
            from safetensors.torch import save_file

            save_file(_raw_tensors(trace), str(out / 'coefficients.safetensors'))
            summary['raw'] = 'coefficients.safetensors'
    if args.probe:
        images, digit_masks, labels, _, summary['mnist_source'] = diverse_multimnist_samples(
            args.probe, seed=args.data_seed, source=args.mnist_source, two_digit_only=True
        )
        x, m = prepare_arrays(model, images, digit_masks)
        result = part_whole_probe(
            model, x, m, torch.from_numpy(labels), args.iteration, args.ownership, receptive_fields=boxes
        )
        (out / 'probe.json').write_text(json.dumps(result, indent=1))
        summary['probe'] = {k: v for k, v in result.items() if k != 'per_image'}
        print(
            f'part-whole probe on {result["images"]} two-digit test images: own_fraction '
            f'{result["own_fraction"]:.3f} (uniform-routing baseline {result["baseline"]:.3f}, area share '
            f'{result["area_share"]:.3f}), both digits separated in {result["separated"]:.1%}'
            + (' (untrained model: random weights)' if untrained else '')
        )
    (out / 'summary.json').write_text(json.dumps(summary, indent=1))
    for item in summary['images']:
        scores = ', '.join(f'{c}: {item["scores"][c]:.2f}' for c in item['predicted'])
        ent = ' '.join(
            f'{layer["name"]} ' + '/'.join(f'{i["entropy_normalized"]:.2f}' for i in layer['iterations'])
            for layer in item['layers']
        )
        note = ' (untrained model: random weights)' if untrained else ''
        print(f'{item["image"]} ({item["tree"]}): {scores}{note} | normalised routing entropy per iteration: {ent}')
    print(f'wrote {out}')
    return summary
