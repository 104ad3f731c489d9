"""``timm_capsules/memory_budget.py`` by value: the budget read from the environment, and the bytes of the
parameters and of one forward pass of hand-made modules on the meta device. Written for the survivors of a mutmut
run (tests/README.md)."""

import pytest
import torch

from timm_capsules import memory_budget
from timm_capsules.memory_budget import MEMORY_LIMIT_ENV, estimate_memory, memory_limit_bytes


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    assert MEMORY_LIMIT_ENV == 'TIMM_CAPSULES_MEMORY_LIMIT_GB' and memory_budget.DEFAULT_MEMORY_LIMIT_GB == 8.0
    assert memory_limit_bytes() == 8 * 2**30
    for text, expected in [('2', 2 * 2**30), ('0.5', 2**29), (' 1e-9 ', 1)]:
        monkeypatch.setenv(MEMORY_LIMIT_ENV, text)
        assert memory_limit_bytes() == expected, text
    for text in ['lots', '0', '-1', 'nan', 'inf', '']:
        monkeypatch.setenv(MEMORY_LIMIT_ENV, text)
        with pytest.raises(ValueError) as info:
            memory_limit_bytes()
        assert str(info.value) == f'TIMM_CAPSULES_MEMORY_LIMIT_GB={text!r}: expected a positive number of GiB'


class Probe(torch.nn.Module):
    """A linear layer and a buffer; forward makes two tensors of known size and records its input's shape."""

    def __init__(self, features=4, **attributes):
        super().__init__()
        self.linear = torch.nn.Linear(features, 2, dtype=torch.float64)  # 8 bytes an entry
        self.register_buffer('steps', torch.zeros(3, dtype=torch.int32))
        self.__dict__.update(attributes)
        self.seen = []

    def forward(self, x):
        self.seen.append((tuple(x.shape), x.device.type, torch.is_grad_enabled(), self.training))
        halves = x.double().chunk(2, dim=-1)  # a tuple of tensors: each counts
        return halves[0].sum() + halves[1].sum()


PROBE_WEIGHTS = (4 * 2 + 2) * 8 + 3 * 4


def test_parameters_buffers_and_one_forward_pass_are_counted(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    made = []

    def build():
        made.append(Probe(in_chans=2, img_size=(3, 5)))
        return made[-1]

    weights, activations = estimate_memory(build)
    assert weights == PROBE_WEIGHTS
    assert made[0].seen == [((1, 2, 3, 5), 'meta', False, False)]
    assert made[0].linear.weight.device.type == 'meta'
    # the float32 input (30 entries), its double() copy, the two chunks (views count too: 18 + 12 entries), two
    # sums and one add
    assert activations == 30 * 4 + 30 * 8 + 30 * 8 + 3 * 8


def test_the_input_comes_from_the_model_then_from_input_size(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    for attributes, input_size, shape in [
        (dict(img_size=7), (1, 2, 3), (1, 1, 7, 7)),
        (dict(in_chans=5, img_size=None), (1, 2, 3), (1, 5, 2, 3)),
        ({}, (2, 4, 6), (1, 2, 4, 6)),
        ({}, None, (1, 3, 224, 224)),
    ]:
        probe = Probe(**attributes)
        estimate_memory(lambda: probe, input_size)
        assert probe.seen[0][0] == shape, attributes


def test_over_budget_or_not_on_meta_there_are_no_activations(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(PROBE_WEIGHTS / 2**30))
    probe = Probe()
    assert estimate_memory(lambda: probe, (1, 2, 2)) == (
        PROBE_WEIGHTS,
        4 * 4 + 4 * 8 + 4 * 8 + 3 * 8,
    )  # exactly the budget: run
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str((PROBE_WEIGHTS - 1) / 2**30))
    probe = Probe()
    assert estimate_memory(lambda: probe, (1, 2, 2)) == (PROBE_WEIGHTS, None)
    assert probe.seen == []  # not run

    class NoMetaKernel(Probe):
        def forward(self, x):
            return x.cpu().numpy()

    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    assert estimate_memory(NoMetaKernel, (1, 2, 2)) == (PROBE_WEIGHTS, None)
