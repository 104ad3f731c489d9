"""The package's shape: an acyclic import graph (imports inside functions count), modules a reader can
hold in their head, and no test helpers in the library."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_capsules'
MAX_LINES = 600


def modules():
    """'timm_capsules.x.y' -> path, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        found[name] = path
    return found


def imported_modules(name, path, known):
    """The package modules that ``name`` imports anywhere in its source, functions included. ``from X import y``
    counts as importing the module ``X.y`` when that is a module, else ``X``."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[: len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            for alias in node.names:
                module = f'{base}.{alias.name}'
                targets.add(module if module in known else base)
    return {t for t in targets if t in known and t != name}


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 'open':
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 'done'
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    known = modules()
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    cycle = find_cycle(graph)
    assert cycle is None, ' -> '.join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


@pytest.mark.parametrize('name', sorted(modules()))
def test_module_is_small_enough_to_read(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f'{name} has {lines} lines; split it by idea (at most {MAX_LINES})'


def test_no_test_helpers_in_the_library():
    for name, path in modules().items():
        source = path.read_text()
        assert 'huggingface_hub.constants' not in source.replace('from huggingface_hub import constants', ''), name
        assert 'import pytest' not in source, name


def test_no_module_shadows_the_standard_library():
    import sys

    shadowing = [name for name in modules() if name.rpartition('.')[2] in sys.stdlib_module_names]
    assert not shadowing, f'{shadowing} share a name with a standard-library module'


def test_every_subpackage_ships_in_the_wheel():
    """pyproject.toml lists the packages explicitly (hub_configs/ is mapped in): a new one must be added."""
    tomllib = pytest.importorskip('tomllib')  # Python 3.11+
    listed = set(tomllib.loads((PACKAGE.parent / 'pyproject.toml').read_text())['tool']['setuptools']['packages'])
    found = {name for name, path in modules().items() if path.name == '__init__.py'}
    assert found <= listed, f'add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml'


def test_every_dependency_has_a_tested_upper_bound():
    """Each requirement (dev extra included) is bounded above below its next major version, and the installed
    release, the one this run tests, lies inside the declared range: a bound nobody ran the suite on fails here."""
    from importlib.metadata import PackageNotFoundError, version
    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip('tomllib')
    project = tomllib.loads((PACKAGE.parent / 'pyproject.toml').read_text())['project']
    problems = []
    for line in project['dependencies'] + project['optional-dependencies']['dev']:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate():
            continue
        uppers = [Version(s.version) for s in req.specifier if s.operator == '<']
        try:
            installed = Version(version(req.name))
        except PackageNotFoundError:
            problems.append(f'{req.name} is not installed')
            continue
        if not uppers or min(uppers).major > installed.major or min(uppers) == Version(f'{installed.major + 1}'):
            problems.append(f'{line}: no upper bound below the next major version ({installed} installed)')
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(f'{line}: the installed {installed} is outside the range')
    assert not problems, problems
