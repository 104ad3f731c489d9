"""The studies' training recipes as data: a scale's recipe for one dataset is written once here, and both the runs'
``train_accelerate.py`` arguments and the protocol's prose (printed beside every table, stored in every record) are
generated from it. The arguments, in their order, make the run ids (a hash of them), and the prose is in the
committed records and docs/results.md: changing either is a new protocol, whose runs start afresh."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

OPTIMIZER_NAMES = {'adam': 'Adam', 'sgd': 'SGD'}
AUGMENTATION_WORDS = {
    'none': 'no augmentation',
    'crop-flip': 'light augmentation (pad 4 + random crop + horizontal flip)',
}
FASHION_MNIST = 'Fashion-MNIST (real, 60k/10k, 28x28 grey; in place of CIFAR)'


@dataclass(frozen=True)
class Recipe:
    """One dataset's recipe at one scale. ``arguments``: train_accelerate.py's options in command-line order, a
    string value with ``{fields}`` of ``facts`` (``{folder}``: the exported dataset's folder under the data
    directory) and a dict value chosen per table row kind; ``facts``: the numbers the arguments, the prose, the image
    budget and the data export share; ``prose``: the protocol's sentence with the arguments and facts as fields
    (None: the paper's recipe, which ``presets.py`` describes)."""

    dataset: str  # the runs' dataset name: part of the run ids, the records' ``dataset``
    arguments: Dict[str, Any]
    facts: Dict[str, Any] = field(default_factory=dict)
    prose: Optional[str] = None

    def argv(self, data_dir: Path, kind: Optional[str] = None, **override) -> List[str]:
        fields = dict(self.facts)
        if 'folder' in fields:
            fields['folder'] = data_dir / fields['folder']
        argv = []
        for name, value in dict(self.arguments, **override).items():
            value = value[kind] if isinstance(value, dict) else value
            argv += [f'--{name.replace("_", "-")}', str(value).format(**fields)]
        return argv

    def image_budget(self, epochs: Optional[int] = None) -> int:
        """Training images a run sees."""
        return self.facts['epoch_images'] * int(self.arguments['epochs'] if epochs is None else epochs)

    def model_input(self) -> Dict[str, int]:
        """The create_model arguments that fit the models to this dataset's images (in_chans, img_size)."""
        return dict(self.facts.get('model_input', {}))

    def protocol(self) -> str:
        args = self.arguments
        epochs = int(args['epochs'])
        return self.prose.format(
            **self.facts,
            **args,
            epochs_words='one epoch' if epochs == 1 else f'{epochs} epochs',
            optimizer=OPTIMIZER_NAMES[args['opt']],
            augmentation=AUGMENTATION_WORDS.get(args.get('augment'), ''),
            input_arguments=', '.join(f'{k}={v}' for k, v in self.model_input().items()),
        )


# ---- cpu: a reduced protocol for a 2-core machine without network
CPU_OPTIMIZER = dict(opt='adam', lr='2e-3', weight_decay='0', sched='cosine', warmup_epochs='0')
CPU_RECIPES = {
    'fashion_mnist': Recipe(
        'fashion_mnist',
        dict(
            dataset='hf:{folder}',
            train_split='train[:{epoch_images}]',
            epochs=1,
            batch_size=64,
            **CPU_OPTIMIZER,
            augment='none',
        ),
        dict(folder='fashion_mnist', epoch_images=12800, test_images=10000, model_input=dict(in_chans=1, img_size=28)),
        FASHION_MNIST + ': the first {epoch_images:,} training images, {epochs_words}, batch {batch_size}, '
        '{optimizer} {lr} with {sched} decay, {augmentation}; top-1 on all {test_images:,} test images; '
        'models built with {input_arguments}',
    ),
    'diverse_multimnist': Recipe(
        'diverse_multimnist',
        dict(
            dataset='diverse_multimnist',
            mnist_source='sample',
            epoch_size='{epoch_images}',
            test_size='{test_images}',
            epochs=8,
            batch_size=32,
            **CPU_OPTIMIZER,
        ),
        dict(epoch_images=8192, test_images=2000),
        'DiverseMultiMNIST from the built-in MNIST sample (4,000 train / 1,000 test digits): {epochs_words} of '
        '{epoch_images:,} generated images, batch {batch_size}, {optimizer} {lr} with {sched} decay; exact match on a '
        "fixed {test_images:,}-image test set; small models (0.12-0.96M parameters; the paper's: 10-42M)",
    ),
    'affine_mnist': Recipe(
        'affine_mnist',
        dict(
            dataset='hf:{folder}',
            train_split='train_translated',
            test_split='test_affine',
            extra_test_split='test_translated',
            epochs=3,
            augment='none',
            batch_size=32,
            **CPU_OPTIMIZER,
        ),
        # the export: 20,000 training and 5,000 test images of each kind from the built-in sample
        dict(
            folder='affine_mnist', epoch_images=20000, test_images=5000, source='sample', model_input=dict(img_size=40)
        ),
        'Affine MNIST from the built-in MNIST sample: {epoch_images:,} translated {model_input[img_size]}x'
        '{model_input[img_size]} training images, {epochs_words}, batch {batch_size}, {optimizer} {lr} with {sched} '
        'decay, {augmentation}; top-1 on {test_images:,} translated and {test_images:,} affinely transformed test '
        'images of the held-out digits; models about 0.13M parameters',
    ),
}

# ---- gpu: the Fashion-MNIST studies at full size for one GPU, the budget sized by ``budget.gpu_estimate``
GPU_LR = {'IDA': 2e-3, 'DR': 1e-3, 'EM': 2e-3, 'CNN': 2e-3, 'ResNet-18': 2e-3}
GPU_RECIPES = {
    'fashion_mnist': Recipe(
        'fashion_mnist',
        dict(
            dataset='hf:{folder}',
            epochs=2,
            batch_size=128,
            opt='adam',
            lr=GPU_LR,
            weight_decay='0',
            sched='cosine',
            warmup_epochs='0',
            augment='crop-flip',
            mixed_precision='bf16',
        ),
        dict(folder='fashion_mnist', epoch_images=60000, test_images=10000, model_input=dict(in_chans=1, img_size=28)),
        FASHION_MNIST + ': all {epoch_images:,} training images, {epochs_words}, batch {batch_size}, '
        '{mixed_precision} autocast, {augmentation}, {optimizer} with {sched} decay and no warm-up: lr {lr[DR]:g} for '
        "DR (the paper's Adam rate for it), {lr[IDA]:g} for IDA, EM and the CNNs (the CPU protocol's, which trained "
        "all of them; the paper's SGD 0.1 schedule is made for 350 epochs); top-1 on all {test_images:,} test "
        'images; models built with {input_arguments}',
    ),
}
GPU_EPOCHS = GPU_RECIPES['fashion_mnist'].arguments['epochs']

# ---- paper: the presets (timm_capsules/presets.py) but for Affine MNIST, which the paper does not train
PAPER_AFFINE = Recipe(
    'affine_mnist',
    dict(
        dataset='hf:{folder}',
        train_split='train_translated',
        test_split='test_affine',
        extra_test_split='test_translated',
        epochs=50,
        batch_size=128,
        opt='adam',
        lr='1e-3',
        weight_decay='0',
        sched='cosine',
        augment='none',
    ),
    dict(folder='affine_mnist_full', epoch_images=60000, model_input=dict(img_size=40)),
)

RECIPES = {'cpu': CPU_RECIPES, 'gpu': GPU_RECIPES, 'paper': {'affine_mnist': PAPER_AFFINE}}
CPU_PROTOCOL = {dataset: recipe.protocol() for dataset, recipe in CPU_RECIPES.items()}
GPU_PROTOCOL = {dataset: recipe.protocol() for dataset, recipe in GPU_RECIPES.items()}
PROTOCOLS = {'cpu': CPU_PROTOCOL, 'gpu': GPU_PROTOCOL}


def protocol_of(scale: str, dataset: str) -> str:
    """The protocol's prose a record of this scale and dataset carries ('paper recipe' at paper scale)."""
    return PROTOCOLS.get(scale, {}).get(dataset, 'paper recipe')
