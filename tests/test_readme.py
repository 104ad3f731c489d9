"""The README's examples as a new user copies them: every Python snippet defines what it uses, and every
``accelerate launch`` gives the launcher all the values it would otherwise guess, with a warning."""
import ast
import builtins
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
# what `accelerate launch` warns it guessed when not given (accelerate.commands.launch._validate_launch_command)
LAUNCH_VALUES = ('--num_processes', '--num_machines', '--mixed_precision', '--dynamo_backend')


def code_blocks(language):
    return re.findall(rf'```{language}\n(.*?)```', README.read_text(), re.S)


def undefined_names(source):
    """Names a snippet reads but neither imports, assigns, defines nor gets from builtins."""
    tree = ast.parse(source)
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            defined.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((alias.asname or alias.name).split('.')[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return sorted({node.id for node in ast.walk(tree) if isinstance(node, ast.Name)
                   and isinstance(node.ctx, ast.Load)} - defined)


def test_the_name_check_finds_an_undefined_name():
    assert undefined_names('import numpy as np\nsession.run(None, {"x": images.astype(np.float32)})') == [
        'images', 'session']


@pytest.mark.parametrize('index', range(len(code_blocks('python'))))
def test_every_python_example_defines_what_it_uses(index):
    source = code_blocks('python')[index]
    assert undefined_names(source) == [], source


def launch_commands():
    commands = []
    for block in code_blocks('bash'):
        for line in block.splitlines():
            command = line.split('#')[0]  # no comment, nor a comment line
            words = shlex.split(command) if 'accelerate launch' in command else []
            if words:
                commands.append(words)
    return commands


def test_the_readme_has_launch_commands():
    assert len(launch_commands()) >= 3


@pytest.mark.parametrize('words', launch_commands(), ids=lambda words: ' '.join(words)[:60])
def test_every_launch_gives_accelerate_its_values(words):
    """No launch prints accelerate's 'values were not passed ... defaults used' warning: each passes them (on a
    CPU-only machine also the threads per process, which accelerate otherwise sets and warns about)."""
    launcher = words[:next(i for i, w in enumerate(words) if w.endswith('.py'))]
    missing = [value for value in LAUNCH_VALUES if value not in launcher]
    if 'ACCELERATE_USE_CPU=1' in launcher and '--num_cpu_threads_per_process' not in launcher:
        missing.append('--num_cpu_threads_per_process')
    assert missing == [], ' '.join(words)


def readme_cpu_launch():
    """The README's several-processes-on-a-CPU launcher arguments (between `launch` and the script)."""
    words = next(words for words in launch_commands() if 'ACCELERATE_USE_CPU=1' in words)
    return words[words.index('launch') + 1:next(i for i, w in enumerate(words) if w.endswith('.py'))]
