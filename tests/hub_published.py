"""Test helper for the Hub tests (test_loading.py, test_hub_release.py, test_hub_cards.py): a briefly trained model
pushed with --dry-run and placed in a hand-made Hugging Face cache (the fixtures ``simple``, ``resnet`` and
``offline``, which tests/conftest.py makes available), and the hub configs' tags."""

import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hub_cache import offline_hub_cache
from timm.models import save_for_hf

import timm_capsules  # noqa: F401
from timm_capsules import hub

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / 'hub_configs'
TAGS = sorted(p.stem for p in CONFIG_DIR.glob('*.json'))
OUR_TAGS = sorted(
    name
    for name in timm.list_models(module='capsnet', pretrained=True)
    if timm.models.get_pretrained_cfg(name).hf_hub_id
)


def _train_few_steps(name: str, steps: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    channels, height, width = model.pretrained_cfg['input_size']
    model.train()
    for _ in range(steps):
        x = torch.randn(2, channels, height, width)
        y = torch.randint(0, model.num_classes, (2,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(before['head.fc.weight'], model.state_dict()['head.fc.weight'])  # it did train
    return model.eval()


class Published:
    """A trained model, its checkpoint folder, its dry-run upload folder and a Hub cache holding it."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.tag = timm.models.get_pretrained_cfg(name).tag
        self.full_tag = f'{name}.{self.tag}'
        self.repo_id = f'timm-capsules/{self.full_tag}'
        self.model = _train_few_steps(name)
        self.checkpoint = root / 'checkpoint'
        save_for_hf(self.model, self.checkpoint, safe_serialization=True)
        self.dry_run = hub.push_checkpoint(self.checkpoint, self.repo_id, dry_run=root / 'upload')
        self.cache = root / 'hub_cache'
        self.snapshot = hub.install_in_cache(self.dry_run, self.repo_id, self.cache)
        channels, height, width = self.model.pretrained_cfg['input_size']
        self.x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.logits = self.model(self.x)
            self.features = self.model.forward_features(self.x)


@pytest.fixture(scope='module')
def simple(tmp_path_factory) -> Published:
    return Published(tmp_path_factory.mktemp('simple'), 'capsnet_simple_cifar10')


@pytest.fixture(scope='module')
def resnet(tmp_path_factory) -> Published:
    return Published(tmp_path_factory.mktemp('resnet'), 'capsnet_resnet_cifar10')


@pytest.fixture
def offline(simple):
    with offline_hub_cache(simple.cache):
        yield simple


def copy_repo(published: Published, folder: Path) -> Path:
    shutil.copytree(published.dry_run, folder)
    return folder
