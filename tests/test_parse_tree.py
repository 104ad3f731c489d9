"""Routing introspection (timm_capsules.parse_tree): coefficients, top-down mass, pictures and the probe."""

import dataclasses
import json
import re
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from timm_capsules.capsnet import CapsNet, RoutingGeometry
from timm_capsules.parse_tree import (
    class_heatmaps,
    class_primary_mass,
    diverse_multimnist_samples,
    load_images,
    model_dataset,
    part_whole_probe,
    part_whole_tree,
    prepare_arrays,
    primary_receptive_fields,
    primary_to_image,
    propagate_mass,
    routing_entropy,
    routing_summary,
    routing_trace,
)
from timm_capsules.parse_tree.cli import PROG, main, tree_file_names
from timm_capsules.layers import Capsules

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    num_classes=3,
    in_chans=1,
    img_size=12,
    backbone='simple',
    backbone_args=dict(out_chs=8),
    primary_caps=4,
    pose_dim=4,
    capsule_layers=(('conv', 4, 3, 1), ('conv', 3, 2, 1)),
)


def _recompute(layer, children: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Parent poses from child poses and routing coefficients, written out independently of the model:
    p_j = LayerNorm(sum_i r_ij v_ij) with v_ij = the layer's votes."""
    votes = layer.votes(Capsules(children))  # (groups, children, parents, rows, cols)
    B, H, W, C, J = coefficients.shape
    poses = torch.einsum('gij,gijrt->gjrt', coefficients.reshape(B * H * W, C, J), votes)
    return layer.norm(poses.reshape(B, H, W, J, -1))


@pytest.mark.parametrize('routing,iterations', [('concurrent', 2), ('concurrent', 3), ('sequential', 3)])
def test_coefficients_shapes_sum_and_reproduce_the_logits(routing, iterations):
    torch.manual_seed(0)
    model = CapsNet(**TINY, routing=routing, iterations=iterations).eval()
    x = torch.randn(2, 1, 12, 12)
    trace = routing_trace(model, x)
    assert trace.layer_names == ['primary', 'capsule_layers.0', 'capsule_layers.1', 'head.capsules']
    # documented shapes: (B, H, W, children, parents), children (ky, kx, type) per window / (type, h, w)
    # 6x6 primary grid -> conv k3 s1 -> 4x4 -> conv k2 s1 -> 3x3 -> 3 class capsules
    expected = [(2, 4, 4, 3 * 3 * 4, 4), (2, 3, 3, 2 * 2 * 4, 3), (2, 1, 1, 3 * 3 * 3, 3)]
    assert len(trace.coefficients) == iterations
    for step in trace.coefficients:
        assert [tuple(r.shape) for r in step] == expected
        for r in step:
            torch.testing.assert_close(r.sum(-1), torch.ones(r.shape[:-1]))
            assert (r >= 0).all()
    assert [tuple(p.shape) for p in trace.poses[-1]] == [
        (2, 6, 6, 4, 4),
        (2, 4, 4, 4, 4),
        (2, 3, 3, 3, 4),
        (2, 1, 1, 3, 4),
    ]
    assert all((r == 1 / r.shape[-1]).all() for r in trace.coefficients[0])  # uniform first pass
    assert not torch.allclose(trace.coefficients[-1][0], trace.coefficients[0][0])  # attention did route

    # every layer's poses at every iteration follow from the returned coefficients
    layers = list(model.capsule_layers) + [model.head.capsules]
    with torch.no_grad():
        for k in range(iterations):
            for l, layer in enumerate(layers):
                if routing == 'concurrent':
                    children = trace.poses[max(k - 1, 0)][l]  # iteration k reads iteration k - 1
                else:  # each layer routes from the finished layer below
                    children = trace.poses[-1][l]
                poses = _recompute(layer, children, trace.coefficients[k][l])
                torch.testing.assert_close(poses, trace.poses[k][l + 1], rtol=1e-4, atol=1e-5)
        logits = model.head.fc(
            _recompute(
                layers[-1],
                (trace.poses[-2] if routing == 'concurrent' else trace.poses[-1])[-2],
                trace.coefficients[-1][-1],
            )
        ).flatten(1)
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(trace.logits, model(x), rtol=1e-4, atol=1e-5)
        # and other coefficients would have given other logits
        shuffled = trace.coefficients[-1][-1].flip(-1)
        other = model.head.fc(
            _recompute(layers[-1], (trace.poses[-2] if routing == 'concurrent' else trace.poses[-1])[-2], shuffled)
        ).flatten(1)
        assert not torch.allclose(other, logits, atol=1e-3)

    summary = routing_summary(trace, index=1)
    assert [layer['name'] for layer in summary['layers']] == trace.layer_names[1:]
    first, last = summary['layers'][0]['iterations'][0], summary['layers'][0]['iterations'][-1]
    assert first['uniform'] and first['entropy_normalized'] == pytest.approx(1.0)
    assert first['entropy'] == pytest.approx(math.log(4))
    assert last['argmax_parent'] == trace.coefficients[-1][0][1].argmax(-1).tolist()
    assert last['entropy'] == pytest.approx(float(routing_entropy(trace.coefficients[-1][0][1]).mean()), rel=1e-5)
    assert sum(summary['scores'].values()) == pytest.approx(1.0)
    json.dumps(summary)


def test_propagate_mass_matches_a_loop():
    torch.manual_seed(1)
    B, H, W, k, s, N, J, K = 2, 3, 2, 3, 2, 2, 3, 2
    Hc, Wc = (H - 1) * s + k, (W - 1) * s + k
    r = torch.rand(B, H, W, k * k * N, J).softmax(-1)
    m = torch.rand(B, H, W, J, K)
    expected = torch.zeros(B, Hc, Wc, N, K)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                for ky in range(k):
                    for kx in range(k):
                        for n in range(N):
                            child = (ky * k + kx) * N + n
                            for j in range(J):
                                expected[b, y * s + ky, x * s + kx, n] += r[b, y, x, child, j] * m[b, y, x, j]
    conv = RoutingGeometry('conv', k, s, (Hc, Wc, N), (H, W, J))
    torch.testing.assert_close(propagate_mass(r, m, conv), expected)
    # fully connected: children in (type, h, w) order
    r = torch.rand(B, 1, 1, N * 2 * 3, J).softmax(-1)
    m = torch.rand(B, 1, 1, J, K)
    out = propagate_mass(r, m, RoutingGeometry('fc', None, None, (2, 3, N), (1, 1, J)))
    for n, h, w in [(0, 0, 0), (1, 0, 2), (1, 1, 1)]:
        torch.testing.assert_close(
            out[:, h, w, n], torch.einsum('bj,bjk->bk', r[:, 0, 0, n * 6 + h * 3 + w], m[:, 0, 0])
        )


@pytest.mark.parametrize('routing', ['concurrent', 'sequential'])
def test_used_iteration_is_the_one_that_fed_the_logits(routing):
    """iteration='used': with concurrent routing the class capsules' last pass read the layer below at
    iteration t - 1, that one the layer below it at t - 2, ...; with sequential routing every layer's last."""
    torch.manual_seed(0)
    model = CapsNet(**TINY, routing=routing, iterations=3).eval()
    trace = routing_trace(model, torch.randn(2, 1, 12, 12))
    # routing layers: capsule_layers.0 (conv k3 s1), capsule_layers.1 (conv k2 s1), head.capsules (fc)
    layers = [
        RoutingGeometry('conv', 3, 1, (6, 6, 4), (4, 4, 4)),
        RoutingGeometry('conv', 2, 1, (4, 4, 4), (3, 3, 3)),
        RoutingGeometry('fc', None, None, (3, 3, 3), (1, 1, 3)),
    ]
    assert trace.geometry == layers
    used = [0, 1, 2] if routing == 'concurrent' else [2, 2, 2]
    mass = torch.zeros(2, 1, 1, 3, 1)
    mass[:, 0, 0, 2, 0] = 1.0  # class 2
    for l in (2, 1, 0):
        mass = propagate_mass(trace.coefficients[used[l]][l], mass, layers[l])
    got = class_primary_mass(trace, [2], 'used')
    torch.testing.assert_close(got, mass)
    assert got.shape == (2, 6, 6, 4, 1)
    # the iteration comes from the trace: another schedule there gives other masses
    shifted = dataclasses.replace(trace, used_iterations=[2, 2, 2] if routing == 'concurrent' else [0, 1, 2])
    assert not torch.allclose(class_primary_mass(shifted, [2], 'used'), got)
    last = class_primary_mass(trace, [2], -1)
    assert torch.allclose(last, got) is (routing == 'sequential')


def test_heat_map_of_a_constant_is_flat_and_sum_keeps_the_mass():
    torch.manual_seed(0)
    model = CapsNet(**TINY).eval()
    boxes = primary_receptive_fields(model)
    assert boxes[0, 1, 2] < boxes[0, 0, 3]  # neighbouring boxes overlap: pixels in 1, 2 or 4 boxes
    flat = primary_to_image(torch.full((1, 6, 6), 2.5), boxes, model.img_size, 'mean')
    covered = primary_to_image(torch.ones(1, 6, 6), boxes, model.img_size, 'sum') > 0
    assert covered.float().mean() > 0.8
    torch.testing.assert_close(flat[covered], torch.full_like(flat[covered], 2.5))
    mass = torch.rand(1, 6, 6, 3)
    torch.testing.assert_close(primary_to_image(mass, boxes, model.img_size, 'sum').sum((1, 2)), mass.sum((1, 2)))
    # routing mass relative to the uniform first pass: 1 everywhere for the first pass itself
    trace = routing_trace(model, torch.randn(1, 1, 12, 12))
    gain = class_heatmaps(trace, [0, 1], boxes, model.img_size, iteration=0)
    torch.testing.assert_close(gain[covered], torch.ones_like(gain[covered]))


def _halves_model():
    """Primary capsules tiling a 16x16 image in 2x2 cells (8x8 grid), fully connected to 2 class capsules."""
    torch.manual_seed(0)
    return CapsNet(
        num_classes=2,
        in_chans=1,
        img_size=16,
        backbone='simple',
        backbone_args=dict(out_chs=4, kernel_size=2, stride=2, padding=0),
        primary_caps=2,
        pose_dim=4,
        capsule_layers=(),
    ).eval()


def _fixed_routing(model, left_to_a: float):
    """forward_routing replaced by a trace whose class routing is fixed: every primary capsule in the left
    half of the grid sends ``left_to_a`` to class 0 (the rest to class 1), the right half the reverse.
    Everything else (shapes, layer names, geometry) is the model's own trace."""
    real = model.forward_routing

    def forward_routing(x):
        B = x.shape[0]
        left = (torch.arange(8) < 4).float().view(1, 8).expand(8, 8)  # (h, w)
        to_a = left * left_to_a + (1 - left) * (1 - left_to_a)
        to_a = to_a.expand(2, 8, 8).reshape(-1)  # children (type, h, w)
        r = torch.stack([to_a, 1 - to_a], -1).expand(B, 1, 1, -1, -1)
        trace = real(x)
        assert trace.layer_names == ['primary', 'head.capsules'] and len(trace.coefficients) == 2
        return dataclasses.replace(trace, coefficients=[[torch.full_like(r, 0.5)], [r]])

    model.forward_routing = forward_routing
    return model


@pytest.mark.parametrize('ownership', ['soft', 'hard'])
def test_probe_known_answers(ownership):
    model = _halves_model()
    boxes = primary_receptive_fields(model)
    expected = np.array([[(2 * y, 2 * y + 2, 2 * x, 2 * x + 2) for x in range(8)] for y in range(8)])
    np.testing.assert_array_equal(boxes, expected)  # 2x2 stride-2 conv then 1x1 primary conv

    images = torch.rand(3, 1, 16, 16)
    masks = torch.zeros(3, 2, 16, 16)
    masks[:, 0, :, :8] = 1.0  # digit 0: left half
    masks[:, 1, :, 8:] = 1.0  # digit 1: right half
    labels = torch.tensor([[0, 1], [0, 1], [0, 1]])

    result = part_whole_probe(_fixed_routing(model, 1.0), images, masks, labels, ownership=ownership)
    assert result['images'] == 3
    assert result['own_fraction'] == pytest.approx(1.0)
    assert result['baseline'] == pytest.approx(0.5)  # the uniform first pass: no preference
    assert result['area_share'] == pytest.approx(0.5)
    assert result['separated'] == pytest.approx(1.0)
    assert result['background_fraction_of_all'] == pytest.approx(0.0)

    # the same routing read against swapped labels: all mass comes from the other digit
    result = part_whole_probe(model, images, masks, labels.flip(1), ownership=ownership)
    assert result['own_fraction'] == pytest.approx(0.0)
    assert result['separated'] == 0.0
    assert result['other_fraction_of_all'] == pytest.approx(1.0)

    # 3/4 of each class's mass from its own half; digits only in the top half; single-digit images skipped
    masks[:, :, 8:] = 0.0
    labels = torch.tensor([[0, 1], [0, -1], [0, 1]])
    result = part_whole_probe(_fixed_routing(model, 0.75), images, masks, labels, ownership=ownership)
    assert result['images'] == 2
    assert result['own_fraction'] == pytest.approx(0.75)
    assert result['background_fraction_of_all'] == pytest.approx(0.5)
    assert result['other_fraction_of_all'] == pytest.approx(0.125)


def test_top_down_mass_of_the_fixed_routing():
    model = _fixed_routing(_halves_model(), 0.75)
    trace = model.forward_routing(torch.zeros(1, 1, 16, 16))
    mass = class_primary_mass(trace, [0, 1])  # (1, 8, 8, 2 types, 2 classes)
    assert mass.shape == (1, 8, 8, 2, 2)
    assert torch.allclose(mass[0, :, :4, :, 0], torch.tensor(0.75))
    assert torch.allclose(mass[0, :, 4:, :, 0], torch.tensor(0.25))
    assert torch.allclose(mass[..., 0] + mass[..., 1], torch.tensor(1.0))


@pytest.mark.slow  # a subprocess that draws five pictures (about 13 s on 2 cores)
def test_command_line_writes_pictures_json_and_raw(tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    picture = tmp_path / 'noise.png'
    Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(picture)
    out = tmp_path / 'out'
    kwargs = dict(
        backbone_args=dict(out_chs=8), primary_caps=4, pose_dim=4, capsule_layers=[['conv', 4, 3, 1]], iterations=3
    )
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', MPLBACKEND='Agg')
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'timm_capsules.parse_tree',
            '--model',
            'capsnet_matrix_multimnist',
            '--model-kwargs',
            json.dumps(kwargs),
            str(picture),
            '--diverse-multimnist',
            '2',
            '--mnist-source',
            'sample',
            '--probe',
            '4',
            '--save-raw',
            'safetensors',
            '--out',
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((out / 'summary.json').read_text())
    digits, masks, labels, ids, source = diverse_multimnist_samples(2, source='sample', two_digit_only=True)
    images = ['noise.png'] + [f'diverse_multimnist_test_{i}' for i in ids]
    trees = ['tree_noise.png'] + [f'tree_diverse_multimnist_test_{i}.png' for i in ids]
    # each tree is named after its image, and the summary says which image each picture shows
    assert [(item['image'], item['tree']) for item in summary['images']] == list(zip(images, trees))
    assert summary['pictures'] == dict(
        {'heatmaps.png': images, 'entropy.png': images}, **{tree: [image] for tree, image in zip(trees, images)}
    )
    assert summary['mnist_source'] == source
    assert sorted(p.name for p in out.glob('*.png')) == sorted(['heatmaps.png', 'entropy.png', *trees])
    sizes = {}
    for name in ['heatmaps.png', 'entropy.png', *trees]:
        path = out / name
        assert path.stat().st_size > 8_000, name
        with Image.open(path) as image:
            image.load()
            assert image.format == 'PNG' and min(image.size) >= 150, name
            sizes[name] = image.size
            pixels = np.asarray(image.convert('RGB')).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50, name  # a real picture, not a blank canvas
        assert pixels.std() > 10, name

    # heat maps large enough to read: 3 rows of an input and 2 maps with colour bars, 100 dpi
    assert sizes['heatmaps.png'][0] >= 3 * 300 and sizes['heatmaps.png'][1] >= 3 * 280
    assert summary['dataset'] == 'diverse_multimnist' and summary['dataset_from'] == 'pretrained_cfg'
    assert len(summary['images']) == 3
    for item in summary['images']:
        assert len(item['predicted']) == 2  # multi-label DiverseMultiMNIST model: top-2 digits
        assert [layer['name'] for layer in item['layers']] == ['capsule_layers.0', 'head.capsules']
        assert len(item['layers'][0]['iterations']) == 3
    assert all(len(item['true']) == 2 for item in summary['images'][1:])
    raw = load_file(str(out / 'coefficients.safetensors'))
    r = raw['image1/iteration3/capsule_layers.0']
    assert r.shape == (6, 6, 3 * 3 * 4, 4)
    torch.testing.assert_close(r.sum(-1), torch.ones(6, 6, 36))

    # the numbers are the model's: the same model (seed 0, as the command builds it) on the same inputs
    torch.manual_seed(0)
    model = timm.create_model('capsnet_matrix_multimnist', **kwargs).eval()
    x = torch.cat([load_images(model, [str(picture)]), prepare_arrays(model, digits, masks)[0]])
    trace = routing_trace(model, x)
    for b, item in enumerate(summary['images']):
        torch.testing.assert_close(torch.tensor(item['logits']), trace.logits[b])
        assert item['predicted'] == [str(c) for c in trace.logits[b].argsort(descending=True)[:2].tolist()]
        for k in range(3):
            for l, name in enumerate(trace.layer_names[1:]):
                torch.testing.assert_close(raw[f'image{b}/iteration{k + 1}/{name}'], trace.coefficients[k][l][b])
    assert [sorted(item['true']) for item in summary['images'][1:]] == [
        sorted(str(c) for c in label) for label in labels
    ]
    digits, masks, labels, _, _ = diverse_multimnist_samples(4, source='sample', two_digit_only=True)
    x, masks = prepare_arrays(model, digits, masks)
    expected = part_whole_probe(model, x, masks, torch.from_numpy(labels))
    probe = json.loads((out / 'probe.json').read_text())
    assert probe['images'] == 4 and probe.keys() == expected.keys()
    for key in ('own_fraction', 'baseline', 'area_share', 'separated', 'other_fraction_of_all'):
        assert probe[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_part_whole_tree_of_the_fixed_routing():
    """Class 0 takes 3/4 of every left-half capsule and 1/4 of every right-half one: the top capsules under
    it are left-half ones, each passing it 0.75."""
    model = _fixed_routing(_halves_model(), 0.75)
    trace = model.forward_routing(torch.zeros(1, 1, 16, 16))
    tree = part_whole_tree(trace, 0, [0], top=3, label_names=['zero', 'one'])
    assert tree.layer_names == ['primary', 'head.capsules'] and tree.classes == ['zero']
    assert tree.nodes[1] == [('zero', 0, pytest.approx(1.0))]
    assert len(tree.nodes[0]) == 3
    for label, owner, mass in tree.nodes[0]:
        row, col = (int(v) for v in label[1 : label.index(')')].split(','))
        assert col < 4 and 0 <= row < 8 and owner == 0 and mass == pytest.approx(0.75)
    assert [(l, child, parent) for l, child, parent, _ in tree.edges] == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]
    assert [flow for *_, flow in tree.edges] == pytest.approx([0.75] * 3)


def test_iteration_out_of_range_is_an_error():
    torch.manual_seed(0)
    model = CapsNet(**TINY, iterations=3).eval()
    trace = routing_trace(model, torch.randn(1, 1, 12, 12))
    torch.testing.assert_close(class_primary_mass(trace, [0], -3), class_primary_mass(trace, [0], 0))
    for bad in (3, -4):
        with pytest.raises(ValueError, match=f'iteration {bad} is out of range for a trace of 3 iterations'):
            class_primary_mass(trace, [0], bad)
    with pytest.raises(ValueError, match="iteration must be an int or 'used'"):
        class_primary_mass(trace, [0], 'last')


def test_the_analysis_leaves_the_model_as_it_was():
    """Nothing is remembered on the model: no attribute appears, and receptive fields are measured anew
    (a changed backbone gives other ones)."""
    torch.manual_seed(0)
    model = CapsNet(**TINY).train()

    def attributes():
        return {name: sorted(vars(module)) for name, module in model.named_modules()}

    before = attributes()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    boxes = primary_receptive_fields(model)
    trace = routing_trace(model, torch.randn(2, 1, 12, 12))
    class_heatmaps(trace, [0, 1], boxes, model.img_size)
    part_whole_tree(trace, 0, [0])
    masks = torch.zeros(2, 2, 12, 12)
    masks[:, 0, :, :6], masks[:, 1, :, 6:] = 1.0, 1.0
    part_whole_probe(model, torch.randn(2, 1, 12, 12), masks, torch.tensor([[0, 1], [1, 2]]))
    assert attributes() == before and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    # simple backbone: conv3x3 stride 2 padding 1, then the 1x1 primary conv: position y sees rows 2y-1..2y+1
    assert boxes[2, 3].tolist() == [3, 6, 5, 8] and boxes[0, 0].tolist() == [0, 2, 0, 2]
    with torch.no_grad():
        centre = model.backbone.conv.weight[:, :, 1, 1].clone()
        model.backbone.conv.weight.zero_()
        model.backbone.conv.weight[:, :, 1, 1] = centre  # now each position sees one pixel
    assert primary_receptive_fields(model)[2, 3].tolist() == [4, 5, 6, 7]


def test_tree_file_names_follow_the_images():
    assert tree_file_names(['cat.png', 'diverse_multimnist_test_7', 'a/b c.jpg', 'other/cat.png', 'cat.png']) == [
        'tree_cat.png',
        'tree_diverse_multimnist_test_7.png',
        'tree_b_c.png',
        'tree_cat_2.png',
        'tree_cat_3.png',
    ]


def test_dataset_comes_from_the_pretrained_cfg_or_the_option(tmp_path, capsys):
    """The dataset decides the scores (sigmoid for DiverseMultiMNIST) and whether its images apply; it is read
    from pretrained_cfg ('dataset' field, else the pretrained tag) or --dataset, never from the model name."""
    from PIL import Image
    from timm_capsules.data.constants import CIFAR10_LABELS

    assert model_dataset({'tag': 'cifar10'}) == 'cifar10'
    assert model_dataset({'dataset': 'diverse_multimnist', 'tag': 'cifar10'}) == 'diverse_multimnist'
    assert model_dataset({'tag': 'in1k', 'architecture': 'capsnet_matrix_multimnist'}) is None
    assert model_dataset(None) is None

    picture = tmp_path / 'noise.png'
    Image.fromarray((np.random.default_rng(0).random((36, 36)) * 255).astype(np.uint8)).save(picture)
    # a DiverseMultiMNIST architecture whose pretrained_cfg says CIFAR-10: the cfg wins over the name
    kwargs = dict(
        backbone_args=dict(out_chs=4),
        primary_caps=2,
        pose_dim=4,
        capsule_layers=[],
        pretrained_cfg_overlay=dict(tag='cifar10', label_names=None),
    )
    common = [
        '--model',
        'capsnet_matrix_multimnist',
        '--model-kwargs',
        json.dumps(kwargs),
        str(picture),
        '--tree-top',
        '2',
    ]
    summary = main(common + ['--out', str(tmp_path / 'from_cfg')])
    assert (summary['dataset'], summary['dataset_from'], summary['multi_label']) == ('cifar10', 'pretrained_cfg', False)
    item = summary['images'][0]
    logits = torch.tensor(item['logits'])
    assert list(item['scores']) == list(CIFAR10_LABELS)  # no label names in the cfg: the dataset's
    assert list(item['scores'].values()) == pytest.approx(logits.softmax(-1).tolist())
    assert item['predicted'] == [CIFAR10_LABELS[int(logits.argmax())]]
    with pytest.raises(SystemExit) as error:
        main(common + ['--probe', '2', '--out', str(tmp_path / 'refused')])
    assert error.value.code == 2
    assert '--dataset diverse_multimnist' in capsys.readouterr().err

    summary = main(common + ['--dataset', 'diverse_multimnist', '--out', str(tmp_path / 'by_option')])
    assert (summary['dataset'], summary['dataset_from'], summary['multi_label']) == (
        'diverse_multimnist',
        '--dataset',
        True,
    )
    item = summary['images'][0]
    assert list(item['scores']) == [str(d) for d in range(10)]
    assert list(item['scores'].values()) == pytest.approx(torch.tensor(item['logits']).sigmoid().tolist())
    assert len(item['predicted']) == 2


def test_command_line_runs_under_its_new_name(monkeypatch, capsys):
    import importlib.util
    import runpy

    assert importlib.util.find_spec('timm_capsules.inspect') is None  # no module shadows the standard library's
    monkeypatch.setattr(sys, 'argv', ['parse_tree', '--out', 'x'])
    with pytest.raises(SystemExit) as error:
        runpy.run_module('timm_capsules.parse_tree', run_name='__main__')
    assert error.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        'python -m timm_capsules.parse_tree: error: give --model NAME or --checkpoint DIR'
    )


def test_missing_inputs_stop_with_one_line_and_untrained_weights_say_so(tmp_path, capsys):
    """A checkpoint folder, an image or a model name that is not there: one line, no traceback. A model built
    by name without --pretrained has random weights, and its scores say so."""
    from PIL import Image

    picture = tmp_path / 'noise.png'
    Image.fromarray((np.random.default_rng(0).random((36, 36)) * 255).astype(np.uint8)).save(picture)
    for argv, message in (
        (
            ['--checkpoint', str(tmp_path / 'runs' / 'c10'), str(picture)],
            f'--checkpoint {tmp_path / "runs" / "c10"}: no trained model there',
        ),
        (
            ['--model', 'capsnet_resnet_cifar10', str(tmp_path / 'cat.png')],
            f'no such image file: {tmp_path / "cat.png"}',
        ),
        (
            ['--model', 'capsnet_resnet_cifar1', str(picture)],
            "unknown model 'capsnet_resnet_cifar1'; closest registered names: capsnet_resnet_cifar10",
        ),
    ):
        with pytest.raises(SystemExit) as error:
            main(argv + ['--out', str(tmp_path / 'out')])
        assert isinstance(error.value.code, str) and '\n' not in error.value.code, argv
        assert error.value.code.startswith(f'{PROG}: error: {message}'), error.value.code
    assert not (tmp_path / 'out').exists()
    kwargs = dict(backbone_args=dict(out_chs=4), primary_caps=2, pose_dim=4, capsule_layers=[])
    summary = main(
        [
            '--model',
            'capsnet_matrix_multimnist',
            '--model-kwargs',
            json.dumps(kwargs),
            str(picture),
            '--tree-top',
            '2',
            '--out',
            str(tmp_path / 'untrained'),
        ]
    )
    assert summary['weights'] == 'untrained (random initialisation)'
    printed = capsys.readouterr().out
    assert re.search(r'noise\.png \(tree_noise\.png\): .* \(untrained model: random weights\) \| ', printed)


def test_samples_are_the_split_images_with_their_digit_masks():
    """The probe's images are the DiverseMultiMNIST test split's own (make_split), and overlaying the two digit
    masks as the split does (sum clipped at 255) gives each image back."""
    from timm_capsules.data import make_split

    images, masks, labels, ids, source = diverse_multimnist_samples(6, source='sample', two_digit_only=True)
    split = make_split('test', max(ids) + 1, source='sample')
    assert source == 'sample' and ids == np.flatnonzero(split.num_digits == 2)[:6].tolist()
    np.testing.assert_array_equal(images, split.images[ids])
    np.testing.assert_array_equal(labels, split.classes[ids])
    assert (labels >= 0).all() and masks.shape == (6, 2, 36, 36)
    overlay = np.minimum(np.rint(255 * (masks[:, 0] + masks[:, 1])), 255)
    np.testing.assert_array_equal(overlay, images)
    assert (masks.reshape(6, 2, -1).max(-1) > 0.5).all()  # each digit has its own pixels
    every = diverse_multimnist_samples(6, source='sample')
    assert every[3] == list(range(6)) and (every[2][:, 1] == -1).sum() == (split.num_digits[:6] == 1).sum()
