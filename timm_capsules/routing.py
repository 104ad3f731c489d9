"""Inverted dot-product attention routing (Tsai et al., ICLR 2020, Procedure 1) as plain tensor functions.

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
    agreement = torch.einsum('gijrt,gjrt->gij', votes, parents) * pose_dim ** -0.5
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
        max_votes: int = 2 ** 26,
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
        args = (children[start:start + size], parents[start:start + size],
                None if child_activations is None else child_activations[start:start + size])
        if torch.is_grad_enabled():
            chunks.append(torch.utils.checkpoint.checkpoint(route, *args, use_reentrant=False))
        else:
            chunks.append(route(*args))
    poses, coefficients, agreement = zip(*chunks)
    return torch.cat(poses), torch.cat(coefficients), torch.cat(agreement)
