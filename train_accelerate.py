#!/usr/bin/env python
"""Train and evaluate the capsule networks of *Capsules with Inverted Dot-Product Attention Routing*
(Tsai et al., ICLR 2020) with Hugging Face Accelerate, from one CPU to many GPUs.

    python train_accelerate.py                                       # quick DiverseMultiMNIST run, CPU-sized
    python train_accelerate.py --preset cifar10_resnet               # a paper recipe (timm_capsules/presets.py)
    accelerate config                                                # once, on a machine with many GPUs; then
    accelerate launch train_accelerate.py --preset multimnist_matrix  # on all of them (docs/training.md)

Explicit arguments override a preset. Every option is spelled with dashes or underscores
(``--batch-size`` == ``--batch_size``). The run itself is ``timm_capsules.train.run``, the one the experiment
runner calls too: in ``timm_capsules/train/loop.py`` it reads top to bottom like accelerate's
complete_cv_example.py (Accelerator -> data -> timm.create_model -> timm optimizer and scheduler -> prepare ->
resume -> the loop -> evaluation -> save / push).
"""

import json

from timm_capsules.train import TrainConfig, run


def main(argv=None):
    """One run of the command line ``argv`` (a ``RunResult``), or the resolved configuration with
    ``--print-config``."""
    config = TrainConfig.from_argv(argv)
    if config.print_config:
        print(json.dumps(config.resolved(), indent=2))
        return config.resolved()
    return run(config)


if __name__ == '__main__':
    main()
