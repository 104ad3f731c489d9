"""See the parse tree: routing introspection of CapsNets, a part-whole probe, and the command that draws them
(``python -m timm_capsules.parse_tree --help``).

``analysis`` reads routing traces (definitions in its docstring), ``inputs`` chooses the dataset and prepares
images, ``plots`` draws arrays into PNGs, and ``cli`` is the command.
"""

from .analysis import (
    Iteration,
    PartWholeTree,
    class_heatmaps,
    class_names,
    class_primary_mass,
    digit_ownership,
    entropy_table,
    own_fraction,
    part_whole_probe,
    part_whole_tree,
    primary_receptive_fields,
    primary_to_image,
    propagate_mass,
    receptive_field_matrix,
    routing_entropy,
    routing_summary,
    routing_trace,
)
from .inputs import DATASETS, diverse_multimnist_samples, display_image, load_images, model_dataset, prepare_arrays

__all__ = [
    'Iteration',
    'PartWholeTree',
    'class_heatmaps',
    'class_names',
    'class_primary_mass',
    'digit_ownership',
    'entropy_table',
    'own_fraction',
    'part_whole_probe',
    'part_whole_tree',
    'primary_receptive_fields',
    'primary_to_image',
    'propagate_mass',
    'receptive_field_matrix',
    'routing_entropy',
    'routing_summary',
    'routing_trace',
    'DATASETS',
    'diverse_multimnist_samples',
    'display_image',
    'load_images',
    'model_dataset',
    'prepare_arrays',
]
