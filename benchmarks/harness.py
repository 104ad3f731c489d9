"""What the benchmark scripts share: the machine's reference matmul rate and how a result is emitted."""
import json
import time


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
    return 2 * size ** 3 / best / 1e9


def emit(record, json_path=None):
    """One JSON object on stdout (machine-readable), and in ``json_path`` when given; returns the record."""
    print(json.dumps(record))
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(record, f, indent=2)
            f.write('\n')
    return record
