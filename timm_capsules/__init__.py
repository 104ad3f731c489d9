"""Capsule networks with inverted dot-product attention routing as timm models.

Importing this package registers its models with timm's registry: the paper's CapsNets (``capsnet``) and
its comparison systems (``dynamic_capsnet``, ``em_capsnet``, ``cnn_baselines``), one timm-style model file
per family.
"""

from . import capsnet, cnn_baselines, dynamic_capsnet, em_capsnet  # noqa: F401  (registers the models)

__version__ = '0.1.0'

# the modules whose models ``import timm_capsules`` registers: timm.list_models(module=MODEL_MODULES)
MODEL_MODULES = ['capsnet', 'dynamic_capsnet', 'em_capsnet', 'cnn_baselines']
