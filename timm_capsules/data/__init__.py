"""Data: MNIST sources and DiverseMultiMNIST (builder, training stream, export).

The DiverseMultiMNIST names import ``datasets`` (about a second), so they load on first use.
"""
from .mnist import (MnistDigits, hub_is_reachable, load_idx_folder, load_mnist, load_sample, read_idx,
                    resolve_source, write_idx)

_LAZY = {"DiverseMultiMNIST", "DiverseMultiMNISTConfig", "DiverseMultiMNISTStream", "MultiDigitBatch",
         "generate", "make_split", "load_diverse_multimnist", "export", "preview"}

__all__ = ["MnistDigits", "hub_is_reachable", "load_idx_folder", "load_mnist", "load_sample", "read_idx",
           "resolve_source", "write_idx", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        from . import diverse_multimnist
        return getattr(diverse_multimnist, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
