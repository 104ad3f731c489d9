"""The routing schedule of a capsule stack, decided once: which layer routes at which iteration, and in what order.

Layers are counted by depth: 1 is the first routed layer above the primary capsules, ``depth`` the class capsules.
Iteration 1 is the uniform first pass, run feed-forward (each layer reads the layer below as just routed).

- **Concurrent** routing (the paper's Procedure 2): each later iteration updates every layer at once from the
  previous iteration's child and parent poses. Layer l at iteration k reaches the class capsules at iteration t
  only if k + (depth - l) <= t, so later updates are skipped (``last_useful_iteration``), unless the complete
  schedule is asked for (``forward_routing``, which records every update).
- **Sequential** routing (ablation B): each layer finishes its iterations before the next starts.

``routing_rounds`` lists the schedule as rounds; ``CapsNet.forward`` (``_route_hidden``, ``_classify``) and
``CapsNet.forward_routing`` walk it, and ``RoutingTrace`` (what ``forward_routing`` returns) reports it.
"""

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

from torch import Tensor

__all__ = [
    'last_useful_iteration',
    'layer_iterations',
    'routing_rounds',
    'children_fixed',
    'RoutingGeometry',
    'RoutingTrace',
]


def last_useful_iteration(layer_depth: int, depth: int, iterations: int, routing: str) -> int:
    """The last iteration (1-based) whose update of the routed layer at ``layer_depth`` (1 = the first
    capsule layer above the primary capsules, ``depth`` = the class capsules) reaches the logits.

    Concurrent routing: layer l at iteration k reaches the class capsules at iteration t only if
    k + (depth - l) <= t; anything later is never read. Sequential routing: every layer's last iteration.
    """
    if routing == 'sequential':
        return iterations
    return max(1, iterations - (depth - layer_depth))


def layer_iterations(layer_depth: int, depth: int, iterations: int, routing: str, complete: bool = False) -> range:
    """The iterations (1-based) at which the layer at ``layer_depth`` routes: all ``iterations`` with
    ``complete``, else those whose update reaches the logits."""
    last = iterations if complete else last_useful_iteration(layer_depth, depth, iterations, routing)
    return range(1, last + 1)


def routing_rounds(
    num_layers: int, depth: int, iterations: int, routing: str, complete: bool = False
) -> List[Tuple[int, Tuple[int, ...]]]:
    """The schedule of layers 1..``num_layers`` of a stack whose class capsules sit at ``depth``, as rounds
    ``(iteration, layer depths)`` in the order they run. The layers of one round route from the state the round
    before left (iteration 1: feed-forward). Concurrent: one round per iteration, while the top layer's update is
    still used (a round may then route none of the layers below it); sequential: one round per layer and
    iteration, layer by layer."""
    if routing == 'sequential':
        return [(k, (layer,)) for layer in range(1, num_layers + 1) for k in range(1, iterations + 1)]
    rounds = [(1, tuple(range(1, num_layers + 1)))]
    for k in layer_iterations(num_layers, depth, iterations, routing, complete)[1:]:
        routed = (
            layer
            for layer in range(1, num_layers + 1)
            if k in layer_iterations(layer, depth, iterations, routing, complete)
        )
        rounds.append((k, tuple(routed)))
    return rounds


def children_fixed(layer_depth: int, routing: str) -> bool:
    """Whether a layer's children stay the same over its attention passes, so that their votes can be formed
    once: the primary capsules never change, and in sequential routing the layer below has finished."""
    return layer_depth == 1 or routing == 'sequential'


class RoutingGeometry(NamedTuple):
    """How one routed capsule layer connects its children to its parents."""

    kind: str  # 'conv': each parent position routes a kernel x kernel window; 'fc': every child to every parent
    kernel_size: Optional[int]
    stride: Optional[int]
    child_grid: Tuple[int, int, int]  # (H, W, capsule types) of the children
    parent_grid: Tuple[int, int, int]  # (H, W, capsule types) of the parents


@dataclass
class RoutingTrace:
    """Everything one forward pass routed, for inspection (see ``CapsNet.forward_routing``).

    ``layer_names[l]`` names capsule layer l (0 is the primary capsules, the last the class capsules).
    ``poses[k][l]``: poses (B, H, W, N, d) of layer l after iteration k (layer 0 never changes).
    ``coefficients[k][l-1]``: routing coefficients of iteration k from layer l-1 to layer l,
    (B, H, W, children, parents) with H, W the parent grid, children ordered (ky, kx, child type) in
    a window for conv layers and (type, h, w) for fully connected layers; rows sum to 1 over parents.
    Iteration 0 is the uniform first pass (every coefficient 1/parents).
    ``activations[k][l]`` are the capsule activations (B, H, W, N) with ``activations=True``, else None.
    ``geometry[l-1]`` describes how layer l routes from layer l-1, and ``used_iterations[l-1]`` is the index k
    of the iteration whose coefficients of that layer the logits depend on (``last_useful_iteration`` - 1).
    """

    logits: Tensor
    layer_names: List[str]
    poses: List[List[Tensor]]
    coefficients: List[List[Tensor]]
    activations: List[List[Optional[Tensor]]]
    geometry: List[RoutingGeometry]
    used_iterations: List[int]
