"""What the benchmark scripts share: the machine's reference matmul rate, the settings a result depends on
besides the code, and how a result is emitted."""

import json
import os
import time

# environment variables that change a result without changing the code: the kernels used, the threads, the
# allocator (glibc's tunables made batch-32 inference 7-11% faster on the project's machine)
SETTINGS_VARIABLES = (
    'TIMM_CAPSULES_FUSED_ROUTING',
    'TIMM_CAPSULES_TRITON_ROUTING',
    'OMP_NUM_THREADS',
    'GLIBC_TUNABLES',
    'LD_PRELOAD',
)


def matmul_gflops(device='cpu', size=2048, repeats=5):
    """The best of ``repeats`` plain float32 ``size``^2 matmuls, in GFLOP/s: the rate the others are read against."""
    import torch

    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    best = float('inf')
    for _ in range(repeats):
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == 'cuda':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def settings():
    """How the fused CPU kernels are compiled, and those of ``SETTINGS_VARIABLES`` that are set."""
    from timm_capsules.kernels import KERNEL_CFLAGS

    return dict(
        kernel_cflags=' '.join(KERNEL_CFLAGS),
        environment={name: os.environ[name] for name in SETTINGS_VARIABLES if name in os.environ},
    )


def emit(record, json_path=None):
    """One JSON object on stdout (machine-readable), and in ``json_path`` when given; returns the record."""
    print(json.dumps(record))
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(record, f, indent=2)
            f.write('\n')
    return record
