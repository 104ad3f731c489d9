"""The package's kernels, chosen in one place: building and caching the C++ extensions (``csrc/``), the switches
between the fused kernels and plain tensor ops, the dispatch each layer asks, and ``preload``.

- **Build.** ``routing_kernel`` (inverted dot-product attention and the pose norm, ``csrc/routing.cpp``) and
  ``em_routing_kernel`` (EM routing, ``csrc/em_routing.cpp``) compile on first use, are verified against their
  sources and flags before they are loaded, and are None where no compiler is found (routing then runs in plain
  tensor ops).
- **Switches.** ``TIMM_CAPSULES_FUSED_ROUTING=0`` (``use_fused_routing``) routes with plain tensor ops everywhere;
  ``TIMM_CAPSULES_TRITON_ROUTING=1`` (``triton_routing_enabled``) routes CUDA tensors with ``routing_triton``'s
  kernels; ``set_fused_routing(model, enable)`` switches one model.
- **Dispatch.** ``routes_fused`` (an attention pass), ``norms_fused`` (a pose norm) and ``em_kernel_applies``
  (EM routing) say whether a call runs in a kernel; ``plain_ops_only`` is when none may (tracing, export).
- **Preload.** ``preload(model, device)`` builds or loads what the model's modules route with, before training.

The routing math the kernels compute, and its reference in tensor ops, stays in ``routing.py`` and
``routing_baselines.py``.
"""

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import List, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    'use_fused_routing',
    'triton_routing_enabled',
    'supports_triton',
    'routing_kernel',
    'em_routing_kernel',
    'load_extension',
    'is_tracing',
    'plain_ops_only',
    'routes_fused',
    'norms_fused',
    'em_kernel_applies',
    'set_fused_routing',
    'kernels_used',
    'preload',
    'pose_norm',
    'KERNEL_CFLAGS',
    'KERNEL_SOURCE',
    'EM_KERNEL_SOURCE',
]


# ---- switches -----------------------------------------------------------------------------------------


def triton_routing_enabled() -> bool:
    """``TIMM_CAPSULES_TRITON_ROUTING=1`` (CUDA tensors route through ``routing_triton``'s kernels; off by
    default until they are measured on a GPU) and Triton installed (CPU-only torch builds come without it)."""
    return os.environ.get('TIMM_CAPSULES_TRITON_ROUTING', '0') == '1' and importlib.util.find_spec('triton') is not None


# a child's votes for every parent, and their products, are held by one Triton program: J x R x C x T values at most
TRITON_MAX_PRODUCT_VALUES = 4096


def supports_triton(rows: int, weight_shape: Tuple[int, ...]) -> bool:
    """Whether a layer whose child poses have ``rows`` rows and whose weight is (I, J, C, T) fits the Triton
    kernels: pose rows, columns and parent columns powers of 2 (Triton's block sizes; the paper's 4x4 poses), and
    a child's products for every parent in registers."""
    _, J, C, T = weight_shape
    powers = all(n & (n - 1) == 0 for n in (rows, C, T))
    return powers and (1 << max(0, J - 1).bit_length()) * rows * C * T <= TRITON_MAX_PRODUCT_VALUES


def use_fused_routing() -> bool:
    """Whether capsule layers route on the CPU with the fused kernel (``csrc/routing.cpp``) by default.
    Set ``TIMM_CAPSULES_FUSED_ROUTING=0`` to use plain tensor ops (the reference) everywhere."""
    return os.environ.get('TIMM_CAPSULES_FUSED_ROUTING', '1') != '0'


# ---- building and caching the extensions --------------------------------------------------------------

_kernel = None  # the compiled extension once loaded; False when it cannot be built here
KERNEL_SOURCE = Path(__file__).parent / 'csrc' / 'routing.cpp'
# -march=native picks the instructions (AVX-512 where the CPU has it). On x86-64, -mtune=generic keeps the
# compiler's tuning for current Intel and AMD cores alike instead of -march=native's nearest CPU that the
# compiler knows, which for a CPU newer than the compiler is an older core's model: GCC 12 tunes a Zen 4 as a
# Zen 3 (a core without AVX-512), and both kernels ran 3-9% slower so (measured 2026-12-01, routing forward
# and backward, and an EM training step)
KERNEL_CFLAGS = ['-O3', '-march=native', *(['-mtune=generic'] if platform.machine() == 'x86_64' else []), '-fopenmp']


def routing_kernel():
    """The fused routing extension, or None when this machine cannot build it (no C++ compiler).

    Compiled on first use (about a minute), in ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``.
    A build is verified before it is loaded: a checksum of the library is written after a successful build,
    and a library that no longer matches it (a truncated file would crash the process with SIGBUS) or
    that was built from another source or with other flags is built again.
    """
    global _kernel
    if _kernel is None:
        _kernel = load_extension(KERNEL_SOURCE, 'routing')
    return _kernel or None


_em_kernel = None  # the compiled EM extension once loaded; False when it cannot be built here
EM_KERNEL_SOURCE = Path(__file__).parent / 'csrc' / 'em_routing.cpp'


def em_routing_kernel():
    """The EM routing extension (``csrc/em_routing.cpp``), or None when this machine cannot build it (built,
    verified and cached like ``routing_kernel``)."""
    global _em_kernel
    if _em_kernel is None:
        _em_kernel = load_extension(EM_KERNEL_SOURCE, 'em_routing')
    return _em_kernel or None


def load_extension(source: Path, kind: str):
    """Builds (or loads a verified build of) one of the package's C++ sources as ``routing_kernel`` describes;
    False, with a warning, when it cannot be built. ``kind`` names the build folder and the library."""
    folder, name = _kernel_build_folder(kind)
    library, stamp = folder / f'{name}.so', folder / f'{name}.sha256'
    # the headers the sources share (csrc/*.h) are part of every build
    sources = [source, *sorted(source.parent.glob('*.h'))]
    expected = f'{" ".join(_sha256(path) for path in sources)} {library.name} {" ".join(KERNEL_CFLAGS)}'
    try:
        verified = stamp.read_text().split('\n')[:2] == [expected, _sha256(library)]
    except OSError:
        verified = False
    try:
        return (
            _import_library(name, library)
            if verified
            else _build_kernel(name, folder, library, stamp, expected, source, kind)
        )
    except Exception as error:  # a compiler or header missing: route with plain tensor ops instead
        warnings.warn(
            f'the fused {kind} kernel could not be built ({error}); routing falls back to plain '
            f'tensor ops (slower, more memory). Set TIMM_CAPSULES_FUSED_ROUTING=0 to silence this.'
        )
        return False


def _kernel_build_folder(kind: str = 'routing') -> Tuple[Path, str]:
    """One build folder per (Python, torch, CPU, environment). -march=native: a cache shared with another
    CPU must not hand it this build, so the CPU's instruction sets are in the name; two virtual environments
    with the same torch would rewrite each other's build.ninja (include paths differ), so torch's install
    path is in it too."""
    key = f'{_cpu_description()}\n{Path(torch.__file__).resolve().parent}'
    name = f'timm_capsules_{kind}_{hashlib.sha1(key.encode()).hexdigest()[:8]}'
    version = f'py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}'
    root = (
        os.environ.get('TORCH_EXTENSIONS_DIR')
        or Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'torch_extensions'
    )
    return Path(root) / version / name, name


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_library(name: str, library: Path):
    """Loads a verified build directly: torch.utils.cpp_extension (which prints CUDA notices on CPU-only
    machines and checks the compiler) is only imported to build."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _NoCudaNotice(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith('No CUDA runtime is found')


def _import_cpp_extension():
    """torch.utils.cpp_extension without the "No CUDA runtime is found, using CUDA_HOME=..." notice it logs at
    import on a machine without a GPU: it looks for CUDA there, and a CPU kernel never uses it."""
    logger, notice = logging.getLogger('torch.utils.cpp_extension'), _NoCudaNotice()
    logger.addFilter(notice)
    try:
        import torch.utils.cpp_extension
    finally:
        logger.removeFilter(notice)
    return torch.utils.cpp_extension


def _build_kernel(
    name: str,
    folder: Path,
    library: Path,
    stamp: Path,
    expected: str,
    source: Path = KERNEL_SOURCE,
    kind: str = 'routing',
):
    load = _import_cpp_extension().load
    print(
        f'timm_capsules: compiling the fused CPU {kind} kernel (first use, about a minute) ...',
        file=sys.stderr,
        flush=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    # a damaged library must be linked again, and objects compiled again (a changed header), not trusted by
    # ninja's timestamps
    for stale in (library, *folder.glob('*.o')):
        stale.unlink(missing_ok=True)
    done = threading.Event()

    def sign_of_life():
        start = time.monotonic()
        while not done.wait(15):
            print(
                f'timm_capsules: still compiling the {kind} kernel ({time.monotonic() - start:.0f} s)',
                file=sys.stderr,
                flush=True,
            )

    threading.Thread(target=sign_of_life, daemon=True).start()
    try:
        kernel = load(
            name=name,
            sources=[str(source)],
            extra_cflags=KERNEL_CFLAGS,
            extra_ldflags=['-fopenmp'],
            build_directory=str(folder),
        )
    finally:
        done.set()
    stamp.write_text(f'{expected}\n{_sha256(library)}\n')
    return kernel


def _cpu_description() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return (
                ''.join(line for line in f if line.startswith(('model name', 'flags')))[:4096] or platform.processor()
            )
    except OSError:
        return platform.processor()


# ---- dispatch -----------------------------------------------------------------------------------------


def is_tracing() -> bool:
    return torch.jit.is_scripting() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def plain_ops_only() -> bool:
    """Whether routing must be recorded as plain tensor ops, unchunked: under fx tracing, and under
    torch.export (which torch.onnx.export runs), so that an exported program runs where this package is
    not installed (the fused kernel is its own custom op) and keeps a symbolic batch size (the number of
    chunks would depend on it)."""
    return is_tracing() or torch.compiler.is_exporting()


def routes_fused(poses: Tensor, rows: int, weight_shape: Tuple[int, ...], fused_routing: bool) -> bool:
    """Whether a capsule layer's attention pass over ``poses`` runs in a fused kernel: the CPU kernel, or on a
    CUDA device the Triton kernels (opt-in until they are measured on a GPU, and only for shapes they fit)."""
    if not fused_routing or plain_ops_only():
        return False
    if poses.device.type == 'cuda':
        return triton_routing_enabled() and supports_triton(rows, weight_shape)
    return poses.device.type == 'cpu'


def norms_fused(x: Tensor, fused_routing: bool) -> bool:
    """Whether a pose norm of ``x`` runs in the routing extension: 16-entry poses (the paper's 4x4) on the CPU,
    where torch's layer_norm pays a fixed cost per row that rows of 16 values do not amortise. Tracers and
    exporters record plain ops, and must not look at the sizes."""
    return (
        not plain_ops_only()
        and fused_routing
        and x.device.type == 'cpu'
        and x.shape[-1] == 16
        and routing_kernel() is not None
    )


def em_kernel_applies(children: Tensor) -> bool:
    """Whether EM routing of ``children`` runs in the EM kernel: on the CPU, with fused routing on, outside
    tracing and export. Under torch.compile the op is traced through its fake kernel (it falls back inside
    when it has no build)."""
    if children.device.type != 'cpu' or not use_fused_routing() or plain_ops_only():
        return False
    return torch.compiler.is_compiling() or em_routing_kernel() is not None


def set_fused_routing(model: nn.Module, enable: bool = True):
    """Switches every module of ``model`` that routes (or normalises poses) in the routing extension between it
    and plain tensor ops, the reference it is tested against."""
    for module in model.modules():
        if getattr(type(module), 'fused_kernel', None) == 'routing':
            module.fused_routing = enable


def kernels_used(model: nn.Module) -> List[str]:
    """The extensions ('routing', 'em_routing') that ``model``'s modules route with on the CPU as set now.
    A module names its extension in a ``fused_kernel`` class attribute."""
    used = set()
    for module in model.modules():
        kind = getattr(type(module), 'fused_kernel', None)
        if (kind == 'routing' and module.fused_routing) or (kind == 'em_routing' and use_fused_routing()):
            used.add(kind)
    return sorted(used)


def preload(model: nn.Module, device='cpu') -> float:
    """Builds (first use on a machine, about a minute each) or loads the extensions ``model`` routes with on
    ``device``, so that a one-off build is timed apart from training. Returns the seconds it took (0 when the
    model needs none there: another device, plain tensor ops)."""
    if torch.device(device).type != 'cpu':
        return 0.0
    loaders = dict(routing=routing_kernel, em_routing=em_routing_kernel)
    started = time.time()
    needed = kernels_used(model)
    for kind in needed:
        loaders[kind]()
    return time.time() - started if needed else 0.0


# ---- the pose norm in the routing extension --------------------------------------------------------------


@torch.library.custom_op('timm_capsules::pose_norm', mutates_args=())
def pose_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.layer_norm(x, x.shape[-1:], weight, bias, eps)`` in the package's CPU kernel (``csrc/routing.cpp``)."""
    return routing_kernel().pose_norm_forward(x.contiguous(), weight.contiguous(), bias.contiguous(), eps)


@pose_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op('timm_capsules::pose_norm_backward', mutates_args=())
def _pose_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_weight, grad_bias = routing_kernel().pose_norm_backward(
        grad.contiguous(), x.contiguous(), weight.contiguous(), eps
    )
    return grad_x, grad_weight, grad_bias


@_pose_norm_backward.register_fake
def _(grad, x, weight, eps):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight),
        torch.empty_like(weight),
    )


def _pose_norm_setup_context(ctx, inputs, output):
    x, weight, _, eps = inputs
    ctx.save_for_backward(x, weight)  # the statistics are recomputed, not kept
    ctx.eps = eps


def _pose_norm_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    return *_pose_norm_backward(grad, x, weight, ctx.eps), None


pose_norm.register_autograd(_pose_norm_grad, setup_context=_pose_norm_setup_context)
