"""What tests/test_hub_values.py and tests/test_hub_cli_values.py share: one small untrained checkpoint saved
the way timm saves for the Hub, a stand-in for ``HfApi`` that records its calls, and a copy of a hub config."""

import shutil
from pathlib import Path

import huggingface_hub
import timm
import torch
from timm.models import save_for_hf

ROOT = Path(__file__).resolve().parents[1]
NAME, TAG = 'capsnet_simple_cifar10', 'capsnet_simple_cifar10.cifar10'
REPO = f'timm-capsules/{TAG}'
UPLOAD = "['README.md', 'config.json', 'model.safetensors']"


def make_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(NAME).eval()
    folder = tmp_path_factory.mktemp('hub_values') / 'checkpoint'
    save_for_hf(model, folder, safe_serialization=True)
    return folder, model


class FakeApi:
    """HfApi without the network: records what it is asked."""

    calls = []
    oid = 'a' * 40
    url = 'https://example/commit'

    def __init__(self, **kwargs):
        FakeApi.calls.append(('init', kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(('create_repo', repo_id, kwargs))
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs['folder_path']).iterdir())
        FakeApi.calls.append(('upload_folder', dict(kwargs, folder_path=files)))
        attributes = {'__str__': lambda self: 'a commit'}
        if FakeApi.url:
            attributes['commit_url'] = FakeApi.url
        if FakeApi.oid:
            attributes['oid'] = FakeApi.oid
        return type('Commit', (), attributes)()


def install_fake_api(monkeypatch):
    FakeApi.calls, FakeApi.oid, FakeApi.url = [], 'a' * 40, 'https://example/commit'
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    return FakeApi


def config_copy(tmp_path):
    path = tmp_path / f'{TAG}.json'
    shutil.copy(ROOT / 'hub_configs' / path.name, path)
    return path
