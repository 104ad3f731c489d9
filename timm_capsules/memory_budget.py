"""The memory budget of a model described by someone else's ``config.json``: its parameters plus the tensors
one forward pass of one image creates, estimated on the meta device, so that nothing is allocated.
``timm_capsules.loading`` holds every model built from a ``config.json`` to it."""

import itertools
import math
import os
from typing import Callable, Optional, Tuple

import torch
import torch.utils._python_dispatch
import torch.utils._pytree

__all__ = ['MEMORY_LIMIT_ENV', 'DEFAULT_MEMORY_LIMIT_GB', 'memory_limit_bytes', 'estimate_memory']

# in GiB; set the environment variable to allow more (or less)
MEMORY_LIMIT_ENV, DEFAULT_MEMORY_LIMIT_GB = 'TIMM_CAPSULES_MEMORY_LIMIT_GB', 8.0


def memory_limit_bytes() -> int:
    """The budget in bytes: ``TIMM_CAPSULES_MEMORY_LIMIT_GB`` (GiB) or ``DEFAULT_MEMORY_LIMIT_GB``; ``ValueError``
    for a value that is not a positive number."""
    text = os.environ.get(MEMORY_LIMIT_ENV)
    if text is None:
        return int(DEFAULT_MEMORY_LIMIT_GB * 2**30)
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f'{MEMORY_LIMIT_ENV}={text!r}: expected a positive number of GiB')
    return int(value * 2**30)


class _TensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Adds up the bytes of every tensor the operations create (on the meta device: nothing is allocated)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in torch.utils._pytree.tree_leaves(out):
            if isinstance(item, torch.Tensor):
                self.total += item.numel() * item.element_size()
        return out


def estimate_memory(
    build: Callable[[], torch.nn.Module],
    input_size: Optional[Tuple[int, int, int]] = None,
) -> Tuple[int, Optional[int]]:
    """(parameter and buffer bytes, bytes of the tensors one forward pass at batch 1 creates) of the model
    ``build()`` makes, built on the meta device. The activations are None when the parameters alone are over
    the budget, or the model cannot run on the meta device. ``input_size`` (channels, height, width) is used
    when the model does not say its own (``in_chans``, ``img_size``)."""
    with torch.device('meta'):
        model = build()
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    if weights > memory_limit_bytes():
        return weights, None
    channels = getattr(model, 'in_chans', None) or (input_size or (3,))[0]
    img_size = getattr(model, 'img_size', None) or (input_size or (3, 224, 224))[1:]
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    counter = _TensorBytes()
    try:
        with counter, torch.no_grad():
            model.eval()(torch.empty(1, channels, height, width, device='meta'))
    except Exception:  # an operation without a meta kernel: the parameters are all that can be told
        return weights, None
    return weights, counter.total
