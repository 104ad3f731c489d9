"""The generated blocks of docs/ are what their generators write today, byte for byte: the experiments' tables
(``python experiments.py report --write docs/results.md``, and ``--scale gpu``) from the committed run records, and
the benchmark tables (``python benchmarks/report.py --write docs/performance.md``) from the committed results. (The
model table of docs/hub.md: tests/test_hub_cards.py.) The README stays a five-minute read."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'


@pytest.fixture
def experiments(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # experiments.py imports train_accelerate.py from beside it
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    import experiments

    return experiments


def block(text: str, begin: str, end: str) -> str:
    assert text.count(begin) == 1 and text.count(end) == 1, (begin, end)
    return text.split(begin, 1)[1].split(end, 1)[0]


@pytest.mark.parametrize('scale', ['cpu', 'gpu'])
def test_results_doc_is_the_report_of_the_committed_records(experiments, scale, tmp_path):
    """`report --scale SCALE --write docs/results.md` run on a copy of docs/ leaves it as committed: the plots go to a
    copy of the layout (results/plots beside docs/), so the committed PNGs are not rewritten."""
    (tmp_path / 'docs').mkdir()
    doc = tmp_path / 'docs' / 'results.md'
    doc.write_bytes((DOCS / 'results.md').read_bytes())
    assert (
        experiments.report_main(
            [
                '--scale',
                scale,
                '--records',
                str(ROOT / 'results'),
                '--plots',
                str(tmp_path / 'results' / 'plots'),
                '--write',
                str(doc),
            ]
        )
        == 0
    )
    assert doc.read_bytes() == (DOCS / 'results.md').read_bytes(), (
        f'docs/results.md is stale: python experiments.py report --scale {scale} --write docs/results.md'
    )
    committed = block(doc.read_text(), *experiments.markers(scale))
    plots = sorted((tmp_path / 'results' / 'plots').glob('*.png'))
    assert plots
    for plot in plots:
        assert f'](../results/plots/{plot.name})' in committed and (ROOT / 'results' / 'plots' / plot.name).is_file()


def test_the_printed_report_is_the_results_docs(experiments, tmp_path, capsys, monkeypatch):
    """Without --write the report is what docs/results.md holds: its plots linked from docs/ by default."""
    monkeypatch.setattr(experiments, 'ROOT', tmp_path)  # the layout's root: results/plots beside docs/
    assert (
        experiments.report_main(['--records', str(ROOT / 'results'), '--plots', str(tmp_path / 'results' / 'plots')])
        == 0
    )
    committed = block((DOCS / 'results.md').read_text(), *experiments.markers('cpu'))
    assert '\n' + capsys.readouterr().out == committed + '\n'


def test_the_studies_table_states_the_claims_the_report_tests():
    """docs/results.md's table of the studies gives each study's claim in the words the report heads its table with
    (``CLAIMS``, their one home), so the two cannot drift apart."""
    from timm_capsules.experiments.plans import CLAIMS, STUDIES

    rows = {
        line.split(' | ')[0][3:-1]: line
        for line in (DOCS / 'results.md').read_text().splitlines()
        if line.startswith('| `')
    }
    assert set(STUDIES) <= set(rows)
    for study in STUDIES:
        assert rows[study].endswith(f' | {CLAIMS[study]} |'), study


def test_performance_doc_is_the_report_of_the_committed_results():
    spec = importlib.util.spec_from_file_location('bench_report', ROOT / 'benchmarks' / 'report.py')
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    table = report.render(sorted((ROOT / 'benchmarks' / 'results').glob('*.json')))
    committed = block((DOCS / 'performance.md').read_text(), report.BEGIN, report.END)
    assert committed == '\n' + table + '\n', (
        'docs/performance.md is stale: python benchmarks/report.py --write docs/performance.md'
    )


def test_the_readme_is_a_five_minute_read():
    """At most 300 lines; the rest lives in docs/, and every document the README points to exists."""
    readme = (ROOT / 'README.md').read_text()
    assert len(readme.splitlines()) <= 300
    links = [link.split('#')[0] for link in re.findall(r'\]\(((?:docs|tests)/[^)\s]+)\)', readme)]
    assert links and all((ROOT / link).is_file() for link in links), links
    for doc in sorted(DOCS.glob('*.md')):
        for link in re.findall(r'\]\(([^)\s:]+\.(?:md|png))(?:#[^)]*)?\)', doc.read_text()):
            assert (doc.parent / link).resolve().is_file(), f'{doc.name}: {link}'
