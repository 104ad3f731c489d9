"""``timm_capsules/parse_tree/analysis.py`` by value, on hand-made routing coefficients and hand-made
``RoutingTrace``s: routing entropy against a loop over ``math.log``, top-down mass against a loop over every
window and child written from the module docstring, the JSON summary and the part-whole tree field by field, the
heat maps, ``own_fraction`` and the probe's per-image values. Written for the survivors of a mutmut run
(tests/README.md); fast, no training."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from timm_capsules.capsnet import CapsNet, RoutingGeometry, RoutingTrace
from timm_capsules.parse_tree import analysis, primary_to_image

# ---- hand-made traces ---------------------------------------------------------------------------------------
# primary capsules on a 3 x 4 grid of 2 types -> conv (kernel 2, stride 1) -> a 2 x 3 grid of 3 types -> fc ->
# 4 class capsules: routing layer 0 has 2 * 2 * 2 = 8 children per window, layer 1 3 * 2 * 3 = 18 children
GEOMETRY = [
    RoutingGeometry('conv', 2, 1, (3, 4, 2), (2, 3, 3)),
    RoutingGeometry('fc', None, None, (2, 3, 3), (1, 1, 4)),
]
# a middle layer of one position: primary 3 x 3 x 2 -> conv (kernel 3) -> 1 x 1 x 3 -> fc -> 4 classes
GEOMETRY_1X1 = [
    RoutingGeometry('conv', 3, 1, (3, 3, 2), (1, 1, 3)),
    RoutingGeometry('fc', None, None, (1, 1, 3), (1, 1, 4)),
]


def _children(g):
    return g.kernel_size**2 * g.child_grid[2] if g.kind == 'conv' else math.prod(g.child_grid)


def _trace(geometry=GEOMETRY, B=2, T=3, used=(1, 2), seed=0):
    """A RoutingTrace with random, peaked coefficients (iteration 0 uniform, as in every real trace), random poses
    (the primary ones the same at every iteration, as in every real trace) and random logits."""
    g = torch.Generator().manual_seed(seed)
    coefficients = []
    for k in range(T):
        step = []
        for geo in geometry:
            shape = (B, *geo.parent_grid[:2], _children(geo), geo.parent_grid[2])
            r = (3 * torch.randn(shape, generator=g)).softmax(-1) if k else torch.full(shape, 1 / shape[-1])
            step.append(r)
        coefficients.append(step)
    grids = [geometry[0].child_grid] + [geo.parent_grid for geo in geometry]
    primary = torch.randn(B, *grids[0], 4, generator=g)
    poses = [[primary] + [torch.randn(B, *grid, 4, generator=g) for grid in grids[1:]] for _ in range(T)]
    return RoutingTrace(
        logits=torch.randn(B, geometry[-1].parent_grid[2], generator=g),
        layer_names=['primary', 'middle'][: len(grids) - 1] + ['classes'],
        poses=poses,
        coefficients=coefficients,
        activations=[[None] * len(grids) for _ in range(T)],
        geometry=list(geometry),
        used_iterations=list(used),
    )


def _window_child(geo, y, x, c):
    """Where child c of the parent position (y, x) sits in the child grid (the module docstring's ordering)."""
    Hc, Wc, Nc = geo.child_grid
    if geo.kind == 'fc':  # (type, h, w)
        return (c // Wc) % Hc, c % Wc, c // (Hc * Wc)
    k, s = geo.kernel_size, geo.stride
    ky, kx, n = c // (k * Nc), (c // Nc) % k, c % Nc
    return y * s + ky, x * s + kx, n


def _propagate_by_loops(r, parent_mass, geo):
    """Child mass: each parent j gives each child i of its window r_ij * m_j; a child sums what it gets."""
    B, H, W, C, J = r.shape
    K = parent_mass.shape[-1]
    child = torch.zeros(B, *geo.child_grid, K, dtype=torch.float64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                for c in range(C):
                    cy, cx, n = _window_child(geo, y, x, c)
                    for j in range(J):
                        child[b, cy, cx, n] += float(r[b, y, x, c, j]) * parent_mass[b, y, x, j].double()
    return child


def _masses_by_loops(trace, classes, iterations):
    """Top-down mass of every capsule layer (primary first), iterations[l] the iteration read at routing layer l."""
    B = trace.logits.shape[0]
    mass = torch.zeros(B, 1, 1, trace.logits.shape[1], len(classes), dtype=torch.float64)
    for k, c in enumerate(classes):
        mass[:, 0, 0, c, k] = 1.0
    masses = [mass]
    for l in reversed(range(len(trace.geometry))):
        masses.insert(0, _propagate_by_loops(trace.coefficients[iterations[l]][l], masses[0], trace.geometry[l]))
    return masses


# ---- routing entropy ----------------------------------------------------------------------------------------
def _entropy_by_loop(row):
    return -sum(p * math.log(p) for p in row if p > 0)


def test_routing_entropy_by_hand():
    r = torch.tensor([[[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]], [[1 / 3, 1 / 3, 1 / 3], [0.0, 0.5, 0.5]]])  # (2, 2, 3)
    expected = torch.tensor([[1.5 * math.log(2), 0.0], [math.log(3), math.log(2)]])
    torch.testing.assert_close(analysis.routing_entropy(r), expected)  # 0 log 0 = 0: no nan
    torch.testing.assert_close(analysis.routing_entropy(r, normalize=True), expected / math.log(3))
    # two parents: log 2 normalises; one parent: nothing to choose, normalised entropy 0 (not 0 / 0)
    assert analysis.routing_entropy(torch.tensor([[0.5, 0.5]]), normalize=True).tolist() == pytest.approx([1.0])
    assert analysis.routing_entropy(torch.ones(2, 3, 1), normalize=True).tolist() == [[0.0] * 3] * 2
    assert analysis.routing_entropy(torch.ones(2, 3, 1)).tolist() == [[0.0] * 3] * 2


def test_routing_entropy_of_half_precision_coefficients_is_computed_in_float32():
    """bfloat16 keeps 8 bits of mantissa: summed in bfloat16 the entropy would be off by about 1e-2."""
    r = (torch.randn(64, 7, generator=torch.Generator().manual_seed(0)) * 2).softmax(-1).bfloat16()
    expected = [_entropy_by_loop(row) for row in r.double().tolist()]
    got = analysis.routing_entropy(r)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.tolist(), expected, rtol=1e-5)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.lists(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6), min_size=1, max_size=4).filter(
        lambda rows: len({len(r) for r in rows}) == 1 and all(sum(r) > 0 for r in rows)
    )
)
def test_routing_entropy_is_the_loop_over_math_log(rows):
    r = torch.tensor(rows, dtype=torch.float64)
    r = r / r.sum(-1, keepdim=True)
    parents = r.shape[-1]
    expected = [_entropy_by_loop(row) for row in r.tolist()]
    np.testing.assert_allclose(analysis.routing_entropy(r).tolist(), expected, rtol=1e-5, atol=1e-6)
    normalized = analysis.routing_entropy(r, normalize=True)
    np.testing.assert_allclose(normalized.tolist(), [h / math.log(parents) for h in expected], rtol=1e-5, atol=1e-6)
    assert ((normalized > -1e-6) & (normalized < 1 + 1e-6)).all()
    uniform = analysis.routing_entropy(torch.full_like(r, 1 / parents), normalize=True)
    torch.testing.assert_close(uniform, torch.ones(len(rows)))


def test_entropy_table_per_image_iteration_and_layer():
    trace = _trace()
    table = analysis.entropy_table(trace)
    assert table.shape == (2, 3, 2)
    for b in range(2):
        for k in range(3):
            for l, geo in enumerate(GEOMETRY):
                rows = trace.coefficients[k][l][b].reshape(-1, geo.parent_grid[2]).double().tolist()
                expected = np.mean([_entropy_by_loop(row) for row in rows]) / math.log(geo.parent_grid[2])
                assert table[b, k, l] == pytest.approx(expected, rel=1e-5), (b, k, l)
    assert (table[:, 0] == pytest.approx(1.0)) and (table[:, 1:] < 0.95).all()


# ---- top-down mass ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('stride', [1, 2])
def test_propagate_mass_through_a_conv_layer_of_either_stride(stride):
    g = torch.Generator().manual_seed(stride)
    B, H, W, k, N, J, K = 2, 2, 3, 3, 2, 2, 3
    geo = RoutingGeometry('conv', k, stride, ((H - 1) * stride + k, (W - 1) * stride + k, N), (H, W, J))
    r = torch.rand(B, H, W, k * k * N, J, generator=g, dtype=torch.float64).softmax(-1)
    m = torch.rand(B, H, W, J, K, generator=g)
    got = analysis.propagate_mass(r, m, geo)  # float64 coefficients, float32 mass: both read as float32
    assert got.dtype == torch.float32 and got.shape == (B, *geo.child_grid, K)
    torch.testing.assert_close(got.double(), _propagate_by_loops(r, m, geo), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(analysis.propagate_mass(r.float(), m.double(), geo), got)


def test_propagate_mass_through_a_fully_connected_layer():
    g = torch.Generator().manual_seed(0)
    geo = GEOMETRY[1]
    r = torch.rand(2, 1, 1, 18, 4, generator=g).softmax(-1)
    m = torch.rand(2, 1, 1, 4, 3, generator=g, dtype=torch.float64)
    got = analysis.propagate_mass(r, m, geo)
    assert got.dtype == torch.float32 and got.shape == (2, 2, 3, 3, 3)
    torch.testing.assert_close(got.double(), _propagate_by_loops(r, m, geo), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('iteration', [-1, 0, 1, -2, 'used'])
def test_class_primary_mass_is_the_loop_over_every_layer(iteration):
    trace = _trace()
    iterations = trace.used_iterations if iteration == 'used' else [iteration % 3] * 2
    masses = analysis.class_primary_mass(trace, [2, 0], iteration, per_layer=True)
    expected = _masses_by_loops(trace, [2, 0], iterations)
    assert [tuple(m.shape) for m in masses] == [(2, 3, 4, 2, 2), (2, 2, 3, 3, 2), (2, 1, 1, 4, 2)]
    for got, want in zip(masses, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(analysis.class_primary_mass(trace, [2, 0], iteration), masses[0])
    # every class by default, in class order
    every = analysis.class_primary_mass(trace, iteration=iteration)
    torch.testing.assert_close(every.double(), _masses_by_loops(trace, [0, 1, 2, 3], iterations)[0], rtol=1e-5, atol=0)


def test_every_layers_mass_is_float32_whatever_the_logits_dtype():
    trace = dataclasses.replace(_trace(), logits=_trace().logits.bfloat16())  # as under autocast
    masses = analysis.class_primary_mass(trace, [1, 2], per_layer=True)
    assert [m.dtype for m in masses] == [torch.float32] * 3
    torch.testing.assert_close(masses[-1][0, 0, 0], torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))


def test_uniform_first_pass_gives_every_class_the_same_mass():
    """With r = 1 / parents, a class capsule passes 1/4 to every capsule of the middle layer, and each of those
    1/3 of that to every child of its window: a primary capsule gets 3 * 1/12 per window it sits in."""
    mass = analysis.class_primary_mass(_trace(), iteration=0)  # (2, 3, 4, 2, 4)
    windows = torch.tensor([[1, 2, 2, 1], [2, 4, 4, 2], [1, 2, 2, 1]], dtype=torch.float32)
    torch.testing.assert_close(mass, (windows / 4).view(1, 3, 4, 1, 1).expand(2, 3, 4, 2, 4))


def test_iteration_errors_name_the_iteration_and_the_trace_length():
    trace = _trace(T=2)
    with pytest.raises(ValueError, match=r"^iteration must be an int or 'used', got 'last'$"):
        analysis.class_primary_mass(trace, [0], 'last')
    for bad in (2, -3):
        with pytest.raises(ValueError, match=f'^iteration {bad} is out of range for a trace of 2 iterations$'):
            analysis.class_primary_mass(trace, [0], bad)


# ---- the summary ----------------------------------------------------------------------------------------------
def _close(got, expected, where='summary'):
    """Equal structure and keys, floats to 1e-5."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and list(got) == list(expected), where
        for key in expected:
            _close(got[key], expected[key], f'{where}.{key}')
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            _close(a, b, f'{where}[{i}]')
    elif isinstance(expected, float):
        assert isinstance(got, float) and got == pytest.approx(expected, rel=1e-5, abs=1e-6), where
    else:
        assert type(got) is type(expected) and got == expected, where


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _expected_summary(trace, index, names, multi_label, top_k, argmax):
    logits = trace.logits[index].tolist()
    if multi_label:
        scores = [1 / (1 + math.exp(-z)) for z in logits]
    else:
        scores = [math.exp(z) / sum(math.exp(y) for y in logits) for z in logits]
    order = sorted(range(len(logits)), key=lambda c: -scores[c])[:top_k]
    layers = []
    for l, geo in enumerate(trace.geometry):
        iterations = []
        for k, step in enumerate(trace.coefficients):
            r = step[l][index].double()  # (H, W, children, parents)
            rows = r.reshape(-1, r.shape[-1]).tolist()
            best = [max(range(len(row)), key=row.__getitem__) for row in rows]
            parents = trace.poses[k][l + 1][index]  # (H, W, N, d)
            norms = [[_norm(p) for p in position] for position in parents.reshape(-1, *parents.shape[2:]).tolist()]
            iterations.append(
                dict(
                    iteration=k + 1,
                    uniform=k == 0,
                    entropy=float(np.mean([_entropy_by_loop(row) for row in rows])),
                    entropy_normalized=float(np.mean([_entropy_by_loop(row) for row in rows]) / math.log(len(rows[0]))),
                    max_coefficient=float(np.mean([max(row) for row in rows])),
                    argmax_parent=None if k == 0 or not argmax else np.reshape(best, r.shape[:-1]).tolist(),
                    argmax_parent_counts=None if k == 0 else [best.count(j) for j in range(len(rows[0]))],
                    pose_norm_mean=float(np.mean(norms)),
                    pose_norm_per_type=[float(v) for v in np.mean(norms, 0)],
                )
            )
        layers.append(
            dict(
                name=trace.layer_names[l + 1],
                children=trace.layer_names[l],
                kind=geo.kind,
                kernel_size=geo.kernel_size,
                stride=geo.stride,
                child_grid=list(geo.child_grid),
                parent_grid=list(geo.parent_grid),
                coefficients_shape=[*geo.parent_grid[:2], _children(geo), geo.parent_grid[2]],
                used_iteration=trace.used_iterations[l] + 1,
                iterations=iterations,
            )
        )
    primary = trace.poses[-1][0][index]
    return dict(
        logits=logits,
        scores={names[c]: scores[c] for c in range(len(names))},
        predicted=[names[c] for c in order],
        predicted_index=order,
        primary=dict(
            grid=list(primary.shape[:3]),
            pose_norm_mean=float(np.mean([_norm(p) for p in primary.reshape(-1, primary.shape[-1]).tolist()])),
        ),
        layers=layers,
    )


@pytest.mark.parametrize(
    'index, label_names, multi_label, top_k, argmax',
    [
        (1, None, False, 1, True),
        (0, ['a', 'b', 'c', 'd'], True, 3, False),
        (1, ['too', 'few'], False, 2, True),
    ],
)
def test_routing_summary_field_by_field(index, label_names, multi_label, top_k, argmax):
    trace = _trace(GEOMETRY_1X1 if top_k == 2 else GEOMETRY, used=(0, 2))
    summary = analysis.routing_summary(trace, index, label_names, multi_label=multi_label, top_k=top_k, argmax=argmax)
    names = label_names if label_names and len(label_names) == 4 else ['0', '1', '2', '3']
    _close(summary, _expected_summary(trace, index, names, multi_label, top_k, argmax))


def test_routing_summary_defaults_and_a_one_iteration_trace():
    """By default image 0, the softmax, one predicted class and the argmax parents; a model routed once
    (iterations=1) has only its uniform first pass."""
    trace = _trace()
    _close(analysis.routing_summary(trace), _expected_summary(trace, 0, ['0', '1', '2', '3'], False, 1, True))
    once = _trace(T=1, used=(0, 0))
    summary = analysis.routing_summary(once, 1)
    _close(summary, _expected_summary(once, 1, ['0', '1', '2', '3'], False, 1, True))
    assert [len(layer['iterations']) for layer in summary['layers']] == [1, 1]


def test_class_names_are_the_labels_only_when_there_is_one_per_class():
    assert analysis.class_names([7, 'b', 3.5], 3) == ['7', 'b', '3.5']
    assert analysis.class_names(['a', 'b'], 3) == ['0', '1', '2']
    assert analysis.class_names(None, 2) == ['0', '1']


# ---- the part-whole tree ----------------------------------------------------------------------------------------
def _tree_by_loops(trace, index, classes, top, iterations, names):
    """The docstring's tree: in each layer below the classes, the ``top`` capsules that receive most of
    r_ij * m_j (m_j a kept parent's mass summed over the classes) from the kept parents."""
    masses = _masses_by_loops(trace, classes, iterations)
    grids = [geo.child_grid for geo in trace.geometry] + [trace.geometry[-1].parent_grid]
    L = len(grids)
    kept, edges = [None] * (L - 1) + [list(classes)], []
    for l in reversed(range(L - 1)):
        r = trace.coefficients[iterations[l]][l][index]
        flows = np.zeros((math.prod(grids[l]), len(kept[l + 1])))
        for rank, p in enumerate(kept[l + 1]):
            y, x, j = np.unravel_index(p, grids[l + 1])
            m = float(masses[l + 1][index, y, x, j].sum())
            for c in range(r.shape[-2]):
                child = np.ravel_multi_index(_window_child(trace.geometry[l], y, x, c), grids[l])
                flows[child, rank] += float(r[y, x, c, j]) * m
        kept[l] = sorted(range(len(flows)), key=lambda c: -flows[c].sum())[:top]
        edges += [(l, rank, k, flows[c, k]) for rank, c in enumerate(kept[l]) for k in range(flows.shape[1])]
    nodes = []
    for l, grid in enumerate(grids):
        layer = []
        for c in kept[l]:
            y, x, n = (int(v) for v in np.unravel_index(c, grid))
            label = names[c] if l == L - 1 else (f'{n}' if grid[:2] == (1, 1) else f'({y},{x})#{n}')
            per_class = masses[l][index, y, x, n]
            layer.append((label, int(per_class.argmax()), float(per_class.sum())))
        nodes.append(layer)
    largest = max(e[3] for e in edges)
    return nodes, [e for e in edges if e[3] > 1e-4 * largest]


@pytest.mark.parametrize(
    'geometry, classes, top, iteration, label_names',
    [(GEOMETRY, [1, 3], 18, -1, None), (GEOMETRY_1X1, [2, 0], 3, 'used', ['w', 'x', 'y', 'z'])],
)
def test_part_whole_tree_is_the_loop_over_kept_parents(geometry, classes, top, iteration, label_names):
    trace = _trace(geometry, used=(1, 2))
    # class 3 sends almost nothing to the even children of the fc layer: those edges fall under 1e-4 of the largest
    r = trace.coefficients[-1][1]
    r[:, :, :, ::2, 3] = 1e-9
    trace.coefficients[-1][1] = r / r.sum(-1, keepdim=True)
    iterations = trace.used_iterations if iteration == 'used' else [2, 2]
    names = label_names or ['0', '1', '2', '3']
    tree = analysis.part_whole_tree(trace, 1, classes, top, iteration, label_names)
    nodes, edges = _tree_by_loops(trace, 1, classes, top, iterations, names)
    assert tree.layer_names == ['primary', 'middle', 'classes'] and tree.classes == [names[c] for c in classes]
    assert [[(label, k) for label, k, _ in layer] for layer in tree.nodes] == [
        [(label, k) for label, k, _ in layer] for layer in nodes
    ]
    assert [[m for *_, m in layer] for layer in tree.nodes] == [
        pytest.approx([m for *_, m in layer]) for layer in nodes
    ]
    assert [e[:3] for e in tree.edges] == [e[:3] for e in edges]
    assert [e[3] for e in tree.edges] == pytest.approx([e[3] for e in edges], rel=1e-5)
    assert len(tree.nodes[0]) == top and {k for layer in nodes[:2] for _, k, _ in layer} == {0, 1}


def test_part_whole_tree_defaults_no_capsule_kept_and_a_class_nobody_routes_to():
    trace = _trace()
    nodes, edges = _tree_by_loops(trace, 0, [1], 6, [2, 2], ['0', '1', '2', '3'])
    tree = analysis.part_whole_tree(trace, 0, [1])  # the 6 capsules of most mass per layer, the last iteration
    assert [[label for label, *_ in layer] for layer in tree.nodes] == [
        [label for label, *_ in layer] for layer in nodes
    ]
    assert [e[:3] for e in tree.edges] == [e[:3] for e in edges] and len(tree.nodes[0]) == 6
    bare = analysis.part_whole_tree(_trace(GEOMETRY[1:]), 0, [1, 2], top=0)  # primary -> classes, none kept
    assert [len(layer) for layer in bare.nodes] == [0, 2] and bare.edges == []
    deep = analysis.part_whole_tree(trace, 0, [1, 2], top=0)  # two routing layers: none kept in either
    assert [len(layer) for layer in deep.nodes] == [0, 0, 2] and deep.edges == []
    with pytest.raises(ValueError, match='top must be 0 or more'):
        analysis.part_whole_tree(trace, 0, [1], top=-1)
    # every child routes all of its mass to classes 0-2: class 3 receives nothing, so no edge carries anything
    one_hot = torch.eye(4)[trace.coefficients[-1][1][..., :3].argmax(-1)]
    trace.coefficients[-1][1] = one_hot
    nobody = analysis.part_whole_tree(trace, 0, [3], top=2)
    assert nobody.edges == [] and [m for layer in nobody.nodes[:2] for *_, m in layer] == [0.0] * 4


def test_node_labels_name_position_and_type():
    assert analysis._node_label((3, 5, 2), 23) == '(2,1)#1'  # position 11 of a 3 x 5 grid, type 1
    assert analysis._node_label((1, 1, 5), 3) == '3'
    assert analysis._node_label((1, 4, 2), 5) == '(0,2)#1'


# ---- heat maps --------------------------------------------------------------------------------------------------
# receptive fields of the 3 x 4 primary grid on a 6 x 8 image: overlapping 3 x 3 boxes at stride 2, clipped
BOXES = np.array([[(2 * y, min(2 * y + 3, 6), 2 * x, min(2 * x + 3, 8)) for x in range(4)] for y in range(3)])


@pytest.mark.parametrize('mode', ['mean', 'sum'])
def test_class_heatmaps_are_the_mass_or_its_gain_over_the_first_pass(mode):
    trace = _trace()
    mass = _masses_by_loops(trace, [3, 1], [2, 2])[0].sum(3).float()  # (B, 3, 4, 2): summed over capsule types
    uniform = _masses_by_loops(trace, [3, 1], [0, 0])[0].sum(3).float()
    got = analysis.class_heatmaps(trace, [3, 1], BOXES, (6, 8), mode=mode, heat='mass')
    torch.testing.assert_close(got, primary_to_image(mass, BOXES, (6, 8), mode), rtol=1e-5, atol=1e-7)
    got = analysis.class_heatmaps(trace, [3, 1], BOXES, (6, 8), mode=mode)
    torch.testing.assert_close(got, primary_to_image(mass / uniform, BOXES, (6, 8), mode), rtol=1e-5, atol=1e-7)
    assert got.shape == (2, 6, 8, 2)
    once = analysis.class_heatmaps(trace, [3, 1], BOXES, (6, 8), iteration=1, mode=mode, heat='mass')
    assert not torch.allclose(once, primary_to_image(mass, BOXES, (6, 8), mode))
    with pytest.raises(ValueError, match=r"^heat must be 'gain' or 'mass', got 'raw'$"):
        analysis.class_heatmaps(trace, [3, 1], BOXES, (6, 8), heat='raw')


# ---- own fraction and the probe ---------------------------------------------------------------------------------
def test_own_fraction_by_hand():
    mass = torch.tensor([1.0, 2.0, 3.0, 4.0])
    owner = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.5, 1.0, 0.0]])  # position 3: background
    assert analysis.own_fraction(mass, owner, 0) == pytest.approx(2 / 6)
    assert analysis.own_fraction(mass, owner, 1) == pytest.approx(4 / 6)
    assert analysis.own_fraction(torch.zeros(4), owner, 1) == 0.0  # no digit-borne mass: 0, not 0 / 0


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=8))
def test_own_fractions_of_the_two_digits_add_up_to_one(rows):
    mass = torch.tensor([m for m, _, _ in rows], dtype=torch.float64)
    owner = torch.tensor([[a for _, a, _ in rows], [b for _, _, b in rows]], dtype=torch.float64)
    mine, theirs = float((mass * owner[0]).sum()), float((mass * owner[1]).sum())
    a, b = analysis.own_fraction(mass, owner, 0), analysis.own_fraction(mass, owner, 1)
    if mine + theirs > 1e-12:
        assert a == pytest.approx(mine / (mine + theirs)) and a + b == pytest.approx(1.0)
        assert analysis.own_fraction(3 * mass, owner, 0) == pytest.approx(a)
    assert 0 <= a <= 1 and 0 <= b <= 1


def _capsnet():
    """Primary capsules tiling a 16 x 16 image in 2 x 2 cells (an 8 x 8 grid of 2 types), fully connected to 3
    class capsules."""
    torch.manual_seed(0)
    return CapsNet(
        num_classes=3,
        in_chans=1,
        img_size=16,
        backbone='simple',
        backbone_args=dict(out_chs=4, kernel_size=2, stride=2, padding=0),
        primary_caps=2,
        pose_dim=4,
        capsule_layers=(),
    ).eval()


def test_routing_trace_runs_in_eval_mode_without_gradients_and_restores_the_mode():
    model = _capsnet()
    real, seen = model.forward_routing, []

    def forward_routing(x):
        seen.append((model.training, model.backbone.training, torch.is_grad_enabled()))
        if x.shape[0] == 3:
            raise RuntimeError('three images')
        return real(x)

    model.forward_routing = forward_routing
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        logits = model(x)
    for training in (True, False, True):
        model.train(training)
        trace = analysis.routing_trace(model, x)
        assert seen[-1] == (False, False, False) and model.training is training and model.backbone.training is training
        assert not trace.logits.requires_grad
        torch.testing.assert_close(trace.logits, logits)
    with pytest.raises(RuntimeError, match='three images'):
        analysis.routing_trace(model, torch.rand(3, 1, 16, 16))
    assert model.training and torch.is_grad_enabled()


def _quarters_model(left=(0.6, 0.3, 0.1), right=(0.2, 0.2, 0.6)):
    """``_capsnet`` with forward_routing replaced by a trace whose class routing is fixed: primary capsules in
    columns 0-1 route ``left`` to the classes, the rest ``right``."""
    model = _capsnet()
    real = model.forward_routing

    def forward_routing(x):
        is_left = (torch.arange(8) < 2).view(1, 8, 1).expand(8, 8, 1)  # (h, w, 1)
        r = torch.where(is_left, torch.tensor(left), torch.tensor(right))
        r = r.expand(2, 8, 8, 3).reshape(1, 1, 1, 128, 3).expand(x.shape[0], -1, -1, -1, -1)  # children (n, h, w)
        return dataclasses.replace(real(x), coefficients=[[torch.full_like(r, 1 / 3)], [r]])

    model.forward_routing = forward_routing
    return model


def _masks(n):
    """Digit 0 in image rows 0-7, columns 0-3; digit 1 in rows 0-7, columns 4-15; the bottom half empty."""
    masks = torch.zeros(n, 2, 16, 16)
    masks[:, 0, :8, :4] = 1.0
    masks[:, 1, :8, 4:] = 1.0
    return masks


def test_probe_per_image_values_follow_the_labels_and_the_masks():
    """Digits fill the top half only: digit 0 image columns 0-3 (8 primary positions), digit 1 the rest of the top
    half (24 positions); the bottom half is background. Image 0 (classes 0, 2): class 0 gets 0.6 per capsule on
    the left, 0.2 on the right: own fraction 0.6 * 8 / (0.6 * 8 + 0.2 * 24) = 1 / 2; class 2: 0.6 * 24 / (0.1 * 8
    + 0.6 * 24) = 18 / 19. Image 1 swaps the classes (label 0 second: still a two-digit image): class 2 on the
    left 0.1 * 8 / 15.2 = 1 / 19, class 0 on the right 0.2 * 24 / 9.6 = 1 / 2. Image 2 (one digit) is skipped.
    Image 3 (classes 1, 2): 0.3 * 8 / (0.3 * 8 + 0.2 * 24) = 1 / 3 and 18 / 19."""
    model = _quarters_model()
    masks = _masks(4)
    labels = torch.tensor([[0, 2], [2, 0], [1, -1], [1, 2]])
    for batch_size in (1, 64):
        result = analysis.part_whole_probe(model, torch.rand(4, 1, 16, 16), masks, labels, batch_size=batch_size)
        assert result['images'] == 3 and result['ownership'] == 'soft' and result['iteration'] == -1
        np.testing.assert_allclose(result['per_image'], [[0.5, 18 / 19], [1 / 19, 0.5], [1 / 3, 18 / 19]], rtol=1e-6)
        assert result['own_fraction'] == pytest.approx((0.5 + 18 / 19 + 1 / 19 + 0.5 + 1 / 3 + 18 / 19) / 6)
        assert result['separated'] == 0.0
        # the other digit's share of all the class's mass (class 0: 0.6 * 16 + 0.2 * 48 = 19.2, 1: 14.4, 2: 30.4)
        other = [0.2 * 24 / 19.2, 0.1 * 8 / 30.4, 0.6 * 24 / 30.4, 0.6 * 8 / 19.2, 0.2 * 24 / 14.4, 0.1 * 8 / 30.4]
        assert result['other_fraction_of_all'] == pytest.approx(np.mean(other))
        assert result['background_fraction_of_all'] == pytest.approx(0.5)
        assert result['baseline'] == pytest.approx(0.5) and result['area_share'] == pytest.approx(0.5)
    boxes = analysis.primary_receptive_fields(model)
    again = analysis.part_whole_probe(model, torch.rand(4, 1, 16, 16), masks, labels, 0, 'hard', 2, boxes)
    assert again['ownership'] == 'hard' and again['iteration'] == 0
    np.testing.assert_allclose(again['per_image'], [[0.25, 0.75]] * 3, rtol=1e-6)  # uniform: the area
    with pytest.raises(ValueError, match=r"^ownership must be 'soft' or 'hard', got 'fuzzy'$"):
        analysis.part_whole_probe(model, torch.rand(4, 1, 16, 16), masks, labels, ownership='fuzzy')
    with pytest.raises(ValueError, match=r'^part_whole_probe needs two-digit images \(labels\[:, 1\] >= 0\)$'):
        analysis.part_whole_probe(model, torch.rand(1, 1, 16, 16), masks[:1], labels[2:3])


@pytest.mark.parametrize(
    'ownership, per_image',
    [
        (None, [[0.375, 73 / 76], [3 / 76, 0.625], [0.25, 73 / 76]]),
        ('soft', [[0.375, 73 / 76], [3 / 76, 0.625], [0.25, 73 / 76]]),
        ('hard', [[1 / 3, 36 / 37], [1 / 37, 2 / 3], [0.2, 36 / 37]]),
    ],
)
def test_probe_reads_the_receptive_fields_it_is_given(ownership, per_image):
    """Hand-made receptive fields 4 columns wide at stride 2: primary column 1 sees image columns 2-5, half digit
    0 and half digit 1 (soft: 1/2 each; hard: a tie, neither). Per top-half row, class 0's mass over primary columns
    0..7 is (0.6, 0.6, 0.2 x 6): soft, digit 0 owns (1, 1/2, 0 ...), so 0.9 / (0.9 + 1.5) = 0.375; hard, digit 0
    owns column 0 only, 0.6 / (0.6 + 1.2) = 1 / 3. Class 2 (0.1, 0.1, 0.6 x 6) on digit 1: soft 3.65 / 3.8, hard
    3.6 / 3.7; class 1 (0.3, 0.3, 0.2 x 6) on digit 0: soft 0.45 / 1.8, hard 0.3 / 1.5."""
    model = _quarters_model()
    boxes = np.array([[(2 * y, 2 * y + 2, 2 * x, min(2 * x + 4, 16)) for x in range(8)] for y in range(8)])
    options = {} if ownership is None else dict(ownership=ownership)
    labels = torch.tensor([[0, 2], [2, 0], [1, 2]])
    result = analysis.part_whole_probe(
        model, torch.rand(3, 1, 16, 16), _masks(3), labels, receptive_fields=boxes, **options
    )
    np.testing.assert_allclose(result['per_image'], per_image, rtol=1e-6)


def test_probe_shares_of_a_class_with_little_mass():
    """Class 1 gets 0.004 from each of the 128 primary capsules: 0.512 in all, less than 1. Of it, digit 1's 24
    top-half positions (2 types each) carry 0.192, 3/8; the bottom half, 1/2. Class 0 gets 0.995 on the left,
    0.001 on the right: digit 0 (its other digit here) carries 0.995 * 16 of 0.995 * 32 + 0.001 * 96."""
    model = _quarters_model((0.995, 0.004, 0.001), (0.001, 0.004, 0.995))
    result = analysis.part_whole_probe(model, torch.rand(1, 1, 16, 16), _masks(1), torch.tensor([[1, 0]]))
    assert result['other_fraction_of_all'] == pytest.approx((3 / 8 + 0.995 * 16 / (0.995 * 32 + 0.001 * 96)) / 2)
    assert result['background_fraction_of_all'] == pytest.approx(0.5)
    np.testing.assert_allclose(result['per_image'], [[0.25, 0.001 * 24 / (0.001 * 24 + 0.995 * 8)]], rtol=1e-5)


@pytest.mark.parametrize('option', ['--tree-top', '--top-k'])
def test_a_negative_count_is_refused_by_the_command_line(option, capsys, tmp_path):
    from timm_capsules.parse_tree.cli import main

    with pytest.raises(SystemExit) as error:
        main(['--model', 'capsnet_simple_cifar10', option, '-1', '--out', str(tmp_path / 'out')])
    assert error.value.code == 2
    assert f'argument {option}: must be 0 or more, got -1' in capsys.readouterr().err
