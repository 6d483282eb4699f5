"""The README's results are the newest committed records', word for word (`fmnist bench --readme` writes them)."""
from pathlib import Path
import pytest
from fmnist_lib.bench import README_BLOCKS, check_record, readme_block, readme_blocks, records, results_md, with_supplements
from fmnist_lib.core import FmnistError

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_results_are_generated_from_the_newest_default_record():
    recs = records('default', REPO)
    assert recs, "benchmarks/: expected at least one committed record of the default profile (run `fmnist bench --profile default`)"
    path, rec = recs[-1]
    assert rec['git']['commit'] and rec['seeds'] and rec['hardware']['cores'] >= 1
    block = readme_block((REPO / 'README.md').read_text())
    assert block.startswith(results_md(with_supplements(path, rec), path.name).split('Pipeline results')[0].strip('\n')), \
        f"README.md's results differ from {path.name}: run `fmnist bench --readme` (never edit the generated block by hand)"


def test_the_readmes_stage_figures_are_generated_from_the_newest_records():
    "Serving, monitoring, retraining and active learning: each block is what the newest committed pipeline figures render, and they are committed."
    text = (REPO / 'README.md').read_text()
    blocks = readme_blocks('default', REPO)
    assert sorted(blocks) == sorted(README_BLOCKS)
    for name, md in blocks.items():
        assert readme_block(text, name) == md, f"README.md's generated {name} block differs from the newest records: run `fmnist bench --readme`"
        if name != 'results': assert 'No ' + name + ' figures' not in md, f"no committed record has the {name} figures: `fmnist bench --record-pipeline`"
    pipes = records('default', REPO, kind='pipeline')
    assert pipes and all(s in pipes[-1][1]['pipeline'] for s in ('serve', 'monitor', 'retrain', 'active')), pipes


def test_a_pipeline_record_missing_a_figure_is_rejected():
    "Take the newest committed pipeline record and drop one figure the README shows, or a whole stage: check_record names what is missing."
    path, rec = records('default', REPO, kind='pipeline')[-1]
    check_record(rec, path.name)
    for stage, key in (('monitor', 'slo'), ('serve', 'targets'), ('retrain', 'mcnemar'), ('active', 'differences')):
        p = dict(rec['pipeline']); p[stage] = {k: v for k, v in p[stage].items() if k != key}
        with pytest.raises(FmnistError, match=rf'pipeline\.{stage}: expected .*found {key} missing'):
            check_record(rec | {'pipeline': p}, path.name)
    with pytest.raises(FmnistError, match='found active missing'):
        check_record(rec | {'pipeline': {k: v for k, v in rec['pipeline'].items() if k != 'active'}}, path.name)


def test_the_papers_detection_rates_in_the_readme_are_the_librarys():
    "The README quotes Rabanser et al.'s KS detection rates beside the generated monitoring block; they must be `stream.PAPER_DETECTION`."
    from fmnist_lib.stream import PAPER_DETECTION
    text = ' '.join((REPO / 'README.md').read_text().split())
    assert "averaged over its shifts, are " + ', '.join(f"{v:.2f}" for v in PAPER_DETECTION.values()) + ' (' in text


def test_every_record_traces_to_a_commit_of_this_repository():
    import subprocess
    for path, rec in records(root=REPO, kind=None):
        c = rec['git']['commit']
        r = subprocess.run(['git', '-C', str(REPO), 'cat-file', '-e', f'{c}^{{commit}}'], check=False, capture_output=True)
        assert r.returncode == 0, f"{path.name}: commit {c} is not in this repository's history"


def test_a_damaged_record_is_an_error_naming_it(tmp_path):
    (tmp_path / 'settings.ini').write_text('lib_name = fmnist_lib\n')
    (tmp_path / 'benchmarks').mkdir()
    (tmp_path / 'benchmarks' / 'bad.json').write_text('{"type": "benchmark", "profile": "default"}')
    with pytest.raises(FmnistError, match=r'bad\.json: expected a benchmark record with .*found .*started_at'):
        records('default', tmp_path)
    with pytest.raises(FmnistError, match='README.md: expected the generated-results markers'):
        readme_block('# a README without markers\n')
    with pytest.raises(FmnistError, match='hardware.cpu'):
        check_record({'type': 'benchmark', 'profile': 'x', 'started_at': 'x', 'git': {}, 'hardware': {}, 'compute': 'cpu', 'seeds': [0],
                      'data_checksum': 'x', 'runs': [], 'ensembles': [], 'classic': []})


def test_the_readmes_pictures_are_committed_files():
    "Every image the README shows is a file in the repository (the home-page screenshot under book/_static/), a real PNG."
    import re, subprocess
    text = (REPO / 'README.md').read_text()
    pics = re.findall(r'!\[[^\]]+\]\(([^)\s]+)\)', text)
    assert 'book/_static/home.png' in pics, pics
    tracked = set(subprocess.run(['git', 'ls-files', *pics], cwd=REPO, capture_output=True, text=True, check=True).stdout.split())
    for p in pics:
        assert p in tracked, f"README shows {p}, which is not committed"
        assert (REPO / p).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f"{p} is not a PNG"
