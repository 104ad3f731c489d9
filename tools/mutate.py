"""Break the code on purpose, one known bug at a time, and check that the test suite notices.

Each mutation in ``tools/mutations.py`` is a one-spot edit (an exact snippet and its replacement) plus the
tests expected to catch it. For each, this script copies the checkout to one fixed scratch folder
(``$TMPDIR/timm_capsules_mutant``, reused so the routing kernel's build cache stays valid), applies the edit,
runs the named tests there with ``TIMM_CAPSULES_CI=1``, and reports whether they failed (the mutant is
"caught") or passed ("survived"). The checkout itself is never touched. Not part of CI's run: a full pass
takes several minutes per mutation on a 2-core machine.

    python tools/mutate.py                   # every mutation
    python tools/mutate.py primary_norm f1   # the named ones
    python tools/mutate.py --list            # names and what each breaks
    python tools/mutate.py --table           # the Markdown table of tests/README.md

Prints one JSON object per mutation and exits non-zero if any survived.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
from mutations import MUTATIONS  # noqa: E402

SCRATCH = Path(tempfile.gettempdir()) / 'timm_capsules_mutant'


def checkout_files():
    """Tracked and untracked-but-not-ignored files: what a commit of the working tree would hold."""
    listed = subprocess.run(
        ['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in listed.split('\0') if name and (ROOT / name).is_file()]


def prepare(mutation):
    if SCRATCH.exists():
        shutil.rmtree(SCRATCH)
    for name in checkout_files():
        target = SCRATCH / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)  # keeps mtimes: the kernel's ninja build stays up to date
    path = SCRATCH / mutation['file']
    source = path.read_text()
    if source.count(mutation['old']) != 1:
        raise SystemExit(
            f'mutation {mutation["name"]}: the snippet occurs {source.count(mutation["old"])} times '
            f'in {mutation["file"]}, not once; update tools/mutations.py'
        )
    path.write_text(source.replace(mutation['old'], mutation['new']))


def run(mutation, timeout):
    prepare(mutation)
    env = dict(
        os.environ,
        TIMM_CAPSULES_CI='1',
        PYTHONPATH=str(SCRATCH),
        TORCH_EXTENSIONS_DIR=str(SCRATCH.parent / 'timm_capsules_mutant_extensions'),
    )
    command = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *mutation['tests']]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=SCRATCH, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (done.stdout.strip() or done.stderr.strip()).splitlines()[-1:]
        failed = done.returncode == 1 and re.search(r'\b\d+ (failed|errors?)\b', tail[0] if tail else '')
        outcome = 'caught' if failed else 'survived' if done.returncode == 0 else f'error {done.returncode}'
    except subprocess.TimeoutExpired:
        outcome, tail = 'timeout', []
    return dict(
        name=mutation['name'],
        outcome=outcome,
        seconds=round(time.perf_counter() - start, 1),
        tests=mutation['tests'],
        last_line=tail[0] if tail else '',
    )


def table():
    rows = ['| mutation | what it breaks | caught by |', '|---|---|---|']
    for m in MUTATIONS:
        tests = '<br>'.join(f'`{t}`' for t in m['tests'])
        rows.append(f'| `{m["name"]}` (`{m["file"]}`) | {m["what"]} | {tests} |')
    return '\n'.join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('names', nargs='*', help='mutations to run (default: all)')
    parser.add_argument('--list', action='store_true', help='list the mutations and stop')
    parser.add_argument('--table', action='store_true', help="print tests/README.md's mutation table and stop")
    parser.add_argument('--timeout', type=float, default=900, help='seconds per mutation (default: 900)')
    args = parser.parse_args(argv)
    known = {m['name']: m for m in MUTATIONS}
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f'unknown mutation(s) {unknown}; known: {sorted(known)}')
    if args.list:
        for m in MUTATIONS:
            print(f'{m["name"]:28s} {m["file"]}: {m["what"]}')
        return 0
    if args.table:
        print(table())
        return 0
    survived = 0
    for name in args.names or list(known):
        result = run(known[name], args.timeout)
        survived += result['outcome'] != 'caught'
        print(json.dumps(result), flush=True)
    return 1 if survived else 0


if __name__ == '__main__':
    sys.exit(main())
