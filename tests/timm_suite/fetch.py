"""Brings timm's own ``tests/test_models.py`` for the installed timm version next to this file, and
finds timm's scripts (train.py, validate.py, benchmark.py, inference.py) for ``tests/test_timm_scripts.py``.

It comes from timm's source distribution on PyPI (``pip download --no-binary :all:``), is cached
under ~/.cache/timm_capsules and is never committed. One edit is made: our registry module is
added to ``FEAT_INTER_FILTERS``, the list of modules whose models timm tests for
``forward_intermediates`` and the feature-getter wrapper.
"""

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple

import timm

HERE = Path(__file__).parent
TARGET = HERE / 'test_timm_models.py'
CACHE = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'timm_capsules'
OUR_MODULES = ['capsnet', 'dynamic_capsnet', 'em_capsnet', 'cnn_baselines']  # timm_capsules.MODEL_MODULES
PLACEHOLDER = """# placeholder: the real suite could not be fetched; the next test run tries again
from ci import unavailable


def test_timm_model_suite():
    unavailable({reason!r})
"""


def _download_sdist(version: str) -> Path:
    cached = CACHE / f'timm-{version}-test_models.py'
    if cached.exists():
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                '-m',
                'pip',
                'download',
                '--quiet',
                '--no-deps',
                '--no-binary',
                ':all:',
                f'timm=={version}',
                '-d',
                tmp,
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        archive = next(Path(tmp).glob('timm-*.tar.gz'))
        with tarfile.open(archive) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith('/tests/test_models.py'))
            source = tar.extractfile(member).read().decode()
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(source)
    return cached


def fetch_timm_model_tests() -> bool:
    version = timm.__version__
    stamp = f'# timm {version}\n'
    anchor = 'FEAT_INTER_FILTERS = ['
    edited = anchor + ''.join(f'{m!r}, ' for m in OUR_MODULES)
    if TARGET.exists() and TARGET.read_text().startswith(stamp) and edited in TARGET.read_text():
        return True  # the installed version's suite, edited for today's module list
    try:
        source = _download_sdist(version).read_text()
    except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError) as error:
        # offline: one placeholder test stands for the suite, skipped with the reason (failed in CI), so the
        # missing tests show in the summary instead of vanishing
        reason = f"timm {version}'s test suite could not be fetched ({type(error).__name__}: {error})"
        warnings.warn(reason)
        TARGET.write_text(PLACEHOLDER.format(reason=reason))
        return False
    if anchor not in source:
        raise RuntimeError(f"timm {version}'s test_models.py has no {anchor!r}: update tests/timm_suite")
    source = source.replace(anchor, edited, 1)
    TARGET.write_text(stamp + source)
    return True


# timm's command-line scripts, run by tests/test_timm_scripts.py. timm's sdist and wheel ship the library
# and tests/ but not these (they sit at the top of its repository, which CI cannot reach), so an unmodified copy
# lies beside the project, in ../shared/timm-scripts (its README names timm's commit)
SCRIPTS = ('train.py', 'validate.py', 'benchmark.py', 'inference.py')
SHARED_SCRIPTS = HERE.parents[1].parent / 'shared' / 'timm-scripts'


def fetch_timm_scripts() -> Tuple[Optional[Path], str]:
    """The folder holding timm's train.py, validate.py, benchmark.py and inference.py, or None and the reason
    there is none.

    ``$TIMM_SCRIPTS_DIR`` (a checkout of timm's repository) comes first, else ``../shared/timm-scripts`` from
    the project's root.
    """
    local = os.environ.get('TIMM_SCRIPTS_DIR')
    if local:
        folder = Path(local)
        missing = [script for script in SCRIPTS if not (folder / script).is_file()]
        if missing:
            return None, f'TIMM_SCRIPTS_DIR={local} has no {", ".join(missing)}'
        version = timm.__version__
        checkout_version = _checkout_version(folder)
        if checkout_version not in (None, version):
            return None, (
                f"TIMM_SCRIPTS_DIR={local} holds timm {checkout_version}'s scripts, timm {version} is installed"
            )
        return folder, ''
    missing = [script for script in SCRIPTS if not (SHARED_SCRIPTS / script).is_file()]
    if missing:
        return None, (
            f"timm's {', '.join(missing)} not found in {SHARED_SCRIPTS} (they are not in timm's PyPI "
            f'distributions): put them there from a checkout of timm, or set TIMM_SCRIPTS_DIR to one'
        )
    return SHARED_SCRIPTS, ''


def _checkout_version(folder: Path) -> Optional[str]:
    """The version a checkout of timm's repository declares in timm/version.py (None when it has none)."""
    try:
        text = (folder / 'timm' / 'version.py').read_text()
    except OSError:
        return None
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return match.group(1) if match else None
