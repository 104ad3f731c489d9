"""Run mutmut over one pure-Python module against the tests that cover it, in a scratch copy of the checkout.

tools/mutations.py holds hand-written bugs for the C++ kernels and the routing core; this is the generic tool for
the rest. The checkout is never touched: the tracked and untracked-but-not-ignored files are copied to
``$TMPDIR/timm_capsules_mutmut/<module>``, a ``[tool.mutmut]`` section naming the module and the tests is added to
that copy's pyproject.toml, and ``mutmut run`` runs there (one worker, niced; torch is not fork-safe once it has
run, so workers come from mutmut's fork server). Prints mutmut's result per mutant and the score. Not part of CI.

    python tools/mutmut_module.py timm_capsules/losses.py tests/test_baselines.py tests/test_train_arithmetic.py \\
        -k 'loss or margin or spread or top5 or evaluate'

Then ``cd $TMPDIR/timm_capsules_mutmut/losses && mutmut show <mutant>`` shows a survivor's diff.

MODULE may also be a script at the checkout's root (``experiments.py``, ``train_accelerate.py``): mutmut then
mutates that one file, copied to the top of its ``mutants/`` folder, which is first on the tests' import path, so
tests that ``import experiments`` in-process run the mutants.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout_files():
    listed = subprocess.run(
        ['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in listed.split('\0') if name and (ROOT / name).is_file()]


def mutmut_section(module, selection, files):
    """The ``[tool.mutmut]`` section: mutate ``module`` alone; its package's folder (or, for a script at the
    checkout's root, the script itself) is mutmut's source, every other top-level file and folder is copied beside
    it into ``mutants/``, where the tests run."""
    source = module.split('/')[0] + ('/' if '/' in module else '')
    also = sorted({name.split('/')[0] + ('/' if '/' in name else '') for name in files} - {source})
    return (
        '\n[tool.mutmut]\n'
        f'source_paths = ["{source}"]\n'
        f'only_mutate = ["{module}"]\n'
        f'pytest_add_cli_args_test_selection = {json.dumps(selection)}\n'
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
        'process_isolation = "forkserver"\n'
        f'also_copy = {json.dumps(also)}\n'
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('module', help='the file to mutate, e.g. timm_capsules/losses.py')
    parser.add_argument('tests', nargs='+', help='the test files that cover it')
    parser.add_argument('-k', dest='select', help="pytest's -k expression within those files")
    parser.add_argument('--scratch', type=Path, help='where the copy goes (default: $TMPDIR/timm_capsules_mutmut/NAME)')
    args = parser.parse_args(argv)
    scratch = args.scratch or Path(tempfile.gettempdir()) / 'timm_capsules_mutmut' / Path(args.module).stem
    shutil.rmtree(scratch, ignore_errors=True)
    for name in checkout_files():
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, scratch / name)
    # a git repository, so that tests which ask git about the checkout (what .gitignore covers) run there too
    subprocess.run(['git', 'init', '-q'], cwd=scratch, check=True)
    selection = list(args.tests) + (['-k', args.select] if args.select else [])
    with open(scratch / 'pyproject.toml', 'a') as f:
        f.write(mutmut_section(args.module, selection, checkout_files()))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # the copy's package, not a checkout's
    env.update(OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    mutmut = [sys.executable, '-m', 'mutmut']
    with open(scratch / 'mutmut_run.log', 'w') as log:  # mutmut's own messages (a failed stats run says why)
        subprocess.run(
            ['nice', '-n', '10', *mutmut, 'run', '--max-children', '1'],
            cwd=scratch,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    results = subprocess.run(
        [*mutmut, 'results', '--all', 'true'], cwd=scratch, env=env, capture_output=True, text=True
    ).stdout
    outcomes = re.findall(r'^\s*(\S+): (\w[\w ]*)$', results, re.M)
    counts = {}
    for _, outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    killed = counts.get('killed', 0)
    print(results)
    if outcomes and counts.get('not checked') == len(outcomes):
        print(
            f'mutmut checked no mutant: see {scratch / "mutmut_run.log"} (the tests must pass unmutated there)',
            file=sys.stderr,
        )
        return 1
    print(
        json.dumps(
            dict(
                module=args.module,
                tests=selection,
                mutants=len(outcomes),
                outcomes=counts,
                score=round(killed / max(len(outcomes), 1), 3),
            )
        )
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
