"""Brings timm's own ``tests/test_models.py`` for the installed timm version next to this file, and
timm's scripts (train.py, validate.py, benchmark.py, inference.py) for ``tests/test_timm_scripts.py``.

It comes from timm's source distribution on PyPI (``pip download --no-binary :all:``), is cached
under ~/.cache/timm_capsules and is never committed. One edit is made: our registry module is
added to ``FEAT_INTER_FILTERS``, the list of modules whose models timm tests for
``forward_intermediates`` and the feature-getter wrapper.
"""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import Optional, Tuple

import timm

HERE = Path(__file__).parent
TARGET = HERE / 'test_timm_models.py'
CACHE = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'timm_capsules'
OUR_MODULES = ['capsnet', 'dynamic_capsnet', 'em_capsnet', 'cnn_baselines']  # timm_capsules.MODEL_MODULES
PLACEHOLDER = '''# placeholder: the real suite could not be fetched; the next test run tries again
from ci import unavailable


def test_timm_model_suite():
    unavailable({reason!r})
'''


def _download_sdist(version: str) -> Path:
    cached = CACHE / f'timm-{version}-test_models.py'
    if cached.exists():
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
             f'timm=={version}', '-d', tmp],
            check=True, capture_output=True, timeout=300)
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
# and tests/ but not these (they sit at the top of its repository), so they come from the version's tag
SCRIPTS = ('train.py', 'validate.py', 'benchmark.py', 'inference.py')
SCRIPTS_URL = 'https://raw.githubusercontent.com/huggingface/pytorch-image-models/v{version}/{script}'


def fetch_timm_scripts() -> Tuple[Optional[Path], str]:
    """The folder holding timm's train.py, validate.py, benchmark.py and inference.py for the installed
    timm version, or None and the reason they could not be had.

    ``$TIMM_SCRIPTS_DIR`` (a checkout of timm's repository at the installed version's tag) comes first;
    else the copies cached under ~/.cache/timm_capsules/timm-<version>-scripts; else they are downloaded
    from the version's tag in timm's repository and cached.
    """
    version = timm.__version__
    local = os.environ.get('TIMM_SCRIPTS_DIR')
    if local:
        folder = Path(local)
        missing = [script for script in SCRIPTS if not (folder / script).is_file()]
        if missing:
            return None, f'TIMM_SCRIPTS_DIR={local} has no {", ".join(missing)}'
        checkout_version = _checkout_version(folder)
        if checkout_version not in (None, version):
            return None, (f"TIMM_SCRIPTS_DIR={local} holds timm {checkout_version}'s scripts, "
                          f'timm {version} is installed')
        return folder, ''
    cached = CACHE / f'timm-{version}-scripts'
    if all((cached / script).is_file() for script in SCRIPTS):
        return cached, ''
    try:
        sources = {}
        for script in SCRIPTS:
            with urllib.request.urlopen(SCRIPTS_URL.format(version=version, script=script), timeout=30) as response:
                sources[script] = response.read()
    except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
        return None, (f"timm {version}'s scripts ({', '.join(SCRIPTS)}) are not in its PyPI distributions and could "
                      f'not be downloaded from its repository ({type(error).__name__}: {error}); set TIMM_SCRIPTS_DIR '
                      f'to a checkout of timm v{version}')
    partial = cached.with_name(cached.name + '.partial')
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for script, source in sources.items():
        (partial / script).write_bytes(source)
    shutil.rmtree(cached, ignore_errors=True)
    partial.rename(cached)  # complete or absent: a later run never finds half the scripts
    return cached, ''


def _checkout_version(folder: Path) -> Optional[str]:
    """The version a checkout of timm's repository declares in timm/version.py (None when it has none)."""
    try:
        text = (folder / 'timm' / 'version.py').read_text()
    except OSError:
        return None
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return match.group(1) if match else None
