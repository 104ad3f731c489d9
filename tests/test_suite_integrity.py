"""The suite cannot shrink silently: what it needs and cannot get is a visible skip, and a failure in CI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from timm_suite import fetch

TESTS = Path(__file__).parent


def run_pytest(folder, ci):
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_CAPSULES_CI'}
    if ci:
        env['TIMM_CAPSULES_CI'] = '1'
    return subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unfetchable_timm_suite_is_a_visible_skip_and_a_ci_failure(tmp_path, monkeypatch):
    """The fetch fails (no network): a placeholder test takes the suite's place; the timm_suite collection
    filter keeps it; it skips with the reason on a developer machine and fails in CI."""
    suite = tmp_path / 'tests' / 'timm_suite'
    suite.mkdir(parents=True)
    for name in ('__init__.py', 'conftest.py', 'fetch.py'):
        shutil.copy(TESTS / 'timm_suite' / name, suite / name)
    for helper in ('ci.py', 'hub_cache.py'):  # what tests/timm_suite/ imports from tests/
        shutil.copy(TESTS / helper, tmp_path / 'tests' / helper)

    def offline(version):
        raise OSError('Temporary failure in name resolution')

    monkeypatch.setattr(fetch, 'TARGET', suite / 'test_timm_models.py')
    monkeypatch.setattr(fetch, '_download_sdist', offline)
    for attempt in range(2):  # and it tries again next time: no stamp was written
        with pytest.warns(UserWarning, match='could not be fetched'):
            assert fetch.fetch_timm_model_tests() is False

    local = run_pytest(tmp_path / 'tests', ci=False)
    assert local.returncode == 0 and '1 skipped' in local.stdout, local.stdout + local.stderr
    assert 'Temporary failure in name resolution' in local.stdout  # the reason is in the skip summary
    ci = run_pytest(tmp_path / 'tests', ci=True)
    assert ci.returncode == 1 and '1 failed' in ci.stdout, ci.stdout + ci.stderr
    assert 'broken CI setup' in ci.stdout


def test_the_fetched_timm_suite_is_the_installed_versions():
    import timm

    if not fetch.TARGET.exists() or not fetch.TARGET.read_text().startswith(f'# timm {timm.__version__}\n'):
        pytest.fail('tests/timm_suite/test_timm_models.py was not fetched for the installed timm at configure time')
    assert f'FEAT_INTER_FILTERS = [{", ".join(map(repr, fetch.OUR_MODULES))}, ' in fetch.TARGET.read_text()


def test_every_planted_mutation_still_applies_and_names_existing_tests():
    """tools/mutations.py cannot go stale: each snippet occurs exactly once in its file (else tools/mutate.py stops
    there, or edits the wrong spot), the edit changes something, and each test it names exists."""
    import re

    sys.path.insert(0, str(TESTS.parent / 'tools'))
    try:
        from mutations import MUTATIONS
    finally:
        sys.path.remove(str(TESTS.parent / 'tools'))
    problems = []
    names = [m['name'] for m in MUTATIONS]
    assert len(names) == len(set(names)), 'two mutations share a name'
    for m in MUTATIONS:
        count = (TESTS.parent / m['file']).read_text().count(m['old'])
        if count != 1:
            problems.append(f'{m["name"]}: its snippet occurs {count} times in {m["file"]}')
        if m['old'] == m['new']:
            problems.append(f'{m["name"]}: the edit changes nothing')
        for test in m['tests']:
            path, _, function = test.partition('::')
            source = (TESTS.parent / path).read_text() if (TESTS.parent / path).is_file() else None
            name = function.partition('[')[0]
            if source is None or (name and not re.search(rf'^def {re.escape(name)}\(', source, re.M)):
                problems.append(f'{m["name"]}: no test {test}')
    assert not problems, '\n'.join(problems)


def test_every_run_lists_the_slowest_tests(request):
    """pyproject's addopts: the 15 slowest tests and their times end every run, so a slow test stays visible."""
    assert request.config.getoption('durations') == 15
