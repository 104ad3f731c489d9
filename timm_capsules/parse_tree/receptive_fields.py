"""Where primary capsules look in the image: their receptive fields (measured with autograd through the model's
public ``forward_intermediates``), routing mass carried from primary positions onto pixels, and which digit each
position belongs to (the part-whole probe's ownership). Definitions in ``analysis.py``'s docstring.
"""

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ['primary_receptive_fields', 'receptive_field_matrix', 'primary_to_image', 'digit_ownership']


def _primary_level(model) -> int:
    """The feature level (``feature_info`` / ``forward_intermediates`` index) of the primary capsules."""
    modules = [info['module'] for info in model.feature_info]
    if 'primary' not in modules:
        raise ValueError(f'the model has no primary capsule feature level (feature_info modules: {modules})')
    return modules.index('primary')


def primary_receptive_fields(model, seed: int = 0, chunk: int = 64) -> np.ndarray:
    """Image box ``(y0, y1, x0, x1)`` (half-open) seen by each primary capsule position: (Hp, Wp, 4) ints.

    Measured with autograd (see the module docstring); the caller keeps the result (it costs a backward
    pass per ``chunk`` positions)."""
    level = _primary_level(model)

    def primary_map(x: Tensor) -> Tensor:  # (B, N * d, Hp, Wp)
        return model.forward_intermediates(x, indices=[level], stop_early=True, intermediates_only=True)[0]

    C, (H, W) = model.in_chans, model.img_size
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(1, C, H, W, generator=generator).to(param.device, param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            Hp, Wp = primary_map(base).shape[-2:]
        positions = [(y, x) for y in range(Hp) for x in range(Wp)]
        boxes = np.zeros((Hp, Wp, 4), np.int64)
        for start in range(0, len(positions), chunk):
            part = positions[start : start + chunk]
            x_in = base.repeat(len(part), 1, 1, 1).requires_grad_(True)
            with torch.enable_grad():
                maps = primary_map(x_in)
                ys = torch.tensor([p[0] for p in part], device=maps.device)
                xs = torch.tensor([p[1] for p in part], device=maps.device)
                picked = maps[torch.arange(len(part), device=maps.device), :, ys, xs]  # (n, N * d)
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
    return boxes


def receptive_field_matrix(boxes: np.ndarray, H: int, W: int) -> Tensor:
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
    matrix = receptive_field_matrix(boxes, H, W).to(mass.device, torch.float32)
    if mode == 'sum':
        matrix = matrix / matrix.sum(1, keepdim=True).clamp_min(1)
    elif mode == 'mean':
        matrix = matrix / matrix.sum(0, keepdim=True).clamp_min(1)
    else:
        raise ValueError(f"mode must be 'mean' or 'sum', got {mode!r}")
    image = torch.einsum('bpk,pq->bqk', mass.reshape(B, Hp * Wp, K).float(), matrix).reshape(B, H, W, K)
    return image[..., 0] if squeeze else image


def digit_ownership(boxes: np.ndarray, digit_masks: Tensor, ownership: str = 'soft') -> Tensor:
    """How much each primary position belongs to each digit: (N, 2, H, W) masks -> (N, 2, Hp*Wp)."""
    H, W = digit_masks.shape[-2:]
    box = receptive_field_matrix(boxes, H, W)  # (P, H*W)
    seen = torch.einsum('pq,ndq->ndp', box, digit_masks.float().reshape(len(digit_masks), 2, H * W))
    total = seen.sum(1, keepdim=True)
    if ownership == 'soft':
        return torch.where(total > 0, seen / total.clamp_min(1e-12), torch.zeros_like(seen))
    return torch.stack([seen[:, 0] > seen[:, 1], seen[:, 1] > seen[:, 0]], 1).float()
