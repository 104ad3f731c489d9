"""Inverted dot-product attention routing (Tsai et al., ICLR 2020, Procedure 1) as tensor functions.

The plain tensor-op functions (``capsule_votes``, ``uniform_routing``, ``attention_routing``,
``chunked_attention_routing``) are the reference (``uniform_window_routing`` is ``uniform_routing`` as one
convolution over a grid); ``fused_attention_routing`` runs an attention pass in
one CPU kernel (``csrc/routing.cpp``, built and chosen in ``kernels.py``) that never stores the votes, and is
tested against them.

Every function works on *groups* of children routed to the same set of parents: one group is one
image for a fully connected capsule layer, or one (image, output position) window for a convolutional
one. Poses are stored as (rows, cols): a matrix pose of dimension d is (sqrt(d), sqrt(d)), a vector
pose is (1, d). A vote is then ``pose @ W`` in both cases, which is the authors' convention for matrix
poses (pose multiplied from the left) and an ordinary linear map for vector poses.

Axis names used in the einsums:
    g  group (image, or image x output position)
    i  child capsule within the group
    j  parent capsule type
    r  pose rows (sqrt(d) for matrix poses, 1 for vector poses)
    c  child pose columns
    t  parent pose columns
"""

from typing import Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import kernels

# thin re-exports: these moved to kernels.py (the build, the switches); callers should import them from there
from .kernels import (  # noqa: F401
    KERNEL_CFLAGS,
    KERNEL_SOURCE,
    load_extension,
    routing_kernel,
    supports_triton,
    triton_routing_enabled,
    use_fused_routing,
)


# the plain tensor-op path routes a pass whose vote tensor would hold more elements in chunks (256 MB of fp32)
DEFAULT_MAX_VOTES = 2**26


def capsule_votes(children: Tensor, weight: Tensor) -> Tensor:
    """v_ij = p_i W_ij for every child i and parent j.

    children (g, i, r, c), weight (i, j, c, t) -> votes (g, i, j, r, t)
    """
    return torch.einsum('girc,ijct->gijrt', children, weight)


def uniform_routing(children: Tensor, weight: Tensor, child_activations: Optional[Tensor] = None) -> Tensor:
    """The first routing pass: parent poses start at 0, so every r_ij = 1/#parents.

    The pose update sum_i r_ij v_ij then needs no votes at all: it is one matmul contracting
    (child, pose column) jointly. Returns the un-normalised parent poses (g, j, r, t).
    """
    if child_activations is not None:
        children = children * child_activations[..., None, None]
    return torch.einsum('girc,ijct->gjrt', children, weight) / weight.shape[1]


# dtypes as wide as a pose row, to move a row as one element
_WIDE_DTYPES = {8: torch.float64, 16: torch.complex128}


def _views_as(x: Tensor, dtype: Optional[torch.dtype]) -> bool:
    """Whether x can be viewed as ``dtype`` elements as wide as its last axis, each spanning that axis."""
    if dtype is None or x.stride(-1) != 1 or x.shape[-1] * x.element_size() != dtype.itemsize:
        return False
    return not any(o * x.element_size() % dtype.itemsize for o in (x.storage_offset(), *x.stride()[:-1]))


def _copy_permuted(x: Tensor, dims: Tuple[int, ...], out: Optional[Tensor] = None) -> Tensor:
    """x.permute(dims) copied to a contiguous tensor (or into ``out``), for dims that keep the last axis last:
    that axis moves as one element of a dtype as wide as it where there is one (a 4-column float pose row is 16
    bytes), which copies 2-4x faster than moving its values one by one. (A dtype view is not differentiable,
    so a copy that autograd records moves values one by one, as does a compiled one: the compiler writes its
    own copy.)"""
    wide = _WIDE_DTYPES.get(x.shape[-1] * x.element_size())
    if (
        torch.compiler.is_compiling()
        or (x.requires_grad and torch.is_grad_enabled())
        or not _views_as(x, wide)
        or (out is not None and not _views_as(out, wide))
    ):
        moved = x.permute(dims)
        return moved.contiguous() if out is None else out.copy_(moved)
    moved = x.view(wide).permute(dims)
    if out is None:
        return moved.contiguous().view(x.dtype)
    out.view(wide).copy_(moved)
    return out


def _rows_as_batch(grid: Tensor, plain: bool = False) -> Tensor:
    """(B, H, W, N, R, C) -> (B R, N C, H, W), stored channels-last: pose rows as images, (type, column) as
    channels. Channels-last is the cheaper copy to make (rows of C values move together) and the layout
    oneDNN's CPU convolutions run fastest on. ``plain``: in tensor ops a tracer can record."""
    B, H, W, N, R, C = grid.shape
    dims = (0, 4, 1, 2, 3, 5)
    rows = grid.permute(dims) if plain else _copy_permuted(grid, dims)
    return rows.reshape(B * R, H, W, N * C).permute(0, 3, 1, 2)


class _RowsAsBatchConv(torch.autograd.Function):
    """conv2d(_rows_as_batch(grid), weight) that keeps the grid, not the copy, for its backward pass: the copy
    is as large as the grid, which the attention passes that follow keep anyway, so it is made again there
    (67 MB at batch 128 for the paper's CIFAR layer 1). The backward pass runs a chunk of images at a time, so
    that the copy and its gradient exist for one chunk, not the batch: this pass runs first in the backward,
    when everything the backbone keeps is still held."""

    @staticmethod
    def forward(ctx, grid: Tensor, weight: Tensor, stride: int) -> Tensor:
        ctx.save_for_backward(grid, weight)
        ctx.stride = stride
        return torch.nn.functional.conv2d(_rows_as_batch(grid), weight, stride=stride)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grid, weight = ctx.saved_tensors
        B, H, W, N, R, C = grid.shape
        # under autocast the forward convolved copies cast to the gradient's dtype; autograd casts the
        # gradients back to the inputs' dtypes
        weight = weight.to(grad.dtype)
        grad_grid = torch.empty_like(grid) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        chunk = max(1, _BACKWARD_CHUNK_ELEMENTS // grid[0].numel())
        for start in range(0, B, chunk):
            rows = _rows_as_batch(grid[start : start + chunk]).to(grad.dtype)
            grad_rows, grad_weight_part, _ = torch.ops.aten.convolution_backward(
                grad[start * R : (start + chunk) * R],
                rows,
                weight,
                None,
                [ctx.stride] * 2,
                [0, 0],
                [1, 1],
                False,
                [0, 0],
                1,
                [grad_grid is not None, grad_weight is not None, False],
            )
            if grad_grid is not None:  # (b R, N C, h, w) -> (b, h, w, N, R, C)
                _copy_permuted(
                    grad_rows.permute(0, 2, 3, 1).reshape(-1, R, H, W, N, C),
                    (0, 2, 3, 4, 1, 5),
                    out=grad_grid[start : start + chunk],
                )
            if grad_weight is not None:
                grad_weight += grad_weight_part
        return grad_grid, grad_weight, None


_BACKWARD_CHUNK_ELEMENTS = 2**22  # of the grid per chunk of images (16 MB of fp32)


def uniform_window_routing(
    grid: Tensor, weight: Tensor, kernel_size: int, stride: int, keep_copy: bool = False
) -> Tensor:
    """``uniform_routing`` over a grid's k x k windows (stride s), as a convolutional capsule layer cuts them,
    without cutting them: with r = 1/#parents the pose update is one strided convolution whose input channels
    are (child type, pose column) and output channels (parent type, pose column), pose rows folded into the
    batch. No windows are copied out and no votes are formed.

    grid (B, H, W, N, R, C), weight (k k N, J, C, T) -> un-normalised parent poses (B Ho Wo, J, R, T).
    ``keep_copy``: keep the rows-as-batch copy of the grid for the backward pass, as a plain conv2d does (for
    tracers and exporters, which record plain ops), instead of making it again there.
    """
    B, H, W, N, R, C = grid.shape
    k, (_, J, _, T) = kernel_size, weight.shape
    weight = weight.reshape(k, k, N, J, C, T).permute(3, 5, 2, 4, 0, 1).reshape(J * T, N * C, k, k)
    if keep_copy:
        poses = torch.nn.functional.conv2d(_rows_as_batch(grid, plain=True), weight, stride=stride)
    else:
        poses = _RowsAsBatchConv.apply(grid, weight, stride)  # (B R, J T, Ho, Wo)
    Ho, Wo = poses.shape[-2:]
    poses = poses.reshape(B, R, J, T, Ho, Wo).permute(0, 4, 5, 2, 1, 3)  # (B, Ho, Wo, J, R, T)
    return poses.reshape(B * Ho * Wo, J, R, T) / J


def attention_routing(
    votes: Tensor,
    parents: Tensor,
    child_activations: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One routing pass given the parents' current poses.

    votes (g, i, j, r, t), parents (g, j, r, t) ->
        un-normalised new parent poses (g, j, r, t),
        routing coefficients r_ij (g, i, j), softmax over parents j,
        agreement a_ij (g, i, j) = <p_j, v_ij> / sqrt(d).
    The softmax runs in at least float32 so that routing stays stable under bf16/fp16.
    """
    pose_dim = votes.shape[-1] * votes.shape[-2]
    agreement = torch.einsum('gijrt,gjrt->gij', votes, parents) * pose_dim**-0.5
    coefficients = agreement.softmax(dim=-1, dtype=torch.promote_types(agreement.dtype, torch.float32))
    coefficients = coefficients.to(votes.dtype)
    weights = coefficients if child_activations is None else coefficients * child_activations[..., None]
    poses = torch.einsum('gij,gijrt->gjrt', weights, votes)
    return poses, coefficients, agreement


def chunked_attention_routing(
    children: Tensor,
    weight: Tensor,
    parents: Tensor,
    child_activations: Optional[Tensor] = None,
    max_votes: int = DEFAULT_MAX_VOTES,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``attention_routing(capsule_votes(children, weight), parents)`` with bounded memory.

    Groups are routed in chunks whose vote tensor holds at most ``max_votes`` elements; under autograd
    each chunk is checkpointed, so its votes are recomputed in the backward pass instead of stored.
    Peak memory is then one chunk of votes, whatever the batch and image size.
    """
    groups, per_group = children.shape[0], children[0, :, :, :1].numel() * weight.shape[1] * weight.shape[-1]
    size = max(1, max_votes // per_group)

    def route(children: Tensor, parents: Tensor, child_activations: Optional[Tensor]):
        return attention_routing(capsule_votes(children, weight), parents, child_activations)

    chunks = []
    for start in range(0, groups, size):
        args = (
            children[start : start + size],
            parents[start : start + size],
            None if child_activations is None else child_activations[start : start + size],
        )
        if torch.is_grad_enabled():
            chunks.append(torch.utils.checkpoint.checkpoint(route, *args, use_reentrant=False))
        else:
            chunks.append(route(*args))
    poses, coefficients, agreement = zip(*chunks)
    return torch.cat(poses), torch.cat(coefficients), torch.cat(agreement)


# ---- the fused CPU kernel ---------------------------------------------------------------------------


def window_children(grid: Tensor, kernel_size: int, stride: int) -> Tensor:
    """The k x k windows (stride s) of a grid as groups of children, as a convolutional capsule layer cuts
    them: (B, H, W, N, R, C) child poses -> (B Ho Wo, k k N, R, C), children in (ky, kx, type) order; a
    (B, H, W, N) grid of activations -> (B Ho Wo, k k N)."""
    windows = grid.unfold(1, kernel_size, stride).unfold(2, kernel_size, stride)  # (B, Ho, Wo, N, [R, C,] ky, kx)
    windows = windows.movedim((-2, -1), (3, 4))  # (B, Ho, Wo, ky, kx, N, [R, C])
    return windows.flatten(3, 5).flatten(0, 2)


def fused_attention_routing(
    children: Tensor,
    weight: Tensor,
    parents: Tensor,
    child_activations: Optional[Tensor] = None,
    with_routing: bool = True,
    window: Optional[Tuple[int, int]] = None,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``attention_routing(capsule_votes(children, weight), parents, child_activations)`` as one CPU kernel
    that never writes the votes to memory: each child's votes are formed, compared with the parents and
    added to them in a buffer that stays in cache, and the backward pass forms them again. Memory is
    that of the inputs and outputs, whatever the number of votes; the arithmetic is the same.

    With ``window=(kernel_size, stride)``, ``children`` is a child grid (B, H, W, N, R, C) (activations
    (B, H, W, N)) and the groups are its windows, ``window_children(children, *window)``, which the kernel
    reads from the grid instead of a copy 9x its size (k = 3).

    Returns what ``attention_routing`` does; with ``with_routing=False`` the coefficients and agreement
    (each as large as the votes / d) are neither stored nor returned (None). float32 and float64 run
    natively, other dtypes in float32.
    """
    if window is None:  # every group is one 1 x 1 window of its own
        children = children[:, None, None]
        child_activations = None if child_activations is None else child_activations[:, None, None]
        window = (1, 1)
    poses, coefficients, agreement = torch.ops.timm_capsules.attention_routing(
        children, weight, parents, child_activations, *window, with_routing
    )
    return (poses, coefficients, agreement) if with_routing else (poses, None, None)


def _kernel_layouts(children: Tensor, weight: Tensor, parents: Tensor, activations: Optional[Tensor]):
    """(b, h, w, n, r, c), (i, j, c, t), (g, j, r, t) -> the kernel's (b, h, w, n, r, c), (i, c, t*j), (g, r, t*j)."""
    dtype = children.dtype if children.dtype in (torch.float32, torch.float64) else torch.float32
    I, J, C, T = weight.shape
    G, _, R, _ = parents.shape
    children = children.to(dtype).contiguous()
    weight = weight.to(dtype).permute(0, 2, 3, 1).reshape(I, C, T * J).contiguous()
    parents = parents.to(dtype).permute(0, 2, 3, 1).reshape(G, R, T * J).contiguous()
    activations = None if activations is None else activations.to(dtype).contiguous()
    return children, weight, parents, activations


@torch.library.custom_op('timm_capsules::attention_routing', mutates_args=())
def _attention_routing_op(
    children: Tensor,
    weight: Tensor,
    parents: Tensor,
    activations: Optional[Tensor],
    kernel_size: int,
    stride: int,
    with_routing: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    kernel = kernels.routing_kernel()
    if kernel is None:  # the fake kernel below promises contiguous outputs, so the fallback gives them too
        windows = window_children(children, kernel_size, stride)
        window_activations = None if activations is None else window_children(activations, kernel_size, stride)
        poses, coefficients, agreement = (
            t.clone(memory_format=torch.contiguous_format)
            for t in attention_routing(capsule_votes(windows, weight), parents, window_activations)
        )
        if not with_routing:
            return poses, children.new_empty(0), children.new_empty(0)
        return poses, coefficients, agreement
    I, J, C, T = weight.shape
    G, _, R, _ = parents.shape
    poses, coefficients, agreement = kernel.forward(
        *_kernel_layouts(children, weight, parents, activations), kernel_size, stride, T, (R * T) ** -0.5, with_routing
    )
    poses = poses.reshape(G, R, T, J).permute(0, 3, 1, 2)  # (g, r, t*j) -> (g, j, r, t)
    dtype = parents.dtype
    return poses.to(dtype).contiguous(), coefficients.to(dtype), agreement.to(dtype)


@_attention_routing_op.register_fake
def _(children, weight, parents, activations, kernel_size, stride, with_routing):
    routing_shape = (parents.shape[0], weight.shape[0], weight.shape[1]) if with_routing else (0,)
    poses = torch.empty_like(parents, memory_format=torch.contiguous_format)
    return poses, parents.new_empty(routing_shape), parents.new_empty(routing_shape)


@torch.library.custom_op('timm_capsules::attention_routing_backward', mutates_args=())
def _attention_routing_backward_op(
    grad_poses: Tensor,
    grad_coefficients: Optional[Tensor],
    grad_agreement: Optional[Tensor],
    children: Tensor,
    weight: Tensor,
    parents: Tensor,
    activations: Optional[Tensor],
    kernel_size: int,
    stride: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for children, weight, parents and activations (empty when there are none)."""
    kernel = kernels.routing_kernel()
    if kernel is None:
        return _attention_routing_backward_reference(
            grad_poses, grad_coefficients, grad_agreement, children, weight, parents, activations, kernel_size, stride
        )
    I, J, C, T = weight.shape
    G, _, R, _ = parents.shape
    dtype = children.dtype if children.dtype in (torch.float32, torch.float64) else torch.float32
    flat = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    grad_poses = grad_poses.to(dtype).permute(0, 2, 3, 1).reshape(G, R, T * J).contiguous()
    d_children, d_weight, d_parents, d_activations = kernel.backward(
        grad_poses,
        flat(grad_coefficients),
        flat(grad_agreement),
        *_kernel_layouts(children, weight, parents, activations),
        kernel_size,
        stride,
        T,
        (R * T) ** -0.5,
    )
    d_weight = d_weight.reshape(I, C, T, J).permute(0, 3, 1, 2)  # (i, c, t*j) -> (i, j, c, t)
    d_parents = d_parents.reshape(G, R, T, J).permute(0, 3, 1, 2)  # (g, r, t*j) -> (g, j, r, t)
    return (
        d_children.to(children.dtype),
        d_weight.to(weight.dtype).contiguous(),
        d_parents.to(parents.dtype).contiguous(),
        d_activations.to(children.dtype),
    )


def _attention_routing_backward_reference(
    grad_poses, grad_coefficients, grad_agreement, children, weight, parents, activations, kernel_size, stride
):
    """What the kernel's backward pass computes, in plain tensor ops (windows copied, votes materialised)."""
    windows = window_children(children, kernel_size, stride)
    votes = capsule_votes(windows, weight)
    scale = (votes.shape[-1] * votes.shape[-2]) ** -0.5
    coefficients = (torch.einsum('gijrt,gjrt->gij', votes, parents) * scale).softmax(-1)
    act = (
        torch.ones_like(coefficients[..., 0])
        if activations is None
        else window_children(activations, kernel_size, stride)
    )
    d_mass = torch.einsum('gjrt,gijrt->gij', grad_poses, votes)
    d_coefficients = d_mass * act[..., None] + (0 if grad_coefficients is None else grad_coefficients)
    d_logits = coefficients * (d_coefficients - (coefficients * d_coefficients).sum(-1, keepdim=True))
    pull = (d_logits + (0 if grad_agreement is None else grad_agreement)) * scale
    d_votes = torch.einsum('gij,gjrt->gijrt', coefficients * act[..., None], grad_poses) + torch.einsum(
        'gij,gjrt->gijrt', pull, parents
    )
    d_windows = torch.einsum('gijrt,ijct->girc', d_votes, weight)
    d_children = _add_windows_back(d_windows, children.shape, kernel_size, stride)
    d_weight = torch.einsum('girc,gijrt->ijct', windows, d_votes)
    d_parents = torch.einsum('gij,gijrt->gjrt', pull, votes)
    d_activations = (
        children.new_empty(0)
        if activations is None
        else _add_windows_back((d_mass * coefficients).sum(-1), activations.shape, kernel_size, stride)
    )
    # contiguous, as the op's fake kernel (empty_like of contiguous inputs) tells torch.compile
    return tuple(t.contiguous() for t in (d_children, d_weight, d_parents, d_activations))


def _add_windows_back(windows: Tensor, grid_shape: torch.Size, kernel_size: int, stride: int) -> Tensor:
    """The adjoint of ``window_children``: each window's values added back where they came from."""
    B, H, W, N = grid_shape[:4]
    k, s = kernel_size, stride
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    windows = windows.reshape(B, Ho, Wo, k, k, *grid_shape[3:])
    grid = windows.new_zeros(grid_shape)
    for ky in range(k):
        for kx in range(k):
            grid[:, ky : ky + s * (Ho - 1) + 1 : s, kx : kx + s * (Wo - 1) + 1 : s] += windows[:, :, :, ky, kx]
    return grid


@_attention_routing_backward_op.register_fake
def _(grad_poses, grad_coefficients, grad_agreement, children, weight, parents, activations, kernel_size, stride):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    d_activations = children.new_empty(0) if activations is None else like(activations)
    return like(children), like(weight), like(parents), d_activations


def _setup_context(ctx, inputs, output):
    children, weight, parents, activations, kernel_size, stride, _ = inputs
    ctx.save_for_backward(children, weight, parents, activations)  # the votes are formed again, not kept
    ctx.window = kernel_size, stride
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_poses, grad_coefficients, grad_agreement):
    children, weight, parents, activations = ctx.saved_tensors
    if grad_poses is None:
        grad_poses = torch.zeros_like(parents)
    unused = lambda grad: grad is None or grad.numel() == 0  # noqa: E731
    d_children, d_weight, d_parents, d_activations = _attention_routing_backward_op(
        grad_poses,
        None if unused(grad_coefficients) else grad_coefficients,
        None if unused(grad_agreement) else grad_agreement,
        children,
        weight,
        parents,
        activations,
        *ctx.window,
    )
    return d_children, d_weight, d_parents, None if activations is None else d_activations, None, None, None


_attention_routing_op.register_autograd(_backward, setup_context=_setup_context)


# On a CUDA device the op runs the Triton kernels (routing_triton.py), which the layers only ask for with
# TIMM_CAPSULES_TRITON_ROUTING=1 and shapes the kernels support (``routing_triton.supports``).
@_attention_routing_op.register_kernel('cuda')
def _(children, weight, parents, activations, kernel_size, stride, with_routing):
    from .routing_triton import routing_forward

    return routing_forward(children, weight, parents, activations, kernel_size, stride, with_routing)


@_attention_routing_backward_op.register_kernel('cuda')
def _(grad_poses, grad_coefficients, grad_agreement, children, weight, parents, activations, kernel_size, stride):
    from .routing_triton import routing_backward

    return routing_backward(
        grad_poses, grad_coefficients, grad_agreement, children, weight, parents, activations, kernel_size, stride
    )


# what torch.utils.flop_counter counts for the kernel (one multiply-add = 2 FLOPs): per child-parent pair,
# forward: vote 2RCT, agreement 2RT, weighted sum 2RT; backward: the vote formed again, its two
# gradients (children, weight) 2RCT each, and 5 R T-sized products (agreement, mass, pull, dv, d parents)
@register_flop_formula(torch.ops.timm_capsules.attention_routing)
def _forward_flops(children_shape, weight_shape, parents_shape, *args, **kwargs) -> int:
    I, J, C, T = weight_shape
    G, _, R, _ = parents_shape
    return 2 * G * I * J * R * T * (C + 2)


@register_flop_formula(torch.ops.timm_capsules.attention_routing_backward)
def _backward_flops(
    grad_poses_shape, grad_coefficients_shape, grad_agreement_shape, children_shape, weight_shape, *args, **kwargs
) -> int:
    I, J, C, T = weight_shape
    G, _, R, _ = grad_poses_shape
    return 2 * G * I * J * R * T * (3 * C + 5)
