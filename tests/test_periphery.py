"""The periphery by value, on hand-made inputs: the EM class capsules' coordinate addition for one child, the
part-whole probe's `separated` and the normalised routing entropy, the model card's usage snippet run for a
1-channel and a 3-channel model, and timm_capsules.experiments' choice of records for its tables and the hub configs."""

import dataclasses
import json
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_capsules import em_capsnet, hub, hub_cards
from timm_capsules.capsnet import CapsNet
from timm_capsules.experiments import plans, report
from timm_capsules.experiments import records as run_records
from timm_capsules.layers import Capsules
from timm_capsules.parse_tree import analysis, part_whole_probe

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- EM coordinate addition
def test_em_class_vote_of_one_child_adds_its_cell_centre_by_hand(monkeypatch):
    """A 2 x 3 grid of 2 child types with one child active at a time, so every class pose is that child's vote: its
    pose times its type's weight, plus the centre of its cell scaled to [0, 1] in the first two entries of the
    right-hand column; for the child of type 0 at row 0, column 2: (0 + 0.5) / 2 = 0.25 and (2 + 0.5) / 3."""
    torch.manual_seed(0)
    H, W, N, J = 2, 3, 2, 3
    layer = em_capsnet.EMClassCapsules(N, J, (H, W), pose_dim=16).double()
    poses = torch.randn(1, H, W, N, 16, dtype=torch.float64)
    routed = []
    real = em_capsnet.em_routing_from_poses
    monkeypatch.setattr(em_capsnet, 'em_routing_from_poses', lambda *a: routed.append(real(*a)) or routed[-1])
    for h, w, n, row, col in [(0, 2, 0, 0.25, 2.5 / 3)] + [
        (h, w, n, (h + 0.5) / H, (w + 0.5) / W) for h in range(H) for w in range(W) for n in range(N)
    ]:
        activations = torch.zeros(1, H, W, N, dtype=torch.float64)
        activations[0, h, w, n] = 1.0
        layer(Capsules(poses, activations))
        class_poses = routed[-1][0].reshape(J, 4, 4)
        vote = poses[0, h, w, n].reshape(4, 4) @ layer.weight[n].detach()  # (J, 4, 4), one per class
        vote[:, 0, 3] += row
        vote[:, 1, 3] += col
        # EM's eps guards scale the mean by up to 1 - 2e-4 here; a misplaced offset moves entries by 1 / 6 or more
        torch.testing.assert_close(class_poses, vote, rtol=1e-3, atol=1e-6, msg=f'child {(h, w, n)}')


# ---------------------------------------------------------------------------------------- the part-whole probe
def _thirds_model():
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


def _route(model, left, right):
    """The class routing fixed: every primary capsule in the left half of the grid sends ``left`` (one share per
    class), every one in the right half ``right``; the rest of the trace is the model's own."""
    real = model.forward_routing

    def forward_routing(x):
        half = (torch.arange(8) < 4).view(1, 8, 1).expand(8, 8, 1)  # (h, w, 1): the left half
        r = torch.where(half, torch.tensor(left), torch.tensor(right))  # (h, w, classes)
        r = r.expand(2, 8, 8, 3).reshape(1, 1, 1, 128, 3).expand(x.shape[0], -1, -1, -1, -1)  # children (n, h, w)
        trace = real(x)
        return dataclasses.replace(trace, coefficients=[[torch.full_like(r, 1 / 3)], [r]])

    model.forward_routing = forward_routing
    return model


def test_separated_needs_both_digits_over_half():
    """Digit 0 fills the left half, digit 1 the right. Left children route (0.5, 0.1, 0.4) to the classes, right
    ones (0.1, 0.5, 0.4). Own fractions by hand: class 0 from the left 0.5 / 0.6, class 1 from the right 0.5 / 0.6,
    class 2 0.4 / 0.8 from either. Image 0 (classes 0, 1): both over a half, separated; image 1 (classes 0, 2):
    only one, not separated."""
    model = _route(_thirds_model(), [0.5, 0.1, 0.4], [0.1, 0.5, 0.4])
    masks = torch.zeros(2, 2, 16, 16)
    masks[:, 0, :, :8] = 1.0
    masks[:, 1, :, 8:] = 1.0
    result = part_whole_probe(model, torch.rand(2, 1, 16, 16), masks, torch.tensor([[0, 1], [0, 2]]))
    np.testing.assert_allclose(result['per_image'], [[5 / 6, 5 / 6], [5 / 6, 0.5]], rtol=1e-6)
    assert result['own_fraction'] == pytest.approx((5 / 6 * 3 + 0.5) / 4)
    assert result['separated'] == pytest.approx(0.5)
    assert result['baseline'] == pytest.approx(0.5)  # the uniform first pass favours neither digit


def test_entropy_table_is_normalised_entropy_on_hand_made_coefficients():
    """Per image and iteration, the mean over children of -sum r log r / log(parents): 1 for the uniform pass,
    0 for one-hot routing, and for (0.5, 0.25, 0.25) over three parents 1.5 log 2 / log 3."""
    uniform = torch.full((2, 1, 1, 4, 3), 1 / 3)
    one_hot = torch.eye(3)[torch.tensor([0, 2, 1, 0])].expand(2, 1, 1, 4, 3)
    mixed = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]).repeat(2, 1)  # (4 children, 3)
    half = torch.stack([mixed, torch.eye(3)[[0, 1, 2, 0]]]).reshape(2, 1, 1, 4, 3)  # image 1: one-hot
    trace = types.SimpleNamespace(logits=torch.zeros(2, 3), coefficients=[[uniform, uniform], [one_hot, half]])
    table = analysis.entropy_table(trace)
    assert table.shape == (2, 2, 2)  # images, iterations, routing layers
    h = 1.5 * math.log(2) / math.log(3)
    np.testing.assert_allclose(table, [[[1, 1], [0, h]], [[1, 1], [0, 0]]], atol=1e-6)


def test_entropy_of_a_real_models_uniform_first_pass_is_one():
    model = _thirds_model()
    with torch.no_grad():
        table = analysis.entropy_table(model.forward_routing(torch.rand(3, 1, 16, 16)))
    np.testing.assert_allclose(table[:, 0], 1.0, atol=1e-6)
    assert (table[:, 1] < 1).all()


# ------------------------------------------------------------------------------------------ the model card
def card_code(cfg):
    """The card's Python snippets, in order, to run as one script."""
    text = hub_cards.model_card(cfg, published=False)
    return '\n'.join(re.findall(r'```python\n(.*?)```', text, flags=re.S))


@pytest.mark.parametrize(
    'tag, channels', [('capsnet_vector_multimnist.diverse_multimnist', 1), ('capsnet_simple_cifar10.cifar10', 3)]
)
def test_model_card_snippet_runs_for_the_models_channels(tag, channels, tmp_path, monkeypatch):
    """The snippet, run as written on an image of the other kind (an RGB photo for the 1-channel model, a grey one
    for the 3-channel model), with the weights it would download replaced by a random initialisation."""
    cfg = hub.load_hub_config(tag)
    assert cfg['architecture']['input_size'][0] == channels
    code = card_code(cfg)
    assert code.count('pretrained=True') >= 3
    shape = (50, 60, 3) if channels == 1 else (50, 60)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / 'image.png')
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code.replace('pretrained=True', 'pretrained=False'), f'<card of {tag}>', 'exec'), scope)
    assert scope['logits'].shape == (1, cfg['dataset']['num_classes'])
    assert scope['x'].shape[1] == channels and scope['embedding'].shape[0] == 1
    if 'trace' in scope:
        torch.testing.assert_close(scope['trace'].logits, scope['model'](scope['x']))


def test_card_numbers_and_family_by_hand():
    """What a card prints for a result (two decimals, a dash for none) and the family line it names the model by."""
    assert (hub_cards.fmt(None), hub_cards.fmt(93.456), hub_cards.fmt(7)) == ('—', '93.46', '7.00')
    assert hub_cards.mean_std({'mean': None, 'std': 0.5}) == '—'
    assert hub_cards.mean_std({'mean': 94.851, 'std': None}) == '94.85'
    assert hub_cards.mean_std({'mean': 94.851, 'std': 0.2249}) == '94.85 ± 0.22'
    # the first sentence of the class's docstring, before any colon, without its full stop
    assert (
        hub_cards._family('em_capsnet_simple_cifar10')
        == 'Capsule network with 4x4 matrix poses, activations and EM routing (Hinton et al., 2018)'
    )
    assert hub_cards._family('resnet18_cifar10')  # names even a model class of timm's own


# ------------------------------------------------------------------------ timm_capsules.experiments: the records
ABLATION_KWARGS = {'A': {'layer_norm': False}, 'B': {'routing': 'sequential'}, 'C': {'activations': True}}


def paper_records(folder, seeds=range(3)):
    """A record for every paper-scale run, written where the runner writes it, with the model arguments the
    script records for its command line and a metric that names the run."""
    records = []
    for k, run in enumerate(plans.plan('paper', plans.STUDIES, seeds)):
        kwargs = {'num_classes': 100 if 'cifar100' in run.dataset else 10}
        if '--iterations' in run.train_args:
            kwargs['iterations'] = int(run.train_args[run.train_args.index('--iterations') + 1])
        variant = run.row.get('variant', '')
        if variant[:2] in ('A:', 'B:', 'C:'):
            kwargs.update(ABLATION_KWARGS[variant[0]])
        metric = 'exact_match' if run.dataset == 'diverse_multimnist' else 'top1'
        record = dict(
            run_id=run.run_id,
            studies=list(run.studies),
            row=run.row,
            model=run.row['model'],
            model_kwargs=kwargs,
            dataset=run.dataset,
            seed=run.seed,
            metric=metric,
            metrics={metric: round(0.001 * (k + 1), 6)},
            num_parameters=1000 + k,
            machine='a test',
            wall_time_s=1.0,
        )  # what a sound record holds (run_records.read_record)
        path = run_records.record_path(folder, 'paper', run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        records.append(record)
    return records


def test_each_table_takes_the_records_of_its_rows(tmp_path):
    records = paper_records(tmp_path)
    (tmp_path / 'paper' / 'cifar10-IDA-t2-00000000-seed0.json').write_text(json.dumps(records[0]))  # not planned
    runs = plans.plan('paper', plans.STUDIES, range(3))
    loaded = run_records.load_records(tmp_path, 'paper', runs)
    assert len(loaded) == len(records) == len(runs)  # the unplanned record is left out
    for study in plans.STUDIES:
        expected = {}
        for record in records:  # from the records' own fields, not from the plan
            if study in record['studies']:
                expected.setdefault(json.dumps(record['row'], sort_keys=True), []).append(record['seed'])
        got = {
            json.dumps(row, sort_keys=True): sorted(r['seed'] for r in found)
            for row, found in run_records.rows_of(study, runs, loaded)
        }
        assert got == expected and all(seeds == [0, 1, 2] for seeds in got.values()), study
    iterations = [row for row, _ in run_records.rows_of('iterations', runs, loaded)]
    assert sorted((row['kind'], row['iterations']) for row in iterations) == [
        (kind, t) for kind in ('DR', 'EM', 'IDA') for t in range(1, 6)
    ]  # the CIFAR-10 ResNet sweep, Fig. 3
    assert {row['model'] for row in iterations} == {
        'capsnet_resnet_cifar10',
        'dynamic_capsnet_resnet_cifar10',
        'em_capsnet_resnet_cifar10',
    }
    table1 = [row for row, _ in run_records.rows_of('table1', runs, loaded)]
    assert all(row.get('iterations', 0) == {'IDA': 2, 'DR': 3, 'EM': 3}.get(row['kind'], 0) for row in table1)


def test_hub_configs_get_the_runs_of_their_model_as_registered(tmp_path, monkeypatch):
    """Per hub config: the runs of its model on its dataset at its routing iterations, no ablation, by seed."""
    records = paper_records(tmp_path)
    written = {}
    monkeypatch.setattr(hub, 'record_results', lambda tag, values: written.setdefault(tag, values))
    tags = report.record_hub_results(tmp_path, 'paper')
    expected = {}
    for cfg in hub.list_hub_configs():
        dataset = cfg['tag'].partition('.')[2]  # 'capsnet_resnet_cifar10.cifar10' -> cifar10
        t = cfg['architecture']['routing_iterations']
        chosen = sorted(
            (
                r
                for r in records
                if r['model'] == cfg['model']
                and r['dataset'] == dataset
                and r['row'].get('iterations', t) == t
                and r['row'].get('variant', '')[:2] not in ('A:', 'B:', 'C:')
            ),
            key=lambda r: r['seed'],
        )
        if chosen:
            expected[cfg['tag']] = [100 * r['metrics'][r['metric']] for r in chosen]
    assert set(expected) == {cfg['tag'] for cfg in hub.list_hub_configs()}  # every config has its runs
    assert written.keys() == expected.keys() and sorted(tags) == sorted(expected)
    for tag in expected:
        assert written[tag] == pytest.approx(expected[tag]), tag
    assert all(len(values) == 3 for values in written.values())  # one per seed: t = 1, 3, 4, 5 and ablations out
