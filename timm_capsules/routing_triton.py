"""Fused attention routing on the GPU (Triton), the counterpart of the CPU kernel in ``csrc/routing.cpp``

Opt-in: ``TIMM_CAPSULES_TRITON_ROUTING=1`` routes CUDA tensors through these kernels instead of plain tensor ops
(``routing.triton_routing_enabled``, for the shapes ``routing.supports_triton`` accepts).
It stays off by default until it is measured on a GPU (``benchmarks/gpu_check.sh triton``): no session of this
project has had one. What is tested without a GPU: the kernels' arithmetic, in Triton's interpreter
(``TRITON_INTERPRET=1``, CPU tensors), against the plain-op reference, outputs and every gradient; and their
compilation for sm_90, with no register spills (``tests/test_routing_triton.py``).

One attention pass over a child grid's k x k windows (stride s), as ``routing.fused_attention_routing``:
for window g, child i and parent j, vote v = u_i W_ij, agreement a = <p_j, v> / sqrt(d), r = softmax_j(a),
new parent pose P_j = sum_i r_ij act_i v_ij. No vote is ever written to memory:
- forward: one program per window; its children's votes are formed one child at a time in registers;
- backward, first kernel: one program per window forms the votes again and gives the parents' gradient (its
  own) and the children's (added into the grid: windows overlap);
- backward, second kernel: one program per (child slot i, block of windows) forms them a third time and sums
  the weight's gradient W_i over its windows, so that no two programs add into the same weight often.

Layouts as the op's: children (B, H, W, N, R, C), weight (I, J, C, T), parents and poses (G, J, R, T),
coefficients and agreement (G, I, J), activations (B, H, W, N). Arithmetic in float32. The children's, their
activations' and the weight's gradients are summed with atomic adds, in no fixed order: on a GPU their last bits
may differ between runs (the CPU kernel's do not).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
import triton
import triton.language as tl

__all__ = ['routing_forward', 'routing_backward']


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@triton.jit
def _route_child(
    children,
    weight,
    activations,
    grad_coef,
    grad_agree,
    p,
    dP,
    g,
    i,
    corner,
    scale,
    W,
    N,
    I,
    J,
    KS,
    HAS_ACT: tl.constexpr,
    HAS_GC: tl.constexpr,
    HAS_GA: tl.constexpr,
    BLOCK_J: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    T: tl.constexpr,
):
    """Child i of window g: its votes and routing, and (with dP, the poses' gradient) its backward pass."""
    j = tl.arange(0, BLOCK_J)
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    t = tl.arange(0, T)
    in_use = j < J
    child = corner + ((i // (KS * N)) * W + (i // N) % KS) * N + i % N  # i = (ky, kx, n)
    u = tl.load(children + child * R * C + r[:, None] * C + c[None, :])  # (R, C)
    w = tl.load(
        weight + i * J * C * T + j[:, None, None] * C * T + c[None, :, None] * T + t[None, None, :],
        mask=in_use[:, None, None],
        other=0.0,
    )  # (J, C, T)
    v = tl.sum(u[None, :, :, None] * w[:, None, :, :], axis=2)  # (J, R, T)
    agreement = tl.sum(tl.sum(v * p, axis=2), axis=1) * scale  # (J,)
    logits = tl.where(in_use, agreement, float('-inf'))
    shares = tl.exp(logits - tl.max(logits, 0))
    coefficients = shares / tl.sum(shares, 0)
    mass = coefficients  # r_ij act_i, a tensor either way (a jit function returns tensors)
    act = 1.0
    if HAS_ACT:
        act = tl.load(activations + child)
        mass = coefficients * act
    # backward: P_j = sum_i r_ij act_i v_ij gives r_ij act_i the gradient <dP_j, v_ij>
    d_mass = tl.sum(tl.sum(v * dP, axis=2), axis=1)
    d_coef = d_mass * act
    if HAS_GC:
        d_coef += tl.load(grad_coef + (g * I + i) * J + j, mask=in_use, other=0.0)
    d_logit = coefficients * (d_coef - tl.sum(coefficients * d_coef, 0))
    if HAS_GA:
        d_logit += tl.load(grad_agree + (g * I + i) * J + j, mask=in_use, other=0.0)
    pull = d_logit * scale
    dv = mass[:, None, None] * dP + pull[:, None, None] * p  # (J, R, T)
    return child, u, w, v, agreement, coefficients, mass, d_mass, pull, dv


@triton.jit
def _window(
    parents, grad_poses, g, H, W, N, Ho, Wo, J, stride, BLOCK_J: tl.constexpr, R: tl.constexpr, T: tl.constexpr
):
    """Window g's corner in the grid (a capsule index) and its parents' poses and their gradient (J, R, T)."""
    j = tl.arange(0, BLOCK_J)
    offsets = (
        g * J * R * T + j[:, None, None] * R * T + tl.arange(0, R)[None, :, None] * T + tl.arange(0, T)[None, None, :]
    )
    in_use = (j < J)[:, None, None]
    corner = ((g // (Ho * Wo) * H + g // Wo % Ho * stride) * W + g % Wo * stride) * N
    p = tl.load(parents + offsets, mask=in_use, other=0.0)
    dP = tl.zeros([BLOCK_J, R, T], tl.float32)
    if grad_poses is not None:
        dP = tl.load(grad_poses + offsets, mask=in_use, other=0.0)
    return corner, offsets, in_use, p, dP


@triton.jit
def _forward_kernel(
    children,
    weight,
    parents,
    activations,
    poses,
    coefficients_out,
    agreement_out,
    scale,
    H,
    W,
    N,
    Ho,
    Wo,
    I,
    J,
    KS,
    stride,
    HAS_ACT: tl.constexpr,
    WITH_ROUTING: tl.constexpr,
    BLOCK_J: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    T: tl.constexpr,
):
    g = tl.program_id(0)
    corner, offsets, in_use, p, dP = _window(parents, None, g, H, W, N, Ho, Wo, J, stride, BLOCK_J, R, T)
    j = tl.arange(0, BLOCK_J)
    out = tl.zeros([BLOCK_J, R, T], tl.float32)
    for i in range(I):
        child, u, w, v, agreement, coefficients, mass, d_mass, pull, dv = _route_child(
            children,
            weight,
            activations,
            None,
            None,
            p,
            dP,
            g,
            i,
            corner,
            scale,
            W,
            N,
            I,
            J,
            KS,
            HAS_ACT,
            False,
            False,
            BLOCK_J,
            R,
            C,
            T,
        )
        out += mass[:, None, None] * v
        if WITH_ROUTING:
            tl.store(coefficients_out + (g * I + i) * J + j, coefficients, mask=j < J)
            tl.store(agreement_out + (g * I + i) * J + j, agreement, mask=j < J)
    tl.store(poses + offsets, out, mask=in_use)


@triton.jit
def _backward_window_kernel(
    grad_poses,
    grad_coef,
    grad_agree,
    children,
    weight,
    parents,
    activations,
    d_children,
    d_parents,
    d_activations,
    scale,
    H,
    W,
    N,
    Ho,
    Wo,
    I,
    J,
    KS,
    stride,
    HAS_ACT: tl.constexpr,
    HAS_GC: tl.constexpr,
    HAS_GA: tl.constexpr,
    BLOCK_J: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    T: tl.constexpr,
):
    g = tl.program_id(0)
    corner, offsets, in_use, p, dP = _window(parents, grad_poses, g, H, W, N, Ho, Wo, J, stride, BLOCK_J, R, T)
    d_p = tl.zeros([BLOCK_J, R, T], tl.float32)
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    for i in range(I):
        child, u, w, v, agreement, coefficients, mass, d_mass, pull, dv = _route_child(
            children,
            weight,
            activations,
            grad_coef,
            grad_agree,
            p,
            dP,
            g,
            i,
            corner,
            scale,
            W,
            N,
            I,
            J,
            KS,
            HAS_ACT,
            HAS_GC,
            HAS_GA,
            BLOCK_J,
            R,
            C,
            T,
        )
        d_p += pull[:, None, None] * v
        du = tl.sum(tl.sum(dv[:, :, None, :] * w[:, None, :, :], axis=3), axis=0)  # (R, C): dv W^T
        tl.atomic_add(d_children + child * R * C + r[:, None] * C + c[None, :], du)
        if HAS_ACT:
            tl.atomic_add(d_activations + child, tl.sum(d_mass * coefficients, 0))
    tl.store(d_parents + offsets, d_p, mask=in_use)


@triton.jit
def _backward_weight_kernel(
    grad_poses,
    grad_coef,
    grad_agree,
    children,
    weight,
    parents,
    activations,
    d_weight,
    scale,
    H,
    W,
    N,
    Ho,
    Wo,
    G,
    I,
    J,
    KS,
    stride,
    WINDOWS: tl.constexpr,
    HAS_ACT: tl.constexpr,
    HAS_GC: tl.constexpr,
    HAS_GA: tl.constexpr,
    BLOCK_J: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    T: tl.constexpr,
):
    i = tl.program_id(0)
    j = tl.arange(0, BLOCK_J)
    d_w = tl.zeros([BLOCK_J, C, T], tl.float32)
    for step in range(WINDOWS):
        g = tl.program_id(1) * WINDOWS + step
        if g < G:
            corner, offsets, in_use, p, dP = _window(parents, grad_poses, g, H, W, N, Ho, Wo, J, stride, BLOCK_J, R, T)
            child, u, w, v, agreement, coefficients, mass, d_mass, pull, dv = _route_child(
                children,
                weight,
                activations,
                grad_coef,
                grad_agree,
                p,
                dP,
                g,
                i,
                corner,
                scale,
                W,
                N,
                I,
                J,
                KS,
                HAS_ACT,
                HAS_GC,
                HAS_GA,
                BLOCK_J,
                R,
                C,
                T,
            )
            d_w += tl.sum(u[None, :, :, None] * dv[:, :, None, :], axis=1)  # (J, C, T): u^T dv
    offsets = (
        i * J * C * T + j[:, None, None] * C * T + tl.arange(0, C)[None, :, None] * T + tl.arange(0, T)[None, None, :]
    )
    tl.atomic_add(d_weight + offsets, d_w, mask=(j < J)[:, None, None])


def _sizes(children: Tensor, weight: Tensor, kernel_size: int, stride: int):
    B, H, W, N, R, C = children.shape
    I, J, _, T = weight.shape
    Ho, Wo = (H - kernel_size) // stride + 1, (W - kernel_size) // stride + 1
    return (
        dict(H=H, W=W, N=N, Ho=Ho, Wo=Wo, I=I, J=J, KS=kernel_size, stride=stride),
        dict(BLOCK_J=_next_power_of_2(J), R=R, C=C, T=T),
        B * Ho * Wo,
    )


def _float32(*tensors: Optional[Tensor]):
    return [None if t is None else t.to(torch.float32).contiguous() for t in tensors]


def routing_forward(
    children: Tensor,
    weight: Tensor,
    parents: Tensor,
    activations: Optional[Tensor],
    kernel_size: int,
    stride: int,
    with_routing: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """What ``timm_capsules::attention_routing`` returns: poses (G, J, R, T) and, with_routing, coefficients
    and agreement (G, I, J) (else empty)."""
    sizes, blocks, G = _sizes(children, weight, kernel_size, stride)
    children32, weight32, parents32, activations32 = _float32(children, weight, parents, activations)
    poses = torch.empty_like(parents32)
    routing_shape = (G, sizes['I'], sizes['J']) if with_routing else (0,)
    coefficients, agreement = parents32.new_empty(routing_shape), parents32.new_empty(routing_shape)
    scale = (blocks['R'] * blocks['T']) ** -0.5
    _forward_kernel[(G,)](
        children32,
        weight32,
        parents32,
        activations32,
        poses,
        coefficients,
        agreement,
        scale,
        **sizes,
        HAS_ACT=activations is not None,
        WITH_ROUTING=with_routing,
        **blocks,
    )
    dtype = parents.dtype
    return poses.to(dtype), coefficients.to(dtype), agreement.to(dtype)


def routing_backward(
    grad_poses: Tensor,
    grad_coefficients: Optional[Tensor],
    grad_agreement: Optional[Tensor],
    children: Tensor,
    weight: Tensor,
    parents: Tensor,
    activations: Optional[Tensor],
    kernel_size: int,
    stride: int,
    windows_per_program: int = 64,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """What ``timm_capsules::attention_routing_backward`` returns: the gradients of the children, the weight,
    the parents and the activations (empty when there are none)."""
    sizes, blocks, G = _sizes(children, weight, kernel_size, stride)
    grad_poses, grad_coefficients, grad_agreement, children32, weight32, parents32, activations32 = _float32(
        grad_poses, grad_coefficients, grad_agreement, children, weight, parents, activations
    )
    d_children = torch.zeros_like(children32)  # windows overlap: their gradients are added in
    d_parents = torch.empty_like(parents32)
    d_weight = torch.zeros_like(weight32)
    d_activations = torch.zeros_like(activations32) if activations is not None else children32.new_empty(0)
    flags = dict(
        HAS_ACT=activations is not None, HAS_GC=grad_coefficients is not None, HAS_GA=grad_agreement is not None
    )
    scale = (blocks['R'] * blocks['T']) ** -0.5
    inputs = (grad_poses, grad_coefficients, grad_agreement, children32, weight32, parents32, activations32)
    _backward_window_kernel[(G,)](*inputs, d_children, d_parents, d_activations, scale, **sizes, **flags, **blocks)
    windows = max(1, min(windows_per_program, G))
    _backward_weight_kernel[(sizes['I'], triton.cdiv(G, windows))](
        *inputs, d_weight, scale, G=G, WINDOWS=windows, **sizes, **flags, **blocks
    )
    return (
        d_children.to(children.dtype),
        d_weight.to(weight.dtype),
        d_parents.to(parents.dtype),
        d_activations.to(children.dtype),
    )
