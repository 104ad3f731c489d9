"""``experiments.py report``, checked by value with nothing trained: its options and defaults, the hub results it
records, the block it writes between its markers in a document, and its refusals, which leave the document as it
was. Written for a mutmut run of ``experiments.py`` (tests/README.md), with tests/test_experiments_values.py; fast."""

import json
import shutil

import pytest

from timm_capsules.experiments import plans, records, report

from experiments_values_shared import ROOT, import_experiments


@pytest.fixture
def experiments(monkeypatch):
    return import_experiments(monkeypatch)


class Report:
    def __init__(self, experiments, monkeypatch, tags=()):
        self.rendered, self.recorded = [], []
        monkeypatch.setattr(experiments, 'render_report', self.render)
        monkeypatch.setattr(experiments, 'record_hub_results', self.record_hub)
        self.tags = list(tags)

    def render(self, *args, **kwargs):
        self.rendered.append((args, kwargs))
        return 'the report\n'

    def record_hub(self, *args):
        self.recorded.append(args)
        return self.tags


def test_report_prints_with_its_defaults(experiments, monkeypatch, capsys):
    calls = Report(experiments, monkeypatch)
    assert experiments.report_main([]) == 0
    assert capsys.readouterr().out == 'the report\n\n'
    docs = (ROOT / 'docs' / 'results.md').resolve().parent
    assert calls.rendered == [
        (('cpu', ROOT / 'results', ROOT / 'results' / 'plots', docs), dict(data_dir=plans.DATA, train_args=()))
    ]
    assert calls.recorded == []


def test_report_options_and_the_hub_results(experiments, tmp_path, monkeypatch, capsys):
    calls = Report(experiments, monkeypatch, tags=['a.x', 'b.y'])
    argv = ['--scale', 'paper', '--records', tmp_path / 'r', '--plots', tmp_path / 'p', '--data-dir', tmp_path / 'd']
    assert experiments.report_main([str(a) for a in argv] + ['--record-hub'], ['--epochs', '1']) == 0
    assert capsys.readouterr().out == 'hub configs updated: a.x, b.y\nthe report\n\n'
    docs = (ROOT / 'docs' / 'results.md').resolve().parent
    assert calls.rendered == [
        (('paper', tmp_path / 'r', tmp_path / 'p', docs), dict(data_dir=tmp_path / 'd', train_args=['--epochs', '1']))
    ]
    assert calls.recorded == [(tmp_path / 'r', 'paper', ['--epochs', '1'])]
    calls.tags = []
    assert experiments.report_main(['--record-hub']) == 0
    out = capsys.readouterr().out
    assert out.startswith('hub configs updated: none (no run trained a hub model as registered)\n')
    assert calls.recorded[-1] == (ROOT / 'results', 'cpu', ())


def _committed(tmp_path, scale='cpu'):
    folder = tmp_path / 'records' / scale
    folder.mkdir(parents=True)
    return folder


def test_report_writes_between_its_markers(experiments, tmp_path, monkeypatch, capsys):
    calls = Report(experiments, monkeypatch)
    for scale in ('cpu', 'gpu'):
        folder = _committed(tmp_path, scale)
        for path in sorted((ROOT / 'results' / scale).glob('*.json'))[:2]:
            shutil.copy(path, folder)
        begin, end = report.markers(scale)
        assert begin.startswith('<!-- experiments') and begin != end
        doc = tmp_path / 'sub' / f'{scale}.md'
        doc.parent.mkdir(exist_ok=True)
        # a damaged record beside the sound ones: named by the report itself (replaced here), not by this check
        damaged = next(
            records.record_path(tmp_path / 'records', scale, run)
            for run in plans.plan(scale, plans.STUDIES, [0])
            if not records.record_path(tmp_path / 'records', scale, run).exists()
        )
        damaged.write_text('{"run_id": ')
        # the first block is replaced, a second one left as it is
        doc.write_text(f'intro\n{begin}\nold\n{end}\nmore\n{end}\n{begin}\nolder\n{end}\noutro\n')
        argv = ['--scale', scale, '--records', str(tmp_path / 'records'), '--write', str(doc)]
        assert experiments.report_main(argv) == 0
        assert doc.read_text() == f'intro\n{begin}\nthe report\n{end}\nmore\n{end}\n{begin}\nolder\n{end}\noutro\n'
        assert capsys.readouterr() == (f'wrote the {scale} results into {doc}\n', '')
        assert calls.rendered[-1][0][3] == doc.resolve().parent


def test_report_write_refusals_leave_the_file_as_it_is(experiments, tmp_path, monkeypatch):
    calls = Report(experiments, monkeypatch)
    doc = tmp_path / 'results.md'
    records_dir = tmp_path / 'records'
    begin, end = report.markers('cpu')

    def refused(text, *options, train_args=()):
        doc.write_text(text)
        argv = ['--records', str(records_dir), '--write', str(doc), *map(str, options)]
        with pytest.raises(SystemExit) as info:
            experiments.report_main(argv, train_args)
        assert doc.read_text() == text
        return str(info.value)

    for text in ('no block\n', f'{begin}\nonly the start\n', f'only the end\n{end}\n'):
        assert refused(text) == f'{doc} has no {begin} ... {end} block to replace'
    gpu_begin, gpu_end = report.markers('gpu')
    block = f'{begin}\n{end}\n'
    assert refused(block, '--scale', 'gpu') == f'{doc} has no {gpu_begin} ... {gpu_end} block to replace'
    folder = records_dir / 'cpu'
    assert refused(block) == f'{folder}: no such records folder; {doc} left as it is'
    folder.mkdir(parents=True)
    assert refused(block) == f'{folder}: no sound run record of this scale; {doc} left as it is'
    # records of runs the plan does not hold: another data folder, other training arguments, seed 100
    run = plans.plan('cpu', ['table1'], [0])[0]
    committed = json.loads((ROOT / 'results' / 'cpu' / f'{run.run_id}.json').read_text())
    for other in (
        plans.plan('cpu', ['table1'], [0], tmp_path / 'elsewhere')[0],
        plans.plan('cpu', ['table1'], [0], plans.DATA, ['--epochs', '1'])[0],
        plans.plan('cpu', ['table1'], [100])[0],
    ):
        path = records.record_path(records_dir, 'cpu', other)
        path.write_text(json.dumps(dict(committed, run_id=other.run_id)))
        assert refused(block) == f'{folder}: no sound run record of this scale; {doc} left as it is'
        path.unlink()
    assert calls.rendered == []
    # each is found when asked for with its own folder or arguments
    for other, options, train_args in [
        (plans.plan('cpu', ['table1'], [0], tmp_path / 'elsewhere')[0], ['--data-dir', tmp_path / 'elsewhere'], ()),
        (plans.plan('cpu', ['table1'], [0], plans.DATA, ['--epochs', '1'])[0], [], ['--epochs', '1']),
        (plans.plan('cpu', ['table1'], [99])[0], [], ()),
    ]:
        path = records.record_path(records_dir, 'cpu', other)
        path.write_text(json.dumps(dict(committed, run_id=other.run_id)))
        doc.write_text(block)
        argv = ['--records', str(records_dir), '--write', str(doc), *map(str, options)]
        assert experiments.report_main(argv, train_args) == 0
        assert doc.read_text() == f'{begin}\nthe report\n{end}\n'
        path.unlink()
