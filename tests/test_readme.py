"""The README's and docs/'s examples as a new user copies them: every Python snippet defines what it uses, every
``accelerate launch`` gives the launcher all the values it would otherwise guess, with a warning, and every
``python ...`` / ``accelerate ...`` command names a file or module that exists and only options it accepts."""

import ast
import builtins
import json
import re
import shlex
import subprocess
import sys
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCUMENTS = [README, *sorted((ROOT / 'docs').glob('*.md'))]
# what `accelerate launch` warns it guessed when not given (accelerate.commands.launch._validate_launch_command)
LAUNCH_VALUES = ('--num_processes', '--num_machines', '--mixed_precision', '--dynamo_backend')


def code_blocks(language, documents=DOCUMENTS):
    return [block for path in documents for block in re.findall(rf'```{language}\n(.*?)```', path.read_text(), re.S)]


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
    return sorted(
        {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)} - defined
    )


def test_the_name_check_finds_an_undefined_name():
    assert undefined_names('import numpy as np\nsession.run(None, {"x": images.astype(np.float32)})') == [
        'images',
        'session',
    ]


@pytest.mark.parametrize('index', range(len(code_blocks('python'))))
def test_every_python_example_defines_what_it_uses(index):
    source = code_blocks('python')[index]
    assert undefined_names(source) == [], source


def launch_commands(documents=DOCUMENTS):
    commands = []
    for block in code_blocks('bash', documents):
        for line in block.splitlines():
            command = line.split('#')[0]  # no comment, nor a comment line
            words = shlex.split(command) if 'accelerate launch' in command else []
            if words:
                commands.append(words)
    return commands


def test_the_readme_has_launch_commands():
    assert len(launch_commands()) >= 3
    assert launch_commands([README]), 'the README shows how to launch on several GPUs'


@pytest.mark.parametrize('words', launch_commands(), ids=lambda words: ' '.join(words)[:60])
def test_every_launch_gives_accelerate_its_values(words):
    """No launch prints accelerate's 'values were not passed ... defaults used' warning: each passes them (on a
    CPU-only machine also the threads per process, which accelerate otherwise sets and warns about)."""
    launcher = words[: next(i for i, w in enumerate(words) if w.endswith('.py'))]
    missing = [value for value in LAUNCH_VALUES if value not in launcher]
    if 'ACCELERATE_USE_CPU=1' in launcher and '--num_cpu_threads_per_process' not in launcher:
        missing.append('--num_cpu_threads_per_process')
    assert missing == [], ' '.join(words)


def readme_cpu_launch():
    """The documented several-processes-on-a-CPU launcher arguments (between `launch` and the script; docs/training.md)."""  # noqa: E501
    words = next(words for words in launch_commands() if 'ACCELERATE_USE_CPU=1' in words)
    return words[words.index('launch') + 1 : next(i for i, w in enumerate(words) if w.endswith('.py'))]


# ---- every command line names what exists ----------------------------------------------------------------------


def command_lines():
    """(document, command) for every command of the bash blocks (continuation lines joined, comments dropped, each
    part of an ``&&`` chain) and every inline `python ...` / `accelerate ...` span of README.md and docs/*.md."""
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        lines = [
            line
            for block in re.findall(r'```bash\n(.*?)```', text, re.S)
            for line in block.replace('\\\n', ' ').splitlines()
        ]
        lines += re.findall(r'(?<!`)`((?:python|accelerate) [^`]+)`', text)
        for line in lines:
            words = shlex.split(line, comments=True)
            while words:
                part, words = (
                    (words[: words.index('&&')], words[words.index('&&') + 1 :]) if '&&' in words else (words, [])
                )
                while part and re.fullmatch(r'[A-Z_]+=\S*', part[0]):  # VAR=value before the command
                    part = part[1:]
                if part and part[0] in ('python', 'accelerate'):
                    found.append((path.relative_to(ROOT).as_posix(), tuple(part)))
    return found


# runs each argv's --help in one interpreter (torch is imported once); {key: the text it printed}
HELP_RUNNER = """
import contextlib, io, json, os, runpy, sys
texts = {}
for key, argv in json.loads(sys.argv[1]):
    sys.argv, out = list(argv[1:] if argv[0] == '-m' else argv), io.StringIO()
    if argv[0] != '-m':
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            runpy.run_module(argv[1], run_name='__main__', alter_sys=True) if argv[0] == '-m' else \\
                runpy.run_path(argv[0], run_name='__main__')
        except SystemExit:
            pass
    texts[key] = out.getvalue()
print(json.dumps(texts))
"""


def program(words):
    """(argv prefix that runs the program, its arguments) of ``python ...`` or ``accelerate launch ... script``."""
    if words[0] == 'accelerate':
        if words[1] != 'launch':
            return None, words[1:]
        script = next((i for i, word in enumerate(words) if word.endswith('.py')), None)
        if script is None:  # the launcher's own options
            return ('-m', 'accelerate.commands.launch'), words[2:]
        return (words[script],), words[script + 1 :]
    if words[1] == '-m':
        return ('-m', words[2]), words[3:]
    return (words[1],), words[2:]


@cache
def help_texts():
    """The --help of every program the documents run, and of each subcommand they give it (its first argument
    when that is not an option), from one interpreter."""
    wanted = {('-m', 'accelerate.commands.launch', '--help')}
    for _, words in command_lines():
        prefix, args = program(words)
        if prefix is None or words[1] == '-c':
            continue
        wanted.add((*prefix, '--help'))
        if args and not args[0].startswith(('-', '[')):
            wanted.add((*prefix, args[0], '--help'))
    argvs = [(' '.join(argv), list(argv)) for argv in sorted(wanted)]
    done = subprocess.run(
        [sys.executable, '-c', HELP_RUNNER, json.dumps(argvs)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_the_documents_show_commands_of_every_entry_point():
    shown = {program(words)[0] for _, words in command_lines()}
    for entry in [
        ('train_accelerate.py',),
        ('experiments.py',),
        ('-m', 'timm_capsules.parse_tree'),
        ('-m', 'timm_capsules.hub'),
        ('-m', 'timm_capsules.data.diverse_multimnist'),
        ('-m', 'timm_capsules.data.affine_mnist'),
        ('benchmarks/report.py',),
        ('benchmarks/bench_models.py',),
    ]:
        assert entry in shown, entry


@pytest.mark.parametrize(
    'document, words', command_lines(), ids=lambda value: value if isinstance(value, str) else ' '.join(value)[:70]
)
def test_every_command_names_an_existing_program_and_its_options(document, words):
    """Each command runs a file of this repository or an importable module, with options its --help lists (either
    spelling, dashes or underscores), and the hub configs it names exist."""
    if words[1] == '-c':  # python -c "...": valid Python
        ast.parse(words[2])
        return
    prefix, args = program(words)
    if prefix is None:  # accelerate config, ...
        assert words[1] in ('config', 'env', 'test'), words
        return
    if prefix[0] == '-m':
        assert find_spec(prefix[1]) is not None, f'{document}: no module {prefix[1]}'
    else:
        assert (ROOT / prefix[0]).is_file(), f'{document}: no file {prefix[0]}'
    texts = help_texts()
    shown = texts[' '.join((*prefix, '--help'))]
    if args and not args[0].startswith(('-', '[')):
        shown += texts[' '.join((*prefix, args[0], '--help'))]
    if words[0] == 'accelerate' and prefix[0] != '-m':
        launcher = words[2 : words.index(prefix[0])]
        shown_launch = texts['-m accelerate.commands.launch --help']
        for option in [w.split('=')[0] for w in launcher if w.startswith('--')]:
            assert option in shown_launch, f'{document}: accelerate launch has no {option}'
    assert 'usage:' in shown, f'{document}: {" ".join(prefix)} --help printed no usage'
    spelled = shown.replace('_', '-')
    for option in [w.strip('[]').split('=')[0] for w in args if w.strip('[]').startswith('--')]:
        assert re.search(re.escape(option.replace('_', '-')) + r'(?![\w-])', spelled), (
            f'{document}: {" ".join(prefix)} has no option {option}'
        )
    for path in [w for w in args if w.startswith('hub_configs/')]:
        assert (ROOT / path).is_file(), f'{document}: no {path}'


def test_the_readme_cites_the_paper_as_the_package_does():
    """The README's BibTeX is citation.py's, which the model cards and the DiverseMultiMNIST card use."""
    from timm_capsules.citation import BIBTEX

    assert code_blocks('bibtex', [README]) == [BIBTEX + '\n']
