"""Runs one of timm's scripts with this package's models registered, as a user would after
``import timm_capsules``: ``python run_timm_script.py path/to/train.py [the script's arguments]``.

timm's scripts create models by name and never import this package; importing it here, in the same
interpreter, registers the models before the script parses its ``--model``.
"""

import runpy
import sys

import timm_capsules  # noqa: F401  (registers the models)

if __name__ == '__main__':
    script = sys.argv[1]
    sys.argv = sys.argv[1:]  # the script sees itself as argv[0], as when run directly
    runpy.run_path(script, run_name='__main__')
