"""The GitHub workflows: linted offline with actionlint (the binary ships in a PyPI wheel), and the CI one runs the README's test command."""
import subprocess, sys
from pathlib import Path
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / '.github' / 'workflows'
ACTIONLINT = Path(sys.executable).parent / 'actionlint'


def lint(*files: Path) -> subprocess.CompletedProcess:
    assert ACTIONLINT.is_file(), f"{ACTIONLINT}: expected actionlint from the dev dependencies (make setup), found none"
    return subprocess.run([str(ACTIONLINT), '-no-color', *map(str, files)], check=False, capture_output=True, text=True, timeout=120)


def test_the_workflows_lint_clean():
    files = sorted(WORKFLOWS.glob('*.yml'))
    assert [f.name for f in files] == ['ci.yml', 'pages.yml']
    r = lint(*files)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    "The linter is live: a job without runs-on and an expression with an unknown context fail it."
    bad = tmp_path / '.github' / 'workflows'
    bad.mkdir(parents=True)
    (bad / 'bad.yml').write_text('on: push\njobs:\n  t:\n    steps:\n      - run: echo ${{ nosuch.value }}\n')
    r = lint(bad / 'bad.yml')
    assert r.returncode == 1 and 'runs-on' in r.stdout and 'nosuch' in r.stdout, r.stdout + r.stderr


def test_ci_runs_make_test_and_pages_publishes_the_built_site():
    ci = yaml.safe_load((WORKFLOWS / 'ci.yml').read_text())
    runs = [s.get('run', '') for j in ci['jobs'].values() for s in j['steps']]
    assert any(r.strip() == 'make test' for r in runs), runs
    assert 'make test' in (REPO / '.ci' / 'run').read_text() and 'make test' in (REPO / 'README.md').read_text()
    pages = yaml.safe_load((WORKFLOWS / 'pages.yml').read_text())
    build = pages['jobs']['build']['steps']
    assert any('make all' in s.get('run', '') for s in build)
    assert any(s.get('uses', '').startswith('actions/upload-pages-artifact') and s['with']['path'] == 'book/_build/html' for s in build)


def test_ci_checks_out_the_whole_history():
    "tests/test_readme.py traces every benchmark record to a commit of this repository: a shallow clone (checkout's default fetch-depth 1) lacks those commits."
    ci = yaml.safe_load((WORKFLOWS / 'ci.yml').read_text())
    checkouts = [s for j in ci['jobs'].values() for s in j['steps'] if s.get('uses', '').startswith('actions/checkout@')]
    assert checkouts and all((s.get('with') or {}).get('fetch-depth') == 0 for s in checkouts), checkouts
