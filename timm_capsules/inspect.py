"""See the parse tree: routing introspection, pictures and a part-whole probe for CapsNets.

Import it as ``timm_capsules.inspect`` (it does not shadow the standard library's ``inspect``: imports are
absolute) and run it as ``python -m timm_capsules.inspect --help``.

Definitions (every function below uses them):

* **Routing layers.** ``CapsNet.forward_routing`` returns, for iteration k (0 = the uniform first pass) and
  routing layer l (children = capsule layer l, parents = layer l + 1; the last routing layer feeds the class
  capsules), coefficients ``r (B, H, W, children, parents)`` that sum to 1 over parents.
* **Routing entropy** of a child: ``-sum_j r_ij log r_ij`` (nats); a layer's entropy is the mean over all
  children and positions, and its *normalised* entropy divides by ``log(parents)`` (1 = uniform, 0 = every
  child routes to exactly one parent). The uniform first pass has normalised entropy 1.
* **Top-down routing mass** (heat maps, trees, probe). Put mass 1 on one class capsule and carry it down:
  a parent j with mass m_j gives each of its children i the mass ``r_ij * m_j`` (the child's contribution
  to that parent in ``p_j = sum_i r_ij v_ij``), and a child's mass is the sum over all parents it routes to.
  For a conv capsule layer (kernel k, stride s) the parent at (y, x) reaches the children of its window,
  child ``(ky, kx, n)`` being capsule n at ``(y*s + ky, x*s + kx)``; a child in several windows sums their
  contributions. Fully connected layers order children (type, h, w). By default every layer uses the
  coefficients of the **last iteration** (``iteration=-1``); ``iteration="used"`` takes, per layer, the
  iteration whose coefficients actually fed the logits (with concurrent routing and t iterations the layer
  l steps below the class capsules was last read at iteration t - l; with sequential routing every layer's
  last iteration). Masses are not normalised per layer (they are products of coefficients); heat maps are
  shown relative to their maximum and the probe uses ratios only.
* **Receptive fields.** Primary capsule (y, x) sees the image box of pixels whose value changes its pose,
  measured once per model with autograd on a random input (exact for conv backbones; the box is the
  bounding box of the non-zero input gradient, clipped to the image).
* **Image heat map.** A primary position's mass is summed over capsule types and (by default, ``heat="gain"``)
  divided by the mass the uniform first pass gives the same position, so that geometry (central positions
  sit in more conv windows than border ones) does not dominate; ``heat="mass"`` keeps the raw mass. Pixel p
  of the map is the mean of this over the primary positions whose receptive field contains p
  (``primary_to_image(mode="mean")``; a constant gives a flat map). Pictures scale each map to its own
  [min, max] (the range is printed in the panel title).
* **Part-whole probe** (two-digit DiverseMultiMNIST, digit masks = each digit's own pixel intensities before
  overlaying). A primary position *belongs* to digit A with weight ``w_A = a / (a + b)``, a and b the two
  digits' pixel mass inside its receptive field (``ownership="soft"``, default), or 1 if a > b else 0
  (``"hard"``); positions that see neither digit belong to the background. For the true class capsule of
  digit A, ``own_fraction = sum_pos m(pos) w_A(pos) / sum_pos m(pos) (w_A(pos) + w_B(pos))``: the share of
  its digit-borne routing mass that comes from A's own pixels. The ``baseline`` is the same ratio with the
  mass of the uniform first pass (no routing preference; it keeps the conv-window geometry), and
  ``area_share`` the same with a constant mass (A's share of the digit area).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
import torch.nn.functional as F

__all__ = [
    'routing_trace', 'routing_entropy', 'routing_summary', 'propagate_mass', 'class_primary_mass',
    'primary_receptive_fields', 'primary_to_image', 'class_heatmaps', 'part_whole_probe',
    'diverse_multimnist_samples', 'plot_heatmaps', 'plot_part_whole_tree', 'plot_entropy', 'main',
]

Iteration = Union[int, str]


# ------------------------------------------------------------------------------------------ routing
def routing_trace(model, images: Tensor):
    """``model.forward_routing(images)`` in eval mode without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.forward_routing(images)
    finally:
        model.train(was_training)


def routing_entropy(coefficients: Tensor, normalize: bool = False) -> Tensor:
    """Entropy (nats) of every child's routing distribution: (..., children, parents) -> (..., children).
    ``normalize`` divides by log(parents) (1 = uniform)."""
    r = coefficients.float()
    entropy = -(r * torch.log(r.clamp_min(1e-30))).sum(-1)
    if normalize:
        parents = coefficients.shape[-1]
        entropy = entropy / math.log(parents) if parents > 1 else torch.zeros_like(entropy)
    return entropy


def _routing_layers(model) -> List[Tuple[str, Optional[int], Optional[int]]]:
    """(kind, kernel, stride) of every routing layer, the class capsules last."""
    from .layers import ConvCapsules
    layers = list(model.capsule_layers) + [model.head.capsules]
    return [('conv', layer.kernel_size, layer.stride) if isinstance(layer, ConvCapsules) else ('fc', None, None)
            for layer in layers]


def _iteration_for_layer(model, trace, layer_index: int, iteration: Iteration) -> int:
    num = len(trace.coefficients)
    if iteration == 'used':
        if getattr(model, 'routing', 'concurrent') == 'sequential':
            return num - 1
        below = len(trace.coefficients[0]) - 1 - layer_index  # routing layers between this one and the head
        return max(0, num - 1 - below)
    if isinstance(iteration, str):
        raise ValueError(f"iteration must be an int or 'used', got {iteration!r}")
    return iteration % num


def _child_grid(trace, layer_index: int) -> Tuple[int, int, int]:
    """(H, W, N) of the children of routing layer ``layer_index``."""
    poses = trace.poses[0][layer_index]
    return tuple(poses.shape[1:4])


def propagate_mass(coefficients: Tensor, parent_mass: Tensor, kind: str, kernel: Optional[int],
                   stride: Optional[int], child_grid: Tuple[int, int, int]) -> Tensor:
    """Carry mass from parents to children through one routing layer (see the module docstring).

    coefficients (B, H, W, children, parents), parent_mass (B, H, W, parents, K) for K independent sources
    (e.g. one per class) -> child mass (B, Hc, Wc, Nc, K)."""
    Hc, Wc, Nc = child_grid
    B, H, W = coefficients.shape[:3]
    K = parent_mass.shape[-1]
    flow = torch.einsum('bhwcj,bhwjk->bhwck', coefficients.float(), parent_mass.float())
    if kind == 'fc':
        return flow[:, 0, 0].reshape(B, Nc, Hc, Wc, K).permute(0, 2, 3, 1, 4)
    k, s = kernel, stride
    flow = flow.reshape(B, H, W, k, k, Nc, K)
    child = flow.new_zeros(B, Hc, Wc, Nc, K)
    for ky in range(k):
        for kx in range(k):
            child[:, ky:ky + s * (H - 1) + 1:s, kx:kx + s * (W - 1) + 1:s] += flow[:, :, :, ky, kx]
    return child


def class_primary_mass(model, trace, classes: Optional[Sequence[int]] = None, iteration: Iteration = -1,
                       per_layer: bool = False):
    """Top-down routing mass of class capsules on every capsule layer.

    Returns primary mass (B, Hp, Wp, Np, K) for the K ``classes`` (default: all), or with ``per_layer``
    the list of masses of every capsule layer (primary first, class capsules last)."""
    layers = _routing_layers(model)
    num_classes = trace.logits.shape[1]
    classes = list(range(num_classes)) if classes is None else list(classes)
    B = trace.logits.shape[0]
    mass = trace.logits.new_zeros(B, 1, 1, num_classes, len(classes), dtype=torch.float32)
    for k, c in enumerate(classes):
        mass[:, 0, 0, c, k] = 1.0
    masses = [mass]
    for index in range(len(layers) - 1, -1, -1):
        kind, kernel, stride = layers[index]
        it = _iteration_for_layer(model, trace, index, iteration)
        mass = propagate_mass(trace.coefficients[it][index], mass, kind, kernel, stride, _child_grid(trace, index))
        masses.append(mass)
    masses.reverse()
    return masses if per_layer else masses[0]


def routing_summary(model, trace, index: int = 0, label_names: Optional[Sequence[str]] = None,
                    multi_label: bool = False, top_k: int = 1, argmax: bool = True) -> Dict[str, Any]:
    """JSON-ready summary of image ``index`` of a trace: class scores (sigmoid if ``multi_label`` else
    softmax), and per routing layer and iteration the mean / normalised routing entropy, the parent each
    child routes to most (``argmax_parent``, shape (H, W, children); null for the uniform first pass), how
    many children pick each parent type, the mean largest coefficient and the pose norms of the parents."""
    logits = trace.logits[index].float()
    scores = logits.sigmoid() if multi_label else logits.softmax(-1)
    names = _label_names(label_names, logits.numel())
    order = scores.argsort(descending=True).tolist()
    layers = _routing_layers(model)
    out_layers = []
    for l, (kind, kernel, stride) in enumerate(layers):
        iterations = []
        for k, step in enumerate(trace.coefficients):
            r = step[l][index].float()  # (H, W, children, parents)
            parent_poses = trace.poses[k][l + 1][index].float()  # (H, W, N, d)
            norms = parent_poses.norm(dim=-1)
            entropy = routing_entropy(r)
            best = r.argmax(-1)
            uniform = k == 0
            iterations.append(dict(
                iteration=k + 1,
                uniform=uniform,
                entropy=float(entropy.mean()),
                entropy_normalized=float(routing_entropy(r, normalize=True).mean()),
                max_coefficient=float(r.max(-1).values.mean()),
                argmax_parent=None if uniform or not argmax else best.tolist(),
                argmax_parent_counts=None if uniform else torch.bincount(
                    best.flatten(), minlength=r.shape[-1]).tolist(),
                pose_norm_mean=float(norms.mean()),
                pose_norm_per_type=norms.mean((0, 1)).tolist(),
            ))
        child_poses = trace.poses[0][l][index]
        out_layers.append(dict(
            name=trace.layer_names[l + 1], children=trace.layer_names[l], kind=kind, kernel_size=kernel,
            stride=stride, child_grid=list(child_poses.shape[:3]), parent_grid=list(trace.poses[0][l + 1].shape[1:4]),
            coefficients_shape=list(trace.coefficients[0][l].shape[1:]), iterations=iterations))
    primary_norms = trace.poses[0][0][index].float().norm(dim=-1)
    return dict(
        logits=logits.tolist(),
        scores={names[c]: float(scores[c]) for c in range(len(names))},
        predicted=[names[c] for c in order[:top_k]],
        predicted_index=order[:top_k],
        primary=dict(grid=list(trace.poses[0][0].shape[1:4]), pose_norm_mean=float(primary_norms.mean())),
        layers=out_layers,
    )


def _label_names(label_names, num_classes: int) -> List[str]:
    if label_names is not None and len(label_names) == num_classes:
        return [str(n) for n in label_names]
    return [str(c) for c in range(num_classes)]


# ------------------------------------------------------------------------------------ image mapping
def _primary_capsules(model, x: Tensor) -> Tensor:
    return model.primary(model.backbone(x)[-1]).poses  # (B, H, W, N, d)


def primary_receptive_fields(model, seed: int = 0, chunk: int = 64) -> np.ndarray:
    """Image box ``(y0, y1, x0, x1)`` (half-open) seen by each primary capsule position: (Hp, Wp, 4) ints.

    Measured with autograd (see the module docstring) and cached on the model."""
    cached = getattr(model, '_inspect_receptive_fields', None)
    if cached is not None:
        return cached
    C, (H, W) = model.in_chans, model.img_size
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(1, C, H, W, generator=generator).to(param.device, param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            Hp, Wp = _primary_capsules(model, base).shape[1:3]
        positions = [(y, x) for y in range(Hp) for x in range(Wp)]
        boxes = np.zeros((Hp, Wp, 4), np.int64)
        for start in range(0, len(positions), chunk):
            part = positions[start:start + chunk]
            x_in = base.repeat(len(part), 1, 1, 1).requires_grad_(True)
            with torch.enable_grad():
                poses = _primary_capsules(model, x_in)
                ys = torch.tensor([p[0] for p in part], device=poses.device)
                xs = torch.tensor([p[1] for p in part], device=poses.device)
                picked = poses[torch.arange(len(part), device=poses.device), ys, xs]  # (n, N, d)
                # a random projection, so that no LayerNorm symmetry can cancel the gradient
                weights = torch.randn(picked.shape[1:], generator=generator).to(picked)
                (picked * weights).sum().backward()
            grad = x_in.grad.abs().sum(1)  # (n, H, W)
            for g, (y, x) in zip(grad, part):
                rows = torch.nonzero(g.sum(1) > 0).flatten()
                cols = torch.nonzero(g.sum(0) > 0).flatten()
                if len(rows) == 0:  # a dead position: fall back to its stride cell
                    r0, c0 = y * H // Hp, x * W // Wp
                    boxes[y, x] = (r0, max(r0 + 1, (y + 1) * H // Hp), c0, max(c0 + 1, (x + 1) * W // Wp))
                else:
                    boxes[y, x] = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    finally:
        model.train(was_training)
    model._inspect_receptive_fields = boxes
    return boxes


def _box_matrix(boxes: np.ndarray, H: int, W: int) -> Tensor:
    """(Hp*Wp, H*W) matrix whose row p is 1 on position p's receptive field box."""
    Hp, Wp = boxes.shape[:2]
    matrix = torch.zeros(Hp * Wp, H, W)
    for y in range(Hp):
        for x in range(Wp):
            y0, y1, x0, x1 = boxes[y, x]
            matrix[y * Wp + x, y0:y1, x0:x1] = 1.0
    return matrix.reshape(Hp * Wp, H * W)


def primary_to_image(mass: Tensor, boxes: np.ndarray, image_size: Tuple[int, int], mode: str = 'mean') -> Tensor:
    """Primary-position mass (B, Hp, Wp[, K]) -> image map (B, H, W[, K]) through the receptive fields.

    ``mode="mean"`` (heat maps): a pixel gets the mean mass of the positions whose receptive field covers it
    (uniform mass gives a flat map, whatever the receptive-field overlaps). ``mode="sum"``: each position's
    mass is spread uniformly over its box and boxes add up (the total mass is kept)."""
    squeeze = mass.ndim == 3
    if squeeze:
        mass = mass[..., None]
    B, Hp, Wp, K = mass.shape
    H, W = image_size
    matrix = _box_matrix(boxes, H, W).to(mass.device, torch.float32)
    if mode == 'sum':
        matrix = matrix / matrix.sum(1, keepdim=True).clamp_min(1)
    elif mode == 'mean':
        matrix = matrix / matrix.sum(0, keepdim=True).clamp_min(1)
    else:
        raise ValueError(f"mode must be 'mean' or 'sum', got {mode!r}")
    image = torch.einsum('bpk,pq->bqk', mass.reshape(B, Hp * Wp, K).float(), matrix).reshape(B, H, W, K)
    return image[..., 0] if squeeze else image


def class_heatmaps(model, trace, classes: Sequence[int], iteration: Iteration = -1, mode: str = 'mean',
                   heat: str = 'gain') -> Tensor:
    """Image-resolution heat maps (B, H, W, K) of how much each region routes to each class in ``classes``
    (K = len(classes)); see the module docstring and ``primary_to_image``. ``heat="mass"``: the top-down
    mass itself; ``heat="gain"``: the mass divided by the mass the same position gets under the uniform first
    pass (1 = no preference; removes the geometry, e.g. that central positions sit in more conv windows)."""
    mass = class_primary_mass(model, trace, classes, iteration).sum(3)  # (B, Hp, Wp, K)
    if heat == 'gain':
        mass = mass / class_primary_mass(model, trace, classes, 0).sum(3).clamp_min(1e-30)
    elif heat != 'mass':
        raise ValueError(f"heat must be 'gain' or 'mass', got {heat!r}")
    return primary_to_image(mass, primary_receptive_fields(model), model.img_size, mode)


# ------------------------------------------------------------------------------------------- probe
def _ownership(boxes: np.ndarray, digit_masks: Tensor, ownership: str = 'soft') -> Tensor:
    """How much each primary position belongs to each digit: (N, 2, H, W) masks -> (N, 2, Hp*Wp)."""
    H, W = digit_masks.shape[-2:]
    box = _box_matrix(boxes, H, W)  # (P, H*W)
    seen = torch.einsum('pq,ndq->ndp', box, digit_masks.float().reshape(len(digit_masks), 2, H * W))
    total = seen.sum(1, keepdim=True)
    if ownership == 'soft':
        return torch.where(total > 0, seen / total.clamp_min(1e-12), torch.zeros_like(seen))
    return torch.stack([seen[:, 0] > seen[:, 1], seen[:, 1] > seen[:, 0]], 1).float()


def _own_fraction(mass: Tensor, owner: Tensor, digit: int) -> float:
    """Share of a class capsule's digit-borne primary mass (P,) that comes from digit ``digit``."""
    mine, theirs = float((mass * owner[digit]).sum()), float((mass * owner[1 - digit]).sum())
    return mine / max(mine + theirs, 1e-30)


def part_whole_probe(model, images: Tensor, digit_masks: Tensor, labels: Tensor, iteration: Iteration = -1,
                     ownership: str = 'soft', batch_size: int = 64) -> Dict[str, Any]:
    """How much of each true digit's class-capsule routing mass comes from that digit's own pixels.

    images (N, C, H, W) preprocessed for the model; digit_masks (N, 2, H, W) each digit's pixel intensity
    (>= 0) before overlaying; labels (N, 2) the class of each mask (images whose second label is < 0 are
    skipped). Definitions in the module docstring. Returns ``own_fraction`` (mean over digits of all
    two-digit images), ``baseline`` (the same with the uniform first pass's mass), ``area_share``,
    ``separated`` (share of images where both digits get own_fraction > 0.5), the background share of the
    mass, and per-image values."""
    if ownership not in ('soft', 'hard'):
        raise ValueError(f"ownership must be 'soft' or 'hard', got {ownership!r}")
    labels = torch.as_tensor(labels).long()
    keep = labels[:, 1] >= 0
    images, digit_masks, labels = images[keep], torch.as_tensor(digit_masks)[keep].float(), labels[keep]
    if len(images) == 0:
        raise ValueError('part_whole_probe needs two-digit images (labels[:, 1] >= 0)')
    boxes = primary_receptive_fields(model)
    Hp, Wp = boxes.shape[:2]
    owner = _ownership(boxes, digit_masks, ownership)
    own, other, background, baseline, area = [], [], [], [], []
    for start in range(0, len(images), batch_size):
        trace = routing_trace(model, images[start:start + batch_size])
        mass = class_primary_mass(model, trace, None, iteration).sum(3)  # (b, Hp, Wp, classes)
        mass = mass.reshape(mass.shape[0], Hp * Wp, -1)
        uniform = class_primary_mass(model, trace, None, 0).sum(3).reshape(mass.shape)
        for b in range(mass.shape[0]):
            n = start + b
            for d in range(2):
                m = mass[b, :, labels[n, d]]  # (P,)
                mine, theirs = float((m * owner[n, d]).sum()), float((m * owner[n, 1 - d]).sum())
                everything = float(m.sum())
                own.append(_own_fraction(m, owner[n], d))
                other.append(theirs / max(everything, 1e-30))
                background.append(max(0.0, everything - mine - theirs) / max(everything, 1e-30))
                baseline.append(_own_fraction(uniform[b, :, labels[n, d]], owner[n], d))
                area_mine, area_theirs = float(owner[n, d].sum()), float(owner[n, 1 - d].sum())
                area.append(area_mine / max(area_mine + area_theirs, 1e-30))
    own_t = torch.tensor(own).reshape(-1, 2)
    return dict(
        images=int(len(images)),
        ownership=ownership,
        iteration=iteration,
        own_fraction=float(own_t.mean()),
        baseline=float(np.mean(baseline)),
        area_share=float(np.mean(area)),
        separated=float((own_t > 0.5).all(1).float().mean()),
        other_fraction_of_all=float(np.mean(other)),
        background_fraction_of_all=float(np.mean(background)),
        per_image=own_t.tolist(),
    )


# ---------------------------------------------------------------------------------------- data
def diverse_multimnist_samples(count: int, seed: int = 0, source: Optional[str] = None, split: str = 'test',
                               two_digit_only: bool = False, start: int = 0):
    """``count`` DiverseMultiMNIST images with their per-digit masks: (images uint8 (n, S, S), masks float32
    (n, 2, S, S) in [0, 1], each digit's own pixels before overlaying (zeros for an absent second digit),
    labels (n, 2) int64 with -1 for an absent digit, and the image indices)."""
    from .data.diverse_multimnist import DIGIT_SIZE, generate
    from .data.mnist import load_mnist
    digits = load_mnist(split, source)
    images, masks, labels, ids = [], [], [], []
    index = start
    while len(images) < count:
        indices = np.arange(index, index + max(4 * count, 16))
        batch = generate(digits, indices, seed=seed, split=split)
        index += len(indices)
        size = batch.images.shape[-1]
        for k in range(len(indices)):
            if len(images) == count:
                break
            if two_digit_only and batch.num_digits[k] != 2:
                continue
            mask = np.zeros((2, size, size), np.float32)
            for d in range(2):
                if batch.sources[k, d] >= 0:
                    r, c = batch.offsets[k, d]
                    mask[d, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE] = digits.images[batch.sources[k, d]] / 255.0
            images.append(batch.images[k])
            masks.append(mask)
            labels.append(batch.classes[k])
            ids.append(int(indices[k]))
    return np.stack(images), np.stack(masks), np.stack(labels).astype(np.int64), ids


def _data_config(model) -> Dict[str, Any]:
    from timm.data import resolve_data_config
    config = resolve_data_config({}, model=model)
    config['input_size'] = (model.in_chans, *model.img_size)  # the size the model was built for
    if len(config['mean']) != model.in_chans:
        config['mean'] = tuple(config['mean'][:1]) * model.in_chans
        config['std'] = tuple(config['std'][:1]) * model.in_chans
    return config


def load_images(model, paths: Sequence[str]) -> Tensor:
    """Image files preprocessed with timm's ``resolve_data_config`` + ``create_transform`` (eval)."""
    from PIL import Image
    from timm.data import create_transform
    config = _data_config(model)
    transform = create_transform(**config, is_training=False)
    mode = 'L' if model.in_chans == 1 else 'RGB'
    return torch.stack([transform(Image.open(p).convert(mode)) for p in paths])


def prepare_arrays(model, images: np.ndarray, masks: Optional[np.ndarray] = None):
    """uint8 (n, S, S) grey images (and masks) -> model input (n, C, H, W) normalised with the model's data
    config; resized bilinearly when the model's input size differs from S."""
    config = _data_config(model)
    x = torch.from_numpy(np.asarray(images)).float().div(255.0)[:, None]
    H, W = model.img_size
    if x.shape[-2:] != (H, W):
        x = F.interpolate(x, size=(H, W), mode='bilinear', align_corners=False, antialias=True)
        if masks is not None:
            masks = F.interpolate(torch.as_tensor(masks), size=(H, W), mode='bilinear', align_corners=False,
                                  antialias=True).clamp_min(0)
    x = x.expand(-1, model.in_chans, -1, -1)
    mean = torch.tensor(config['mean']).view(1, -1, 1, 1)
    std = torch.tensor(config['std']).view(1, -1, 1, 1)
    x = (x - mean) / std
    return x, (None if masks is None else torch.as_tensor(masks))


def _display_image(model, x: Tensor) -> np.ndarray:
    """Model input (C, H, W) back to [0, 1] for display."""
    config = _data_config(model)
    mean = torch.tensor(config['mean']).view(-1, 1, 1)
    std = torch.tensor(config['std']).view(-1, 1, 1)
    img = (x.cpu().float() * std + mean).clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------- pictures
def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_heatmaps(model, trace, images: Tensor, classes: Sequence[Sequence[int]], path, label_names=None,
                  masks: Optional[Tensor] = None, titles: Optional[Sequence[str]] = None,
                  iteration: Iteration = -1, dpi: int = 80, truths: Optional[Sequence[Sequence[int]]] = None,
                  heat: str = 'gain'):
    """One row per image: the input (digits coloured by identity when ``masks`` (B, 2, H, W) are given), then
    for each of its ``classes[b]`` the heat map of routing mass to that class capsule over the image. With
    ``truths[b]`` (the classes of the two masks), a predicted true digit's title gives its probe value."""
    plt = _plt()
    B = len(images)
    K = max(len(c) for c in classes)
    num_classes = trace.logits.shape[1]
    names = _label_names(label_names, num_classes)
    heat_all = class_heatmaps(model, trace, list(range(num_classes)), iteration, heat=heat)  # (B, H, W, classes)
    covered = (_box_matrix(primary_receptive_fields(model), *model.img_size).sum(0) > 0).reshape(
        *model.img_size).numpy()
    if masks is not None and truths is not None:
        primary_mass = class_primary_mass(model, trace, None, iteration).sum(3)  # (B, Hp, Wp, classes)
        owner = _ownership(primary_receptive_fields(model), masks, 'soft')
    fig, axes = plt.subplots(B, K + 1, figsize=(2.1 * (K + 1), 2.2 * B), squeeze=False)
    for b in range(B):
        base = _display_image(model, images[b])
        grey = base if base.ndim == 2 else base.mean(-1)
        ax = axes[b, 0]
        if masks is not None:
            m = masks[b].float().numpy()
            rgb = np.stack([m[0], 0.35 * (m[0] + m[1]), m[1]], -1).clip(0, 1)
            ax.imshow(rgb)
        else:
            ax.imshow(base, cmap='gray' if base.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(titles[b] if titles else 'input', fontsize=8)
        for k in range(K):
            ax = axes[b, k + 1]
            if k >= len(classes[b]):
                ax.axis('off')
                continue
            c = classes[b][k]
            heat_map = np.where(covered, heat_all[b, :, :, c].numpy(), np.nan)  # no receptive field: blank
            ax.imshow(grey, cmap='gray', vmin=0, vmax=1)
            low, high = float(np.nanmin(heat_map)), float(np.nanmax(heat_map))
            ax.imshow((heat_map - low) / max(high - low, 1e-12), cmap='inferno', alpha=0.6, vmin=0, vmax=1)
            if masks is not None:
                for d, colour in ((0, 'red'), (1, 'deepskyblue')):
                    if masks[b, d].max() > 0:
                        ax.contour(masks[b, d].numpy(), levels=[0.3], colors=colour, linewidths=0.6)
            title = f'routes to "{names[c]}" (logit {float(trace.logits[b, c]):+.1f})'
            title += f'\n{heat} {low:.3g}..{high:.3g}'
            if masks is not None and truths is not None and truths[b] and c in truths[b] and len(truths[b]) == 2:
                d = truths[b].index(c)
                own = _own_fraction(primary_mass[b, :, :, c].reshape(-1), owner[b], d)
                title += f'\n{own:.0%} of digit mass from its own digit'
            ax.set_title(title, fontsize=7)
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def _node_name(layer_name: str, grid: Tuple[int, int], index: int, num_types: int) -> str:
    H, W = grid
    n = index % num_types
    pos = index // num_types
    if (H, W) == (1, 1):
        return f'{n}'
    return f'({pos // W},{pos % W})#{n}'


def plot_part_whole_tree(model, trace, index: int, classes: Sequence[int], path, label_names=None,
                         top: int = 6, iteration: Iteration = -1, dpi: int = 80):
    """Part-whole tree of image ``index``: the chosen class capsules at the right; in each layer below, the
    ``top`` capsules carrying most routing mass to the capsules kept in the layer above; edge width =
    routing mass flowing (r_ij * m_j), colour = the class whose mass dominates the parent's mass."""
    plt = _plt()
    layers = _routing_layers(model)
    num_classes = trace.logits.shape[1]
    names = _label_names(label_names, num_classes)
    colours = plt.get_cmap('tab10')
    # per-layer mass per chosen class, to colour nodes by dominant class
    masses = class_primary_mass(model, trace, classes, iteration, per_layer=True)  # list (B, H, W, N, K)
    L = len(masses)
    kept: List[List[int]] = [[] for _ in range(L)]
    kept[L - 1] = list(classes)
    edges = []  # (layer of child, child node, parent node, flow)
    for l in range(L - 2, -1, -1):
        kind, kernel, stride = layers[l]
        it = _iteration_for_layer(model, trace, l, iteration)
        coef = trace.coefficients[it][l][index:index + 1]
        Hp_, Wp_, Np_ = trace.poses[0][l + 1].shape[1:4]
        parent_total = masses[l + 1][index].sum(-1).reshape(-1)  # node mass summed over chosen classes
        parents = kept[l + 1]
        source = torch.zeros(1, Hp_, Wp_, Np_, len(parents))
        for k, p in enumerate(parents):
            source[0, p // (Wp_ * Np_), (p // Np_) % Wp_, p % Np_, k] = parent_total[p]
        flow = propagate_mass(coef, source, kind, kernel, stride, _child_grid(trace, l))[0]  # (Hc, Wc, Nc, P)
        flow = flow.reshape(-1, len(parents))
        chosen = flow.sum(1).argsort(descending=True)[:top].tolist()
        kept[l] = chosen
        for c in chosen:
            for k, p in enumerate(parents):
                edges.append((l, c, p, float(flow[c, k])))
    fig, ax = plt.subplots(figsize=(2.3 * L, 0.45 * max(len(k) for k in kept) + 1.4))
    pos = {}
    for l in range(L):
        count = len(kept[l])
        for rank, node in enumerate(kept[l]):
            pos[(l, node)] = (l, 1 - (rank + 0.5) / max(count, 1))
    max_flow = max((e[3] for e in edges), default=1.0) or 1.0
    for l, c, p, f in edges:
        if f <= 1e-4 * max_flow:
            continue
        owner = int(masses[l + 1][index].reshape(-1, len(classes))[p].argmax())
        (x0, y0), (x1, y1) = pos[(l, c)], pos[(l + 1, p)]
        ax.plot([x0, x1], [y0, y1], color=colours(owner % 10), alpha=0.55, lw=0.3 + 5 * f / max_flow,
                solid_capstyle='round')
    for l in range(L):
        H_, W_, N_ = trace.poses[0][l].shape[1:4]
        node_mass = masses[l][index].reshape(-1, len(classes))
        for node in kept[l]:
            x, y = pos[(l, node)]
            owner = int(node_mass[node].argmax())
            label = names[node] if l == L - 1 else _node_name(trace.layer_names[l], (H_, W_), node, N_)
            ax.scatter([x], [y], s=60, color=colours(owner % 10), zorder=3, edgecolors='k', linewidths=0.5)
            ax.annotate(label, (x, y), xytext=(0, 7), textcoords='offset points', ha='center', fontsize=7)
        ax.text(l, -0.08, trace.layer_names[l], ha='center', fontsize=8)
    handles = [plt.Line2D([], [], color=colours(k % 10), lw=3, label=f'class "{names[c]}"')
               for k, c in enumerate(classes)]
    ax.legend(handles=handles, loc='lower center', bbox_to_anchor=(0.5, 1.0), ncol=len(handles), fontsize=7,
              frameon=False)
    ax.set_xlim(-0.4, L - 0.6)
    ax.set_ylim(-0.14, 1.06)
    ax.axis('off')
    fig.suptitle('part-whole tree: the capsules carrying most routing mass to the top classes', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def entropy_table(trace) -> np.ndarray:
    """Normalised routing entropy (images, iterations, routing layers)."""
    T, L = len(trace.coefficients), len(trace.coefficients[0])
    B = trace.logits.shape[0]
    table = np.zeros((B, T, L))
    for k in range(T):
        for l in range(L):
            table[:, k, l] = routing_entropy(trace.coefficients[k][l], normalize=True).flatten(1).mean(1).numpy()
    return table


def plot_entropy(trace, path, dpi: int = 80):
    """Normalised routing entropy per layer over iterations (mean over images, thin lines per image)."""
    plt = _plt()
    table = entropy_table(trace)
    B, T, L = table.shape
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    colours = plt.get_cmap('tab10')
    its = np.arange(1, T + 1)
    for l in range(L):
        for b in range(B):
            ax.plot(its, table[b, :, l], color=colours(l % 10), alpha=0.15, lw=0.7)
        ax.plot(its, table[:, :, l].mean(0), color=colours(l % 10), marker='o',
                label=f'{trace.layer_names[l]} -> {trace.layer_names[l + 1]}')
    ax.set_xlabel('routing iteration (1 = uniform pass)')
    ax.set_ylabel('routing entropy / log(#parents)')
    ax.set_xticks(its)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------- CLI
def _create_model(args):
    import timm
    import timm_capsules  # noqa: F401  (registers the models)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if args.checkpoint:
        model = timm.create_model('local-dir:' + str(args.checkpoint), pretrained=True, **kwargs)
    else:
        if not args.model:
            raise SystemExit('inspect: give --model NAME or --checkpoint DIR')
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    return model.eval()


def _raw_tensors(trace, start: int = 0) -> Dict[str, Tensor]:
    """Logits and every routing coefficient, keyed image{b}/iteration{k}/{layer}."""
    tensors = {}
    for b in range(trace.logits.shape[0]):
        tensors[f'image{start + b}/logits'] = trace.logits[b].contiguous()
        for k, step in enumerate(trace.coefficients):
            for l, r in enumerate(step):
                tensors[f'image{start + b}/iteration{k + 1}/{trace.layer_names[l + 1]}'] = r[b].contiguous()
    return tensors


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='python -m timm_capsules.inspect',
        description='Routing introspection of a timm_capsules CapsNet: class scores, routing coefficients, '
                    'entropies and pose norms per layer and iteration (JSON), heat maps, part-whole trees, '
                    'routing entropy plots and the DiverseMultiMNIST part-whole probe.')
    parser.add_argument('images', nargs='*', help='image files (PNG/JPG), preprocessed with timm\'s data config')
    parser.add_argument('--model', help='timm model name, e.g. capsnet_matrix_multimnist')
    parser.add_argument('--checkpoint', help='timm folder (config.json + model.safetensors), loaded with '
                                             'timm.create_model("local-dir:" + DIR, pretrained=True)')
    parser.add_argument('--pretrained', action='store_true', help='load the model\'s published weights')
    parser.add_argument('--model-kwargs', help='JSON dict of create_model kwargs, e.g. \'{"iterations": 4}\'')
    parser.add_argument('--diverse-multimnist', type=int, default=0, metavar='N',
                        help='also inspect N DiverseMultiMNIST test images (two-digit ones)')
    parser.add_argument('--mnist-source', default=None, help='MNIST digits: auto | sample | hub | IDX folder')
    parser.add_argument('--data-seed', type=int, default=0, help='DiverseMultiMNIST seed')
    parser.add_argument('--probe', type=int, default=0, metavar='N',
                        help='run the part-whole probe on N two-digit DiverseMultiMNIST test images')
    parser.add_argument('--ownership', choices=('soft', 'hard'), default='soft', help='probe ownership rule')
    parser.add_argument('--iteration', default='-1',
                        help='coefficients for heat maps / trees / probe: an iteration index (default -1: '
                             'the last) or "used" (those that fed the logits)')
    parser.add_argument('--heat', choices=('gain', 'mass'), default='gain',
                        help='heat map of routing mass relative to the uniform first pass (gain) or raw (mass)')
    parser.add_argument('--top-k', type=int, default=None,
                        help='classes shown per image (default 2 for DiverseMultiMNIST models, else 1)')
    parser.add_argument('--multi-label', choices=('auto', 'yes', 'no'), default='auto',
                        help='sigmoid scores (yes) or softmax (no); auto: yes for DiverseMultiMNIST')
    parser.add_argument('--save-raw', choices=('none', 'npz', 'safetensors'), default='none',
                        help='also save every raw routing coefficient')
    parser.add_argument('--tree-top', type=int, default=6, help='capsules kept per layer in the tree')
    parser.add_argument('--dpi', type=int, default=80)
    parser.add_argument('--out', required=True, help='output folder')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = _parse_args(argv)
    iteration: Iteration = args.iteration if args.iteration == 'used' else int(args.iteration)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = _create_model(args)
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    is_mnist = bool(args.diverse_multimnist or args.probe) or 'multimnist' in str(
        args.model or cfg.get('architecture', '') or args.checkpoint)
    multi_label = is_mnist if args.multi_label == 'auto' else args.multi_label == 'yes'
    top_k = args.top_k or (2 if multi_label else 1)
    label_names = cfg.get('label_names')

    # the images: files, then generated DiverseMultiMNIST ones (with their digit masks)
    inputs, names, masks, truths = [], [], [], []
    if args.images:
        inputs.append(load_images(model, args.images))
        names += [Path(p).name for p in args.images]
        masks += [None] * len(args.images)
        truths += [None] * len(args.images)
    if args.diverse_multimnist:
        imgs, digit_masks, labels, ids = diverse_multimnist_samples(
            args.diverse_multimnist, seed=args.data_seed, source=args.mnist_source, two_digit_only=True)
        x, m = prepare_arrays(model, imgs, digit_masks)
        inputs.append(x)
        names += [f'diverse_multimnist_test_{i}' for i in ids]
        masks += list(m)
        truths += [[int(c) for c in lab if c >= 0] for lab in labels]
    summary: Dict[str, Any] = dict(model=args.model, checkpoint=args.checkpoint, iterations=model.iterations,
                                   routing=model.routing, multi_label=multi_label, heatmap_iteration=iteration,
                                   images=[])
    if inputs:
        x = torch.cat(inputs)
        trace = routing_trace(model, x)
        classes = []
        for b in range(len(x)):
            item = routing_summary(model, trace, b, label_names, multi_label, top_k)
            item['image'] = names[b]
            if truths[b] is not None:
                item['true'] = [_label_names(label_names, trace.logits.shape[1])[c] for c in truths[b]]
            summary['images'].append(item)
            classes.append(item['predicted_index'])
        titles = [n if t is None else f'test #{n.rsplit("_", 1)[-1]}: true ' + ', '.join(
                      f'{c} ({colour})' for c, colour in zip(t, ('red', 'blue')))
                  for n, t in zip(names, [s.get('true') for s in summary['images']])]
        mask_tensor = None
        if any(m is not None for m in masks):
            mask_tensor = torch.stack([m if m is not None else torch.zeros(2, *model.img_size) for m in masks])
        plot_heatmaps(model, trace, x, classes, out / 'heatmaps.png', label_names, mask_tensor, titles,
                      iteration, args.dpi, truths, args.heat)
        for b in range(len(x)):
            plot_part_whole_tree(model, trace, b, classes[b], out / f'tree_{b}.png', label_names,
                                 args.tree_top, iteration, args.dpi)
        plot_entropy(trace, out / 'entropy.png', args.dpi)
        summary['entropy_normalized_mean'] = entropy_table(trace).mean(0).tolist()  # [iteration][layer]
        summary['pictures'] = ['heatmaps.png', 'entropy.png'] + [f'tree_{b}.png' for b in range(len(x))]
        if args.save_raw != 'none':
            tensors = _raw_tensors(trace)
            if args.save_raw == 'npz':
                np.savez_compressed(out / 'coefficients.npz', **{k: v.float().numpy() for k, v in tensors.items()})
                summary['raw'] = 'coefficients.npz'
            else:
                from safetensors.torch import save_file
                save_file(tensors, str(out / 'coefficients.safetensors'))
                summary['raw'] = 'coefficients.safetensors'
    if args.probe:
        imgs, digit_masks, labels, _ = diverse_multimnist_samples(
            args.probe, seed=args.data_seed, source=args.mnist_source, two_digit_only=True)
        x, m = prepare_arrays(model, imgs, digit_masks)
        result = part_whole_probe(model, x, m, torch.from_numpy(labels), iteration, args.ownership)
        (out / 'probe.json').write_text(json.dumps(result, indent=1))
        summary['probe'] = {k: v for k, v in result.items() if k != 'per_image'}
        print(f"part-whole probe on {result['images']} two-digit test images: own_fraction "
              f"{result['own_fraction']:.3f} (uniform-routing baseline {result['baseline']:.3f}, area share "
              f"{result['area_share']:.3f}), both digits separated in "
              f"{result['separated']:.1%}")
    (out / 'summary.json').write_text(json.dumps(summary, indent=1))
    for item in summary['images']:
        scores = ', '.join(f'{c}: {item["scores"][c]:.2f}' for c in item['predicted'])
        ent = ' '.join(f'{layer["name"]} ' + '/'.join(f'{i["entropy_normalized"]:.2f}' for i in layer['iterations'])
                       for layer in item['layers'])
        print(f'{item["image"]}: {scores} | normalised routing entropy per iteration: {ent}')
    print(f'wrote {out}')
    return summary


if __name__ == '__main__':
    main()
