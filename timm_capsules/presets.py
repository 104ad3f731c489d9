"""Training recipes: the paper's, its comparison systems', and the quick CPU default.

Each preset is a set of ``train_accelerate.py`` argument values (explicit arguments override them); the
hub configs' training section and the model cards are rendered from the same dicts. The loss is not part of
a recipe: it follows from what the model returns (``model.output_type``, see ``losses.py``) and whether
the dataset is multi-label.
"""

from typing import Any, Dict, Optional

__all__ = ['PRESETS', 'QUICK', 'get_preset', 'preset_for_model']

# The paper's recipes (appendix A, B): SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128,
# 350 epochs, lr x0.1 at epochs 150 and 250. For DiverseMultiMNIST one 'epoch' is 60,000 freshly
# generated images (21M images in all) and the fixed test set has 10,000.
PAPER_SGD = dict(
    opt='sgd',
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    batch_size=128,
    epochs=350,
    sched='multistep',
    decay_milestones=[150, 250],
    decay_rate=0.1,
    warmup_epochs=0,
)
MULTIMNIST = dict(dataset='diverse_multimnist', epoch_size=60_000, test_size=10_000)
PRESETS = {
    'cifar10_simple': dict(PAPER_SGD, model='capsnet_simple_cifar10', dataset='cifar10'),
    'cifar10_resnet': dict(PAPER_SGD, model='capsnet_resnet_cifar10', dataset='cifar10'),
    'cifar100_simple': dict(PAPER_SGD, model='capsnet_simple_cifar100', dataset='cifar100'),
    'cifar100_resnet': dict(PAPER_SGD, model='capsnet_resnet_cifar100', dataset='cifar100'),
    'multimnist_matrix': dict(PAPER_SGD, model='capsnet_matrix_multimnist', **MULTIMNIST),
    'multimnist_vector': dict(PAPER_SGD, model='capsnet_vector_multimnist', **MULTIMNIST),
}
# The paper's comparison systems: dynamic routing with Adam 1e-3, EM routing with Adam 1e-2, the CNNs
# with SGD 0.1; the same batch, epochs and schedule. Their losses follow from what the model returns
# (see losses.py): margin loss on capsule lengths, spread loss on activations, CE/BCE on logits.
ADAM = dict(opt='adam', momentum=0.9, weight_decay=0.0)
for data in ('cifar10', 'cifar100'):
    PRESETS.update(
        {
            f'{data}_dynamic_simple': dict(
                PAPER_SGD, **ADAM, lr=1e-3, model=f'dynamic_capsnet_simple_{data}', dataset=data
            ),
            f'{data}_dynamic_resnet': dict(
                PAPER_SGD, **ADAM, lr=1e-3, model=f'dynamic_capsnet_resnet_{data}', dataset=data
            ),
            f'{data}_em_simple': dict(PAPER_SGD, **ADAM, lr=1e-2, model=f'em_capsnet_simple_{data}', dataset=data),
            f'{data}_em_resnet': dict(PAPER_SGD, **ADAM, lr=1e-2, model=f'em_capsnet_resnet_{data}', dataset=data),
            f'{data}_cnn': dict(PAPER_SGD, model=f'cnn_baseline_{data}', dataset=data),
            f'{data}_resnet18': dict(PAPER_SGD, model=f'resnet18_{data}', dataset=data),
        }
    )
PRESETS.update(
    {
        'multimnist_cnn': dict(PAPER_SGD, model='cnn_baseline_multimnist', **MULTIMNIST),
        'multimnist_cnn_fc': dict(PAPER_SGD, model='cnn_fc_multimnist', **MULTIMNIST),
        'multimnist_dynamic_vector': dict(
            PAPER_SGD, **ADAM, lr=1e-3, model='dynamic_capsnet_vector_multimnist', **MULTIMNIST
        ),
    }
)
# No preset: a small matrix-pose CapsNet on DiverseMultiMNIST (built-in MNIST sample offline) that
# learns visibly on a 2-core CPU in a few minutes: 64 backbone channels instead of 1024, 16-d (4x4)
# poses instead of 64-d, 8 capsule types; 130k parameters instead of 10M.
QUICK = dict(
    model='capsnet_matrix_multimnist',
    model_kwargs=dict(backbone_args={'out_chs': 64}, primary_caps=8, pose_dim=16, capsule_layers=[('conv', 8, 3, 1)]),
    dataset='diverse_multimnist',
    epoch_size=8192,
    test_size=2000,
    epochs=30,
    batch_size=32,
    opt='adam',
    lr=2e-3,
    momentum=0.9,
    weight_decay=0.0,
    sched='cosine',
    decay_milestones=[],
    decay_rate=0.1,
    warmup_epochs=0,
)


def get_preset(name: Optional[str]) -> Dict[str, Any]:
    """A copy of preset ``name``'s argument values (``QUICK`` for None)."""
    if name is None:
        return dict(QUICK)
    if name not in PRESETS:
        raise KeyError(f'unknown preset {name!r}; known: {", ".join(sorted(PRESETS))}')
    return dict(PRESETS[name])


def preset_for_model(model_name: str) -> Optional[str]:
    """The preset that trains ``model_name`` (the paper's recipe for it), or None."""
    return next((name for name, preset in PRESETS.items() if preset['model'] == model_name), None)
