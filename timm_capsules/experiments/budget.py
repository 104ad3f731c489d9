"""The GPU budget of the ``gpu`` scale: each run's seconds on its shard, from its model's training FLOPs (counted on
the meta device) and the throughputs measured on the first GPU call."""

import json
from typing import Dict, Sequence

from .plans import Run

# shards for every FLOP, 2,000 augmented images/s per DataLoader worker (this project's 2-core CPU: 460 us a sample),
# 8 s a run: the 40 runs at 4.4 min over 4 shards. The first H200 call (results/gpu/, 2026-12-04; 4 shards side by
# side, 4 workers each on the machine's 16 cores) measured otherwise: data-bound runs (IDA t = 1, 2; DR) fed 3,300
# images/s a shard, 830 a worker, and the routing passes that need votes (the FLOPs a model has beyond its t = 1
# count), in plain tensor ops, are bound by the GPU's memory traffic: IDA t = 3 and t = 5 ran them at 0.57 and 0.66
# TFLOP/s over the shards, while the rest runs at the dense rate of ResNet-18's bf16 step in the speed harness
# (benchmarks/results/cuda_b128_eager.json: 426 GFLOP in 12 ms, 35 TFLOP/s). The figures below are those
# measurements, so the estimates and the time limit say what a call can finish.
GPU_ASSUMPTIONS = dict(
    dense_tflops=35.0, routing_tflops=0.6, images_per_s_per_worker=830.0, workers=4, shards=4, overhead_s=4.0
)
_GFLOP_CACHE: Dict[str, float] = {}


def train_gflop_per_image(train_args: Sequence[str], **override) -> float:
    """Training GFLOP per 28x28 image (forward and backward, torch's FLOP counter) of a run's model, counted on the
    meta device: nothing is allocated, and routing runs in plain tensor ops (the fused kernels are the CPU's), as on
    a GPU."""
    key = json.dumps([list(train_args), override], sort_keys=True)
    if key not in _GFLOP_CACHE:
        import timm
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from timm_capsules.train import TrainConfig

        args = TrainConfig.from_argv(list(train_args))
        model = timm.create_model(args.model, device='meta', **dict(args.model_kwargs, num_classes=10, **override))
        images = torch.zeros(2, args.model_kwargs.get('in_chans', 3), 28, 28, device='meta')
        with FlopCounterMode(display=False) as counter:
            model(images).float().sum().backward()
        _GFLOP_CACHE[key] = counter.get_total_flops() / 2 / 1e9
    return _GFLOP_CACHE[key]


def gpu_estimate(run: Run, test_images: int = 10000) -> float:
    """Seconds one run takes on its shard under GPU_ASSUMPTIONS: the slower of its data (training images and one
    evaluation per epoch through the shard's DataLoader workers) and its GPU work (training FLOPs, evaluation at a
    third of them: the routing passes' share, those beyond the model's t = 1 count, at the routing rate, the rest at
    the dense rate, each the shard's share of the GPU), plus the fixed cost per run."""
    a = GPU_ASSUMPTIONS
    epochs = max(1, run.image_budget // 60000)
    images = run.image_budget + epochs * test_images / 3  # in training-step equivalents
    data_s = (run.image_budget + epochs * test_images) / (a['images_per_s_per_worker'] * a['workers'])
    total = train_gflop_per_image(run.train_args)
    dense = train_gflop_per_image(run.train_args, iterations=1) if 'iterations' in run.row else total
    seconds_per_image = (dense / a['dense_tflops'] + (total - dense) / a['routing_tflops']) / 1e3  # GFLOP / TFLOP/s
    gpu_s = images * seconds_per_image * a['shards']
    return max(data_s, gpu_s) + a['overhead_s']
