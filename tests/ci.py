"""What a test does when something it needs is missing: skip on a developer's machine, fail in CI.

``.ci/run`` installs everything the suite needs (timm's test suite, Debian's Fashion-MNIST, a C++
compiler for the routing kernel) and sets ``TIMM_CAPSULES_CI=1``, so a missing piece there is a broken
CI, never a silently smaller suite.
"""

import os

import pytest

IN_CI = os.environ.get('TIMM_CAPSULES_CI') == '1'


def unavailable(reason: str):
    """Skip the calling test with ``reason``, or fail it when running in CI."""
    if IN_CI:
        pytest.fail(f'{reason} (CI installs it, so this is a broken CI setup)', pytrace=False)
    pytest.skip(reason)
