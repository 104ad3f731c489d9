"""Data: MNIST sources, DiverseMultiMNIST (builder, training stream, export) and Affine MNIST
(translated vs affinely transformed digits, ``timm_capsules.data.affine_mnist``).

The DiverseMultiMNIST and Affine MNIST names import ``datasets`` and ``torch`` (a second or more), so
they load on first use.
"""

from .mnist import (
    MnistDigits,
    hub_is_reachable,
    load_idx_folder,
    load_mnist,
    load_sample,
    read_idx,
    resolve_source,
    write_idx,
)

# public name -> (module, attribute)
_LAZY = {
    **{
        name: ('diverse_multimnist', name)
        for name in (
            'DiverseMultiMNIST',
            'DiverseMultiMNISTConfig',
            'DiverseMultiMNISTStream',
            'MultiDigitBatch',
            'generate',
            'make_split',
            'load_diverse_multimnist',
            'export',
            'preview',
        )
    },
    # affine_mnist's functions share DiverseMultiMNIST's names, so here they carry the dataset's name
    'AffineBatch': ('affine_mnist', 'AffineBatch'),
    'generate_affine_mnist': ('affine_mnist', 'generate'),
    'make_affine_mnist_split': ('affine_mnist', 'make_split'),
    'export_affine_mnist': ('affine_mnist', 'export'),
    'preview_affine_mnist': ('affine_mnist', 'preview'),
}

__all__ = [
    'MnistDigits',
    'hub_is_reachable',
    'load_idx_folder',
    'load_mnist',
    'load_sample',
    'read_idx',
    'resolve_source',
    'write_idx',
    *sorted(_LAZY),
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(f'.{module}', __name__), attribute)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
