"""Capsule networks with inverted dot-product attention routing as timm models.

Importing this package registers its models with timm's registry.
"""
from . import capsnet  # noqa: F401  (registers the models)
from . import baselines  # noqa: F401

__version__ = "0.1.0"
