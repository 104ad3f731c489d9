"""Routing analysis: entropy, top-down routing mass, receptive fields, heat maps, part-whole trees and the
part-whole probe. Everything here reads a ``RoutingTrace`` (``CapsNet.forward_routing``) and the model's
public timm API (``feature_info``, ``forward_intermediates``), never the model's modules.

Definitions (every function below uses them):

* **Routing layers.** ``trace.coefficients[k][l]`` holds, for iteration k (0 = the uniform first pass) and
  routing layer l (children = capsule layer l, parents = layer l + 1; the last routing layer feeds the class
  capsules), coefficients ``r (B, H, W, children, parents)`` that sum to 1 over parents;
  ``trace.geometry[l]`` says how the layer connects them (kind, kernel, stride, child and parent grids).
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
  iteration whose coefficients actually fed the logits (``trace.used_iterations``: with concurrent routing
  and t iterations the layer l steps below the class capsules was last read at iteration t - l; with
  sequential routing every layer's last iteration). Masses are not normalised per layer (they are products
  of coefficients); heat maps are shown with their own range and the probe uses ratios only.
* **Receptive fields.** Primary capsule (y, x) sees the image box of pixels whose value changes its pose,
  measured with autograd on a random input through ``forward_intermediates`` (exact for conv backbones;
  the box is the bounding box of the non-zero input gradient, clipped to the image).
* **Image heat map.** A primary position's mass is summed over capsule types and (by default, ``heat="gain"``)
  divided by the mass the uniform first pass gives the same position, so that geometry (central positions
  sit in more conv windows than border ones) does not dominate; ``heat="mass"`` keeps the raw mass. Pixel p
  of the map is the mean of this over the primary positions whose receptive field contains p
  (``primary_to_image(mode="mean")``; a constant gives a flat map).
* **Part-whole probe** (two-digit DiverseMultiMNIST, digit masks = each digit's own pixel intensities before
  overlaying). A primary position *belongs* to digit A with weight ``w_A = a / (a + b)``, a and b the two
  digits' pixel mass inside its receptive field (``ownership="soft"``, default), or 1 if a > b else 0
  (``"hard"``); positions that see neither digit belong to the background. For the true class capsule of
  digit A, ``own_fraction = sum_pos m(pos) w_A(pos) / sum_pos m(pos) (w_A(pos) + w_B(pos))``: the share of
  its digit-borne routing mass that comes from A's own pixels. The ``baseline`` is the same ratio with the
  mass of the uniform first pass (no routing preference; it keeps the conv-window geometry), and
  ``area_share`` the same with a constant mass (A's share of the digit area). Both use one mass for both digits,
  so an image's two values add up to 1 and their mean over images is 0.5 by construction: the chance level the
  mean ``own_fraction`` is read against, not a measurement.
"""

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

# the image geometry (receptive fields, primary mass onto pixels, digit ownership) is receptive_fields.py's
from .receptive_fields import digit_ownership, primary_receptive_fields, primary_to_image, receptive_field_matrix

__all__ = [
    'Iteration',
    'routing_trace',
    'routing_entropy',
    'routing_summary',
    'class_names',
    'propagate_mass',
    'class_primary_mass',
    'primary_receptive_fields',
    'receptive_field_matrix',
    'primary_to_image',
    'class_heatmaps',
    'digit_ownership',
    'own_fraction',
    'part_whole_probe',
    'PartWholeTree',
    'part_whole_tree',
    'entropy_table',
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


def _iteration_index(trace, layer: int, iteration: Iteration) -> int:
    """Which iteration's coefficients of routing layer ``layer`` to read: ``'used'`` is the one the logits
    read, an int indexes the iterations like a list (-1 = the last)."""
    if iteration == 'used':
        return trace.used_iterations[layer]
    if isinstance(iteration, str):
        raise ValueError(f"iteration must be an int or 'used', got {iteration!r}")
    count = len(trace.coefficients)
    if not -count <= iteration < count:
        raise ValueError(f'iteration {iteration} is out of range for a trace of {count} iterations')
    return iteration % count


def propagate_mass(coefficients: Tensor, parent_mass: Tensor, geometry) -> Tensor:
    """Carry mass from parents to children through one routing layer (see the module docstring).

    coefficients (B, H, W, children, parents), parent_mass (B, H, W, parents, K) for K independent sources
    (e.g. one per class), ``geometry`` the layer's ``RoutingGeometry`` -> child mass (B, Hc, Wc, Nc, K)."""
    Hc, Wc, Nc = geometry.child_grid
    B, H, W = coefficients.shape[:3]
    K = parent_mass.shape[-1]
    flow = torch.einsum('bhwcj,bhwjk->bhwck', coefficients.float(), parent_mass.float())
    if geometry.kind == 'fc':
        return flow[:, 0, 0].reshape(B, Nc, Hc, Wc, K).permute(0, 2, 3, 1, 4)
    k, s = geometry.kernel_size, geometry.stride
    flow = flow.reshape(B, H, W, k, k, Nc, K)
    child = flow.new_zeros(B, Hc, Wc, Nc, K)
    for ky in range(k):
        for kx in range(k):
            child[:, ky : ky + s * (H - 1) + 1 : s, kx : kx + s * (W - 1) + 1 : s] += flow[:, :, :, ky, kx]
    return child


def class_primary_mass(
    trace, classes: Optional[Sequence[int]] = None, iteration: Iteration = -1, per_layer: bool = False
):
    """Top-down routing mass of class capsules on every capsule layer.

    Returns primary mass (B, Hp, Wp, Np, K) for the K ``classes`` (default: all), or with ``per_layer``
    the list of masses of every capsule layer (primary first, class capsules last)."""
    num_classes = trace.logits.shape[1]
    classes = list(range(num_classes)) if classes is None else list(classes)
    B = trace.logits.shape[0]
    mass = trace.logits.new_zeros(B, 1, 1, num_classes, len(classes), dtype=torch.float32)
    for k, c in enumerate(classes):
        mass[:, 0, 0, c, k] = 1.0
    masses = [mass]
    for layer in range(len(trace.geometry) - 1, -1, -1):
        coefficients = trace.coefficients[_iteration_index(trace, layer, iteration)][layer]
        mass = propagate_mass(coefficients, mass, trace.geometry[layer])
        masses.append(mass)
    masses.reverse()
    return masses if per_layer else masses[0]


def routing_summary(
    trace,
    index: int = 0,
    label_names: Optional[Sequence[str]] = None,
    multi_label: bool = False,
    top_k: int = 1,
    argmax: bool = True,
) -> Dict[str, Any]:
    """JSON-ready summary of image ``index`` of a trace: class scores (sigmoid if ``multi_label`` else
    softmax), and per routing layer and iteration the mean / normalised routing entropy, the parent each
    child routes to most (``argmax_parent``, shape (H, W, children); null for the uniform first pass), how
    many children pick each parent type, the mean largest coefficient and the pose norms of the parents."""
    logits = trace.logits[index].float()
    scores = logits.sigmoid() if multi_label else logits.softmax(-1)
    names = class_names(label_names, logits.numel())
    order = scores.argsort(descending=True).tolist()
    out_layers = []
    for l, geometry in enumerate(trace.geometry):
        iterations = []
        for k, step in enumerate(trace.coefficients):
            r = step[l][index].float()  # (H, W, children, parents)
            norms = trace.poses[k][l + 1][index].float().norm(dim=-1)  # parents (H, W, N)
            best = r.argmax(-1)
            uniform = k == 0
            iterations.append(
                dict(
                    iteration=k + 1,
                    uniform=uniform,
                    entropy=float(routing_entropy(r).mean()),
                    entropy_normalized=float(routing_entropy(r, normalize=True).mean()),
                    max_coefficient=float(r.max(-1).values.mean()),
                    argmax_parent=None if uniform or not argmax else best.tolist(),
                    argmax_parent_counts=None
                    if uniform
                    else torch.bincount(best.flatten(), minlength=r.shape[-1]).tolist(),
                    pose_norm_mean=float(norms.mean()),
                    pose_norm_per_type=norms.mean((0, 1)).tolist(),
                )
            )
        out_layers.append(
            dict(
                name=trace.layer_names[l + 1],
                children=trace.layer_names[l],
                kind=geometry.kind,
                kernel_size=geometry.kernel_size,
                stride=geometry.stride,
                child_grid=list(geometry.child_grid),
                parent_grid=list(geometry.parent_grid),
                coefficients_shape=list(trace.coefficients[0][l].shape[1:]),
                used_iteration=trace.used_iterations[l] + 1,
                iterations=iterations,
            )
        )
    primary_norms = trace.poses[0][0][index].float().norm(dim=-1)
    return dict(
        logits=logits.tolist(),
        scores={names[c]: float(scores[c]) for c in range(len(names))},
        predicted=[names[c] for c in order[:top_k]],
        predicted_index=order[:top_k],
        primary=dict(grid=list(trace.poses[0][0].shape[1:4]), pose_norm_mean=float(primary_norms.mean())),
        layers=out_layers,
    )


def class_names(label_names: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """``label_names`` as strings when there is one per class, else the class indices."""
    if label_names is not None and len(label_names) == num_classes:
        return [str(n) for n in label_names]
    return [str(c) for c in range(num_classes)]


def class_heatmaps(
    trace,
    classes: Sequence[int],
    receptive_fields: np.ndarray,
    image_size: Tuple[int, int],
    iteration: Iteration = -1,
    mode: str = 'mean',
    heat: str = 'gain',
) -> Tensor:
    """Image-resolution heat maps (B, H, W, K) of how much each region routes to each class in ``classes``
    (K = len(classes)); see the module docstring and ``primary_to_image``. ``receptive_fields`` from
    ``primary_receptive_fields``. ``heat="mass"``: the top-down mass itself; ``heat="gain"``: the mass
    divided by the mass the same position gets under the uniform first pass (1 = no preference; removes the
    geometry, e.g. that central positions sit in more conv windows)."""
    mass = class_primary_mass(trace, classes, iteration).sum(3)  # (B, Hp, Wp, K)
    if heat == 'gain':
        mass = mass / class_primary_mass(trace, classes, 0).sum(3).clamp_min(1e-30)
    elif heat != 'mass':
        raise ValueError(f"heat must be 'gain' or 'mass', got {heat!r}")
    return primary_to_image(mass, receptive_fields, image_size, mode)


# ------------------------------------------------------------------------------------------- probe
def own_fraction(mass: Tensor, owner: Tensor, digit: int) -> float:
    """Share of a class capsule's digit-borne primary mass (P,) that comes from digit ``digit``."""
    mine, theirs = float((mass * owner[digit]).sum()), float((mass * owner[1 - digit]).sum())
    return mine / max(mine + theirs, 1e-30)


def part_whole_probe(
    model,
    images: Tensor,
    digit_masks: Tensor,
    labels: Tensor,
    iteration: Iteration = -1,
    ownership: str = 'soft',
    batch_size: int = 64,
    receptive_fields: Optional[np.ndarray] = None,
) -> Dict[str, Any]:
    """How much of each true digit's class-capsule routing mass comes from that digit's own pixels.

    images (N, C, H, W) preprocessed for the model; digit_masks (N, 2, H, W) each digit's pixel intensity
    (>= 0) before overlaying; labels (N, 2) the class of each mask (images whose second label is < 0 are
    skipped). Definitions in the module docstring. Returns ``own_fraction`` (mean over digits of all
    two-digit images), ``baseline`` (the same with the uniform first pass's mass), ``area_share``,
    ``separated`` (share of images where both digits get own_fraction > 0.5), the background share of the
    mass, and per-image values. ``receptive_fields``: ``primary_receptive_fields(model)`` if not given."""
    if ownership not in ('soft', 'hard'):
        raise ValueError(f"ownership must be 'soft' or 'hard', got {ownership!r}")
    labels = torch.as_tensor(labels).long()
    keep = labels[:, 1] >= 0
    images, digit_masks, labels = images[keep], torch.as_tensor(digit_masks)[keep].float(), labels[keep]
    if len(images) == 0:
        raise ValueError('part_whole_probe needs two-digit images (labels[:, 1] >= 0)')
    boxes = primary_receptive_fields(model) if receptive_fields is None else receptive_fields
    Hp, Wp = boxes.shape[:2]
    owner = digit_ownership(boxes, digit_masks, ownership)
    own, other, background, baseline, area = [], [], [], [], []
    for start in range(0, len(images), batch_size):
        trace = routing_trace(model, images[start : start + batch_size])
        mass = class_primary_mass(trace, None, iteration).sum(3)  # (b, Hp, Wp, classes)
        mass = mass.reshape(mass.shape[0], Hp * Wp, -1)
        uniform = class_primary_mass(trace, None, 0).sum(3).reshape(mass.shape)
        for b in range(mass.shape[0]):
            n = start + b
            for d in range(2):
                m = mass[b, :, labels[n, d]]  # (P,)
                mine, theirs = float((m * owner[n, d]).sum()), float((m * owner[n, 1 - d]).sum())
                everything = float(m.sum())
                own.append(own_fraction(m, owner[n], d))
                other.append(theirs / max(everything, 1e-30))
                background.append(max(0.0, everything - mine - theirs) / max(everything, 1e-30))
                baseline.append(own_fraction(uniform[b, :, labels[n, d]], owner[n], d))
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


# ------------------------------------------------------------------------------------ tree, entropy
class PartWholeTree(NamedTuple):
    """The capsules of one image that carry most routing mass to some class capsules (``part_whole_tree``)."""

    layer_names: List[str]  # capsule layers, primary first, class capsules last
    nodes: List[List[Tuple[str, int, float]]]  # per layer, most mass first: (label, dominant class k, mass)
    edges: List[Tuple[int, int, int, float]]  # (child layer l, child rank in l, parent rank in l + 1, mass flowing)
    classes: List[str]  # names of the chosen classes: class k of the nodes is classes[k]


def _node_label(grid: Tuple[int, int, int], index: int) -> str:
    H, W, N = grid
    position, n = divmod(index, N)
    return f'{n}' if (H, W) == (1, 1) else f'({position // W},{position % W})#{n}'


def part_whole_tree(
    trace,
    index: int,
    classes: Sequence[int],
    top: int = 6,
    iteration: Iteration = -1,
    label_names: Optional[Sequence[str]] = None,
) -> PartWholeTree:
    """Part-whole tree of image ``index``: the chosen class capsules on top; in each layer below, the ``top``
    capsules that receive most routing mass (r_ij * m_j, summed over the chosen classes) from the capsules
    kept in the layer above. Nodes are named ``(row,col)#type``; a node's class is the one whose mass
    dominates it."""
    if top < 0:
        raise ValueError(f'top must be 0 or more capsules per layer, got {top}')
    names = class_names(label_names, trace.logits.shape[1])
    masses = class_primary_mass(trace, classes, iteration, per_layer=True)  # per layer (B, H, W, N, K)
    grids = [g.child_grid for g in trace.geometry] + [trace.geometry[-1].parent_grid]
    L, K = len(masses), len(classes)
    kept: List[List[int]] = [[] for _ in range(L)]
    kept[-1] = list(classes)
    edges = []
    for l in range(L - 2, -1, -1):
        if not kept[l + 1]:  # top=0: nothing kept above, so nothing below
            continue
        coefficients = trace.coefficients[_iteration_index(trace, l, iteration)][l][index : index + 1]
        parent_total = masses[l + 1][index].sum(-1).reshape(-1)
        H, W, N = grids[l + 1]
        source = torch.zeros(1, H, W, N, len(kept[l + 1]))
        for k, p in enumerate(kept[l + 1]):
            source[0, p // (W * N), (p // N) % W, p % N, k] = parent_total[p]
        flow = propagate_mass(coefficients, source, trace.geometry[l])[0].reshape(-1, len(kept[l + 1]))
        kept[l] = flow.sum(1).argsort(descending=True)[:top].tolist()
        edges += [(l, rank, k, float(flow[c, k])) for rank, c in enumerate(kept[l]) for k in range(flow.shape[1])]
    largest = max((e[3] for e in edges), default=0.0)
    nodes = []
    for l in range(L):
        node_mass = masses[l][index].reshape(-1, K)
        nodes.append(
            [
                (
                    names[c] if l == L - 1 else _node_label(grids[l], c),
                    int(node_mass[c].argmax()),
                    float(node_mass[c].sum()),
                )
                for c in kept[l]
            ]
        )
    return PartWholeTree(
        list(trace.layer_names), nodes, [e for e in edges if e[3] > 1e-4 * largest], [names[c] for c in classes]
    )


def entropy_table(trace) -> np.ndarray:
    """Normalised routing entropy (images, iterations, routing layers)."""
    T, L = len(trace.coefficients), len(trace.coefficients[0])
    table = np.zeros((trace.logits.shape[0], T, L))
    for k in range(T):
        for l in range(L):
            table[:, k, l] = routing_entropy(trace.coefficients[k][l], normalize=True).flatten(1).mean(1).numpy()
    return table
