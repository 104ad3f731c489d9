"""Run records: one JSON file per finished run, where it lives, what makes one sound (a damaged one counts as not
done: the runner reruns it and the report leaves it out), and the records a study's table rows read."""

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .plans import Run


def record_path(records: Path, scale: str, run: Run) -> Path:
    """Where ``run``'s record is: one folder per scale, the run id as the file name."""
    return records / scale / f'{run.run_id}.json'


def machine() -> str:
    """The CPU, its cores, the GPU if any and torch's version, as a record names them."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(':', 1)[1].strip()
            for line in Path('/proc/cpuinfo').read_text().splitlines()
            if line.startswith('model name')
        )
    except (OSError, StopIteration):
        pass
    gpu = f', {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''
    return f'{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}'


def commit() -> Optional[str]:
    """The code's commit (git's, or TIMM_CAPSULES_COMMIT where the tree has no .git), None if neither."""
    if os.environ.get('TIMM_CAPSULES_COMMIT'):  # a copy of the tree without its .git (e.g. on a lent GPU machine)
        return os.environ['TIMM_CAPSULES_COMMIT']
    try:
        return subprocess.run(
            ['git', 'rev-parse', 'HEAD'],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_record(path: Path, record: Dict[str, Any]) -> None:
    """Writes ``record`` whole or not at all (a killed run leaves no half record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_record(path: Path) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(record, None) for a sound run record; (None, what is wrong) for a damaged one (truncated JSON, a
    missing field, a NaN or non-numeric metric): such a run is not done, and the report leaves it out."""
    try:
        record = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        return None, f'not readable JSON ({error})'
    if not isinstance(record, dict):
        return None, 'not a JSON object'
    for key, kind in (('run_id', str), ('metric', str), ('metrics', dict), ('model', str), ('machine', str)):
        if not isinstance(record.get(key), kind):
            return None, f'"{key}" must be a {kind.__name__}, got {record.get(key)!r}'
    if record['run_id'] != path.stem:
        return None, f'"run_id" is {record["run_id"]!r}, not the file\'s name'
    bad = {
        k: v
        for k, v in record['metrics'].items()  # a list: per-class values
        if not (_finite_number(v) or (isinstance(v, list) and all(_finite_number(x) for x in v)))
    }
    if bad:
        return None, f'metrics that are not finite numbers: {bad}'
    if not _finite_number(record['metrics'].get(record['metric'])):
        return None, f'its metric {record["metric"]!r} is not a number among its metrics'
    for key in ('num_parameters', 'wall_time_s'):
        if not _finite_number(record.get(key)) or record[key] < 0:
            return None, f'"{key}" must be a number >= 0, got {record.get(key)!r}'
    probe = record.get('part_whole_probe')
    if probe is not None and not (isinstance(probe, dict) and _finite_number(probe.get('own_fraction'))):
        return None, f'"part_whole_probe" has no numeric own_fraction: {probe!r}'
    return record, None


def damaged_records(records: Path, scale: str, runs: Sequence[Run]) -> Dict[str, str]:
    """{path: what is wrong} of the planned runs' records that exist but are damaged."""
    damaged = {}
    for run in runs:
        path = record_path(records, scale, run)
        if path.is_file():
            problem = read_record(path)[1]
            if problem:
                damaged[str(path)] = problem
    return damaged


def load_records(records: Path, scale: str, runs: Sequence[Run], warn: bool = True) -> Dict[str, Dict[str, Any]]:
    """The sound records of the planned runs (records of other configurations, e.g. an older protocol, are left
    out); a damaged one is named on stderr and skipped (the runner reruns it)."""
    found = {}
    for run in runs:
        path = record_path(records, scale, run)
        if path.is_file():
            record, problem = read_record(path)
            if record is not None:
                found[run.run_id] = record
            elif warn:
                print(
                    f'warning: {path}: damaged run record, skipped (its run counts as not done): {problem}',
                    file=sys.stderr,
                    flush=True,
                )
    return found


def rows_of(study: str, runs: Sequence[Run], records: Dict[str, Dict[str, Any]]):
    """{row key: (row, [records over seeds])} for one study, in plan order."""
    grouped: Dict[str, Any] = {}
    for run in runs:
        if study in run.studies:
            key = json.dumps(run.row, sort_keys=True)
            grouped.setdefault(key, (run.row, []))[1].extend([records[run.run_id]] if run.run_id in records else [])
    return list(grouped.values())


def metric_values(found: Sequence[Dict[str, Any]], name: Optional[str] = None) -> List[float]:
    return [r['metrics'][name or r['metric']] for r in found if (name or r['metric']) in r['metrics']]
