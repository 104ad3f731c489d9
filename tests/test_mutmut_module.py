"""tools/mutmut_module.py's ``[tool.mutmut]`` section for a module of the package and for a script at the checkout's
root, read back by mutmut's own configuration and copy functions (nothing is mutated or run)."""

import importlib.util
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [
    'experiments.py',
    'train_accelerate.py',
    'pyproject.toml',
    'timm_capsules/__init__.py',
    'timm_capsules/losses.py',
    'timm_capsules/train/config.py',
    'tests/test_losses.py',
    'tools/mutmut_module.py',
]


@pytest.fixture(scope='module')
def tool():
    spec = importlib.util.spec_from_file_location('mutmut_module', ROOT / 'tools' / 'mutmut_module.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(tool, module, selection=('tests/test_losses.py',)):
    return tomllib.loads(tool.mutmut_section(module, list(selection), FILES))['tool']['mutmut']


def test_a_package_module_is_mutated_inside_its_package(tool):
    section = _section(tool, 'timm_capsules/train/config.py', ['tests/test_x.py', '-k', 'a or b'])
    assert section == {
        'source_paths': ['timm_capsules/'],
        'only_mutate': ['timm_capsules/train/config.py'],
        'pytest_add_cli_args_test_selection': ['tests/test_x.py', '-k', 'a or b'],
        'pytest_add_cli_args': ['-p', 'no:cacheprovider', '-x', '-q'],
        'process_isolation': 'forkserver',
        'also_copy': ['experiments.py', 'pyproject.toml', 'tests/', 'tools/', 'train_accelerate.py'],
    }


def test_a_script_at_the_root_is_its_own_source_and_the_package_is_copied(tool):
    section = _section(tool, 'experiments.py')
    assert section['source_paths'] == ['experiments.py'] and section['only_mutate'] == ['experiments.py']
    assert section['also_copy'] == ['pyproject.toml', 'tests/', 'timm_capsules/', 'tools/', 'train_accelerate.py']


def test_mutmut_reads_the_script_s_section_and_copies_the_rest_beside_it(tool, tmp_path, monkeypatch):
    pytest.importorskip('mutmut')
    from mutmut import configuration
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, walk_mutatable_files
    from mutmut.utils.format_utils import get_mutant_name

    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('x = 1\n')
    (tmp_path / 'pyproject.toml').write_text(
        '[project]\nname = "x"\n' + tool.mutmut_section('experiments.py', [], FILES)
    )
    monkeypatch.chdir(tmp_path)
    configuration.reset_config()
    try:
        assert [str(path) for path in walk_mutatable_files()] == ['experiments.py']
        copy_src_dir()
        copy_also_copy_files()
    finally:
        configuration.reset_config()
    copied = sorted(str(p.relative_to(tmp_path / 'mutants')) for p in (tmp_path / 'mutants').rglob('*') if p.is_file())
    assert copied == sorted(FILES)
    # the mutants' names are the module's as the tests import it
    assert get_mutant_name(Path('experiments.py'), 'x_main') == 'experiments.x_main'
