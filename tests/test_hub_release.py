"""Releasing (``timm_capsules/hub.py``): the dry-run folder that is exactly what is published, what push and
check refuse (pickles, another model, NaN or infinity), a real push with HfApi replaced (no network), the
command line (``python -m timm_capsules.hub``) and the other model families."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hub_cache import offline_hub_cache
from hub_published import CONFIG_DIR, Published, copy_repo
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

import timm_capsules  # noqa: F401
from timm_capsules import hub, hub_cards
from timm_capsules.loading import ConfigError, WeightsError

# ---- the dry-run folder ------------------------------------------------------------------------------


def test_dry_run_folder_is_exactly_what_is_published(simple):
    names = sorted(p.name for p in simple.dry_run.iterdir())
    assert names == ['README.md', 'config.json', 'model.safetensors']  # no pickle anywhere
    weights = load_file(simple.dry_run / 'model.safetensors')
    original = simple.model.state_dict()
    assert weights.keys() == original.keys()
    assert all(torch.equal(weights[k], original[k]) for k in original)
    config = json.loads((simple.dry_run / 'config.json').read_text())
    assert config['architecture'] == simple.name and config['num_classes'] == 10
    assert config['pretrained_cfg']['classifier'] == ['head.capsules', 'head.fc']
    card = hub_cards.validate_card((simple.dry_run / 'README.md').read_text(), hub.load_hub_config(simple.full_tag))
    assert card.data.library_name == 'timm' and 'not yet published' not in card.text


def test_cache_layout(simple):
    repo = simple.cache / 'models--timm-capsules--capsnet_simple_cifar10.cifar10'
    commit = (repo / 'refs' / 'main').read_text()
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert sorted(p.name for p in (repo / 'snapshots' / commit).iterdir()) == [
        'README.md',
        'config.json',
        'model.safetensors',
    ]


def test_dry_run_refuses_a_non_empty_folder(simple, tmp_path):
    (tmp_path / 'stale.bin').write_bytes(b'x')
    with pytest.raises(FileExistsError, match=f'{tmp_path} is not empty'):
        hub.push_checkpoint(simple.checkpoint, dry_run=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['stale.bin']  # nothing written next to it


def test_pickle_checkpoints_are_not_published(simple, tmp_path):
    folder = tmp_path / 'pickled'
    save_for_hf(simple.model, folder, safe_serialization=False)  # pytorch_model.bin only
    with pytest.raises(WeightsError, match='pickle'):
        hub.check_checkpoint(folder)
    with pytest.raises(WeightsError, match='pickle'):
        hub.push_checkpoint(folder, dry_run=tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_push_rejects_a_checkpoint_that_is_not_the_carded_model(simple, tmp_path):
    model = timm.create_model(simple.name, iterations=3)  # same parameters, different routing
    save_for_hf(model, tmp_path / 'ckpt', safe_serialization=True)
    with pytest.raises(ConfigError, match='routing iterations'):
        hub.push_checkpoint(tmp_path / 'ckpt', dry_run=tmp_path / 'out')


def _with_non_finite(published: Published, folder: Path) -> Path:
    repo = copy_repo(published, folder)
    weights = load_file(repo / 'model.safetensors')
    weights['primary.norm.bias'][3] = float('nan')
    weights['capsule_layers.1.weight'][0, 0, 0] = float('-inf')
    (repo / 'model.safetensors').unlink()
    save_file(weights, repo / 'model.safetensors')
    return repo


def test_check_and_push_reject_non_finite_weights(simple, tmp_path, capsys):
    repo = _with_non_finite(simple, tmp_path / 'diverged')
    assert hub.main(['check', '--checkpoint', str(repo)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f'error: {repo / "model.safetensors"}: 2 tensor(s) hold NaN or infinity (a diverged run?): '
        f'capsule_layers.1.weight, primary.norm.bias\n'
    )
    out = tmp_path / 'upload'
    with pytest.raises(
        WeightsError, match=r'2 tensor\(s\) hold NaN or infinity .*: capsule_layers.1.weight, primary.norm.bias'
    ):
        hub.push_checkpoint(repo, config=simple.full_tag, dry_run=out)
    assert not out.exists()  # nothing staged


def test_cli_never_ends_in_a_traceback(simple, tmp_path, capsys):
    """Model arguments of the right type that the constructor still refuses, or any other failure: one error
    line, exit 2."""
    missing = tmp_path / 'no_such_folder'
    assert hub.main(['cache', '--folder', str(missing), '--repo-id', 'a/b', '--cache-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {missing}: FileNotFoundError: ') and err.count('\n') == 1
    repo = copy_repo(simple, tmp_path / 'repo')
    config = json.loads((repo / 'config.json').read_text())
    config['model_args']['pose_dim'] = 15  # matrix poses need a square pose dimension
    (repo / 'config.json').write_text(json.dumps(config))
    assert hub.main(['check', '--checkpoint', str(repo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {repo / "config.json"}: its model_args do not build capsnet_simple_cifar10: ')
    assert err.count('\n') == 1 and 'Traceback' not in err


# ---- real push (HfApi replaced: no network) ----------------------------------------------------------


def test_push_uploads_the_dry_run_folder_and_marks_the_tag_published(simple, tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
            uploaded.update(repo_id=repo_id, files={p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
            return type('Commit', (), {'oid': 'a' * 40, 'commit_url': 'https://example/commit'})()

    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    config = tmp_path / f'{simple.full_tag}.json'
    shutil.copy(CONFIG_DIR / config.name, config)
    hub.main(['push', '--config', str(config), '--checkpoint', str(simple.checkpoint)])
    assert uploaded['repo_id'] == simple.repo_id
    assert uploaded['files'] == {p.name: p.read_bytes() for p in simple.dry_run.iterdir()}
    written = json.loads(config.read_text())
    assert written['status'] == hub.PUBLISHED and written['hub_commit'] == 'a' * 40
    assert json.loads((CONFIG_DIR / config.name).read_text())['status'] == hub.NOT_PUBLISHED  # untouched


# ---- command line: python -m timm_capsules.hub ----------------------------------------------------------


def _cells(table: str, tag: str) -> list:
    row = next(line for line in table.splitlines() if line.startswith(f'| `{tag}` |'))
    return [cell.strip() for cell in row.strip('|').split('|')]


def test_cli_record_reaches_config_card_and_readme_table(tmp_path, monkeypatch, capsys):
    configs = tmp_path / 'hub_configs'
    shutil.copytree(CONFIG_DIR, configs)
    monkeypatch.setenv(hub.CONFIG_DIR_ENV, str(configs))
    config = configs / 'capsnet_resnet_cifar10.cifar10.json'
    # mean 93.5567 rounds up to 93.56, sample std 0.4600 (the population std would be 0.38)
    assert (
        hub.main(['record', '--config', str(config), '--top1', '93.10', '93.55', '94.02', '--checkpoint-top1', '93.55'])
        == 0
    )
    results = json.loads(config.read_text())['results']
    expected = dict(per_seed=[93.10, 93.55, 94.02], num_seeds=3, mean=93.56, std=0.46, best=94.02, checkpoint=93.55)
    assert {key: results[key] for key in expected} == expected
    assert json.loads(capsys.readouterr().out) == results  # it prints what it wrote

    card_path = tmp_path / 'card.md'
    assert hub.main(['card', '--config', str(config), '--published', '--output', str(card_path)]) == 0
    card = ModelCard(card_path.read_text())
    assert card.data.eval_results[0].metric_value == 93.55  # the uploaded weights' accuracy, not the best seed
    assert '| 93.56 ± 0.46 | 94.02 | 3 | 93.55 |' in card.text

    readme = tmp_path / 'README.md'
    readme.write_text(f'# intro\n\n{hub.TABLE_BEGIN}\n| stale |\n{hub.TABLE_END}\n\nafter\n')
    assert hub.main(['table', '--check', str(readme)]) == 1
    assert capsys.readouterr().out == 'model table is out of date\n'
    assert '| stale |' in readme.read_text()  # --check never writes
    assert hub.main(['table', '--write', str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f'# intro\n\n{hub.TABLE_BEGIN}\n| tag |') and text.endswith(f'{hub.TABLE_END}\n\nafter\n')
    assert _cells(text, 'capsnet_resnet_cifar10.cifar10') == [
        '`capsnet_resnet_cifar10.cifar10`',
        'CIFAR-10',
        '1,828,817',
        '2',
        'not yet published',
        'top-1 accuracy (%)',
        '93.56 ± 0.46 (94.02), 3',
        '94.85 (95.14)',
        '`--preset cifar10_resnet`',
    ]
    assert _cells(text, 'capsnet_simple_cifar10.cifar10')[6] == '—'  # nothing recorded there
    capsys.readouterr()
    assert hub.main(['table', '--check', str(readme)]) == 0
    assert hub.main(['table']) == 0
    printed = capsys.readouterr().out
    assert printed.endswith(f'{hub.TABLE_END}\n') and printed.split(hub.TABLE_BEGIN)[1] in text


def test_cli_check_says_ok_or_names_the_bad_tensor(simple, tmp_path, capsys):
    assert hub.main(['check', '--checkpoint', str(simple.checkpoint)]) == 0
    assert capsys.readouterr().out == f'{simple.checkpoint}: OK (capsnet_simple_cifar10, 561,297 params)\n'
    bad = copy_repo(simple, tmp_path / 'bad')
    weights = load_file(bad / 'model.safetensors')
    weights['backbone.conv.weight'] = weights['backbone.conv.weight'][:128].contiguous()
    del weights['primary.norm.bias']
    (bad / 'model.safetensors').unlink()
    save_file(weights, bad / 'model.safetensors')
    result = subprocess.run(
        [sys.executable, '-m', 'timm_capsules.hub', 'check', '--checkpoint', str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE='1'),
    )
    assert result.returncode == 2 and result.stdout == '' and 'Traceback' not in result.stderr, result.stderr
    assert result.stderr.startswith('error: ') and str(bad) in result.stderr
    assert (
        'shape mismatches (1):\n    backbone.conv.weight: checkpoint (128, 3, 3, 3), model (256, 3, 3, 3)'
        in result.stderr
    )
    assert 'missing from the checkpoint (1):\n    primary.norm.bias' in result.stderr


def test_cli_cache_makes_a_folder_loadable_offline(simple, tmp_path, capsys):
    cache = tmp_path / 'cache'
    assert (
        hub.main(
            ['cache', '--folder', str(simple.dry_run), '--repo-id', 'someone/my-capsnet', '--cache-dir', str(cache)]
        )
        == 0
    )
    snapshot = Path(capsys.readouterr().out.strip())
    repo = cache / 'models--someone--my-capsnet'
    assert snapshot.parent == repo / 'snapshots' and (repo / 'refs' / 'main').read_text() == snapshot.name
    for name in ('README.md', 'config.json', 'model.safetensors'):
        assert (snapshot / name).read_bytes() == (simple.dry_run / name).read_bytes()
    with offline_hub_cache(cache):  # HF_HUB_OFFLINE=1: only the cache can answer
        model = timm.create_model('hf-hub:someone/my-capsnet', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(simple.x), simple.logits)


# ---- other families: the tooling is not CapsNet-only -------------------------------------------------


def _family_hub_config(name: str, model: torch.nn.Module) -> dict:
    tag = timm.models.get_pretrained_cfg(name).tag
    base = hub.load_hub_config('capsnet_simple_cifar10.cifar10')
    return dict(
        base,
        tag=f'{name}.{tag}',
        model=name,
        repo_id=f'timm-capsules/{name}.{tag}',
        architecture=dict(
            params=sum(p.numel() for p in model.parameters()),
            input_size=[3, 32, 32],
            routing_iterations=getattr(model, 'iterations', None),
        ),
        training={'preset': 'cifar10_em_simple' if name.startswith('em_') else 'cifar10_cnn'},
    )


@pytest.mark.parametrize('name', ['em_capsnet_simple_cifar10', 'cnn_baseline_cifar10'])
def test_other_families_are_carded_pushed_and_loaded(name, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    cfg = _family_hub_config(name, model)
    configs = tmp_path / 'hub_configs'
    configs.mkdir()
    (configs / f'{cfg["tag"]}.json').write_text(json.dumps(cfg))
    monkeypatch.setenv(hub.CONFIG_DIR_ENV, str(configs))
    save_for_hf(model, tmp_path / 'checkpoint', safe_serialization=True)
    upload = hub.push_checkpoint(tmp_path / 'checkpoint', dry_run=tmp_path / 'upload')
    card = ModelCard((upload / 'README.md').read_text())
    assert card.text.lstrip().startswith(f'# Model card for {cfg["tag"]}') and ('forward_routing' in card.text) is False
    assert f'--preset {cfg["training"]["preset"]} --output_dir' in card.text
    row = hub.render_model_table().splitlines()[2]
    iterations = '—' if cfg['architecture']['routing_iterations'] is None else '3'
    assert row.startswith(f'| `{cfg["tag"]}` | CIFAR-10 | {cfg["architecture"]["params"]:,} | {iterations} |')
    hub.install_in_cache(upload, cfg['repo_id'], tmp_path / 'cache')
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with offline_hub_cache(tmp_path / 'cache'), torch.no_grad():
        assert torch.equal(timm.create_model(name, pretrained=True).eval()(x), model(x))
