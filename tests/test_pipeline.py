"""The pipeline on the smoke profile: stages, skipping, provenance, index, and every kind of bad input."""
import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path
import nbformat
import pytest
from fmnist_lib.core import FmnistError, utc_now
from fmnist_lib.pipeline import PipelineError, plan, run
from fmnist_lib.serve import read_log

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_project(dest: Path) -> Path:
    "A project root with the real stage notebooks, library source, alert rules and verified data, and empty reports."
    (dest / 'nbs').mkdir(parents=True)
    shutil.copytree(REPO / 'nbs' / 'experiments', dest / 'nbs' / 'experiments')
    shutil.copytree(REPO / 'fmnist_lib', dest / 'fmnist_lib', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copytree(REPO / 'deploy' / 'prometheus', dest / 'deploy' / 'prometheus')   # the alert rules the monitor stage loads
    shutil.copytree(REPO / 'deploy' / 'evidently', dest / 'deploy' / 'evidently')   # the monitor stage's Evidently script,
    (dest / '.venv-evidently').symlink_to(REPO / '.venv-evidently')   # run in the project's Evidently environment (`make evidently`)
    (dest / 'data').mkdir()
    for d in ('raw', 'processed'):
        (REPO / 'data' / d).mkdir(parents=True, exist_ok=True)
        (dest / 'data' / d).symlink_to(REPO / 'data' / d)
    return dest


@pytest.fixture(scope='module')
def smoke_project(tmp_path_factory, official_dir):
    """One smoke run, shared: tests copy it before changing anything. It starts from the project's own smoke reports when
    there are some (`make test` runs `make smoke` first), so, as in a second `make smoke`, stages whose inputs are unchanged
    are skipped and whatever changed since runs here; without them (pytest alone on a fresh clone) every stage runs."""
    from fmnist_lib.data import fetch
    fetch(progress=False)  # the real project's data/raw, which the copies link to
    root = make_project(tmp_path_factory.mktemp('smoke') / 'project')
    made = REPO / 'reports' / 'smoke'
    if (made / 'index.json').is_file():   # champions.json keeps store-relative folders, so the copy serves its own models
        shutil.copytree(made, root / 'reports' / 'smoke', symlinks=True, ignore=shutil.ignore_patterns('.lock', 'failed', '.ipynb_checkpoints'))
    mp = pytest.MonkeyPatch()
    mp.setenv('FMNIST_ROOT', str(root))
    lines = []
    index = run('smoke', echo=lines.append)
    mp.undo()
    return root, index, lines


@pytest.fixture
def project_copy(smoke_project, tmp_path, monkeypatch):
    root, _, _ = smoke_project
    dest = tmp_path / 'project'
    shutil.copytree(root, dest, symlinks=True)
    monkeypatch.setenv('FMNIST_ROOT', str(dest))
    return dest


def test_smoke_pipeline_runs_every_stage(smoke_project):
    root, index, lines = smoke_project
    jobs = {j['key']: j for j in index['jobs']}
    assert list(jobs) == ['data_report', 'train:noskill', 'train:centroid', 'train:logreg', 'train:cnn-s0', 'train:vit-s0', 'ensemble',
                          'evaluate', 'fairness', 'explain', 'robustness', 'serve', 'monitor', 'retrain', 'active']
    # 'skipped' only when the same inputs ran 'ok' before (make smoke, in the same `make test`)
    assert all(j['status'] in ('ok', 'skipped') for j in jobs.values()), {k: j.get('error') for k, j in jobs.items()}
    assert len([l for l in lines if l.lstrip().startswith(('done ', 'skipped '))]) == len(jobs), lines
    rep = root / 'reports' / 'smoke'
    for j in jobs.values():
        nb = nbformat.read(rep / j['output'], as_version=4)
        assert nb.cells[0].source.startswith('# '), "the report opens with its title"
        head = nb.cells[1]
        assert head.metadata.get('tags') == ['provenance'], "then its provenance"
        for field in ('profile', 'git commit', 'data checksum', 'fmnist_lib', 'hardware', 'seed', 'wall time', 'Parameters'):
            assert field in head.source
    assert jobs['train:cnn-s0']['headline']['test_acc'] > jobs['train:noskill']['headline']['test_acc'] + 0.3
    assert jobs['ensemble']['headline']['model'] == 'ensemble'
    champs = json.loads((rep / 'models' / 'champions.json').read_text())
    assert 'fashion-mnist' in champs
    assert (rep / 'runs' / 'cnn-s0' / 'model' / 'model.safetensors').is_file()
    # the retrain stage acts on the real monitor's last decision; a candidate it trains on stream (test) images has no test score
    rt, mon = json.loads((rep / 'retrain.json').read_text()), json.loads((rep / 'monitor.json').read_text())
    assert (rt['decision'] == 'no retraining') == (mon['decisions'][-1]['decision'] != 'retrain requested'), rt['why']
    if rt['candidate_run']:
        acc = json.loads((rep / 'runs' / rt['candidate_run'] / 'metrics.json').read_text())['test_acc']
        assert acc != acc, acc   # NaN
    # the monitor's Evidently report: the file it records, compared with the reference over the shifted windows only
    ev = mon['evidently']
    assert ev['sha256'] == hashlib.sha256((rep / 'monitor' / ev['file']).read_bytes()).hexdigest()
    shifted = [w['index'] for w in mon['windows'] if w['phase'] in ('corruption', 'label shift')]
    assert ev['summary']['windows'] == shifted and ev['summary']['current_rows'] == sum(w['n'] for w in mon['windows'] if w['index'] in shifted)


def test_unchanged_stages_are_skipped_and_changes_rerun_dependents(project_copy):
    lines = []
    index = run('smoke', echo=lines.append)
    assert {j['status'] for j in index['jobs']} == {'skipped'}
    # the stages whose status is checked (serve and monitor would rerun too: 40 s more, nothing more to learn)
    index = run('smoke', stages=['data_report', 'train', 'ensemble', 'evaluate', 'robustness'], overrides={'train.cnn-s0.epochs': 2}, echo=lines.append)
    status = {j['key']: j['status'] for j in index['jobs']}
    assert status['train:cnn-s0'] == 'ok' and status['ensemble'] == 'ok'     # changed, and what needs it
    assert status['evaluate'] == 'ok' and status['robustness'] == 'ok'
    assert status['train:vit-s0'] == 'skipped' and status['data_report'] == 'skipped'
    assert {j['key']: j['params'] for j in index['jobs']}['train:cnn-s0']['epochs'] == 2


def test_force_reruns(project_copy):
    index = run('smoke', stages=['data_report'], force=True, echo=lambda s: None)
    assert [j['status'] for j in index['jobs'] if j['key'] == 'data_report'] == ['ok']


def test_a_serve_rerun_starts_its_servers_log_afresh(project_copy):
    "The load test's servers log every request; a rerun keeps its own requests only, where rotation kept up to 300 MB of earlier runs'."
    log = project_copy / 'reports' / 'smoke' / 'serve' / 'log'
    log.mkdir(parents=True, exist_ok=True)
    (log / 'predictions.jsonl.4').write_text('{"time": "2026-01-01T00:00:00+00:00", "request_id": "an-earlier-run", "item": 0}\n')
    started = utc_now()   # the log's own format: ISO 8601 UTC to the second, so strings order as times
    index = run('smoke', stages=['serve'], force=True, echo=lambda s: None)
    assert [j['status'] for j in index['jobs'] if j['key'] == 'serve'] == ['ok']
    records = read_log(log)
    assert records and not (log / 'predictions.jsonl.4').exists()
    assert min(r['time'] for r in records) >= started, "a request older than this run stayed in the log"


def test_failing_stage_names_notebook_and_cell_and_keeps_earlier_reports(project_copy):
    rep = project_copy / 'reports' / 'smoke'
    (rep / 'runs' / 'vit-s0' / 'model' / 'model.safetensors').unlink()   # a member damaged after it was trained
    before = {p.name: p.read_bytes() for p in rep.glob('*.ipynb')}
    lines = []
    with pytest.raises(PipelineError, match='stage.*ensemble failed'):
        run('smoke', stages=['ensemble'], force=True, echo=lines.append)
    msg = '\n'.join(lines)
    assert 'nbs/experiments/03_ensemble.ipynb, cell' in msg
    assert "FmnistError: run vit-s0: expected a finished run" in msg and 'model/model.safetensors' in msg
    assert (rep / 'failed' / '03_ensemble.ipynb').is_file()
    assert {p.name: p.read_bytes() for p in rep.glob('*.ipynb')} == before   # every earlier report intact
    index = json.loads((rep / 'index.json').read_text())
    assert {j['key']: j['status'] for j in index['jobs']}['ensemble'] == 'failed'


def test_a_run_dropped_from_the_profile_is_gone_from_every_result(project_copy):
    "Stages get their runs from the plan, never from what lies on disk: a removed run disappears everywhere downstream."
    import yaml
    from fmnist_lib.book import model_card_md, results_md
    from fmnist_lib.evaluate import EvaluateResult
    from fmnist_lib.robustness import RobustnessResult
    rep = project_copy / 'reports' / 'smoke'
    assert 'logreg' in EvaluateResult.from_json(rep / 'evaluation.json').runs and '| logreg |' in results_md('smoke')
    pf = project_copy / 'nbs' / 'experiments' / 'profiles.yaml'
    cfg = yaml.safe_load(pf.read_text())
    del cfg['profiles']['smoke']['stages']['train']['runs']['logreg']
    pf.write_text(yaml.safe_dump(cfg, sort_keys=False))
    index = run('smoke', stages=['train', 'ensemble', 'evaluate', 'robustness'], echo=lambda s: None)   # the stages checked below
    assert (rep / 'runs' / 'logreg' / 'metrics.json').is_file(), "the old run folder is still on disk"
    status = {j['key']: j['status'] for j in index['jobs']}
    assert 'train:logreg' not in status and status['evaluate'] == 'ok' and status['robustness'] == 'ok'
    assert 'logreg' not in EvaluateResult.from_json(rep / 'evaluation.json').runs
    assert 'logreg' not in RobustnessResult.from_json(rep / 'robustness.json').scores
    assert '| logreg |' not in results_md('smoke') and '`logreg`' not in model_card_md('smoke')
    assert '| cnn | cnn-s0 |' in results_md('smoke')


def test_a_second_run_of_the_same_profile_fails_fast_naming_the_holder(project_copy):
    "Two runs of one profile would share temp names, checkpoints and the index: the second fails at once."
    from fmnist_lib.core import file_lock
    rep = project_copy / 'reports' / 'smoke'
    before = (rep / 'index.json').read_bytes()
    holder = subprocess.Popen([sys.executable, '-c', "import sys, time\nfrom fmnist_lib.core import file_lock\n"
                               f"with file_lock({str(rep / '.lock')!r}, 'profile smoke'):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(FmnistError, match=rf"profile smoke: expected to be the only writer, found it in use by pid {holder.pid} "):
            run('smoke', force=True, echo=lambda s: None)
    finally:
        holder.kill(); holder.wait()
    assert (rep / 'index.json').read_bytes() == before, "the refused run wrote nothing"
    with file_lock(rep / '.lock', 'profile smoke'): pass   # the holder died: the lock is free again, nothing stale


def test_failure_blocks_the_stages_that_need_it(project_copy):
    lines = []
    with pytest.raises(PipelineError):
        run('smoke', stages=['train', 'ensemble', 'evaluate'], overrides={'train.vit-s0.dataset': 'no-such-dataset'}, echo=lines.append)
    status = {j['key']: j['status'] for j in json.loads((project_copy / 'reports' / 'smoke' / 'index.json').read_text())['jobs']}
    assert status['train:vit-s0'] == 'failed' and status['ensemble'] == 'blocked' and status['evaluate'] == 'blocked'


def _tiny_project(root: Path, cells: dict, timeout=None) -> Path:
    "A project whose stages are one-cell notebooks: {stage: source of its cell}, run in the given order."
    exp = root / 'nbs' / 'experiments'; exp.mkdir(parents=True)
    shutil.copytree(REPO / 'fmnist_lib', root / 'fmnist_lib', ignore=shutil.ignore_patterns('__pycache__'))
    graph = {}
    for i, (stage, src) in enumerate(cells.items(), 1):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f'# {stage}'),
                                             nbformat.v4.new_code_cell('profile: str = "x"  # the profile'),
                                             nbformat.v4.new_code_cell(src)])
        nb.cells[1].metadata['tags'] = ['parameters']
        nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
        nbformat.write(nb, exp / f'{i:02d}_{stage}.ipynb')
        graph[stage] = {'needs': [], **({'timeout': timeout} if timeout else {})}
    (exp / 'profiles.yaml').write_text(json.dumps({'stages': graph, 'profiles': {'x': {'stages': {s: {} for s in cells}}}}))
    return root


def test_a_dead_kernel_fails_the_stage_and_keeps_the_rest(tmp_path, monkeypatch):
    root = _tiny_project(tmp_path / 'p', {'first': 'print("fine")', 'killed': 'import os, signal\nos.kill(os.getpid(), signal.SIGKILL)',
                                          'after': 'print("independent")'})
    monkeypatch.setenv('FMNIST_ROOT', str(root))
    lines = []
    with pytest.raises(PipelineError, match='stage.*killed failed'):
        run('x', echo=lines.append)
    msg = '\n'.join(lines)
    assert 'stage killed failed in nbs/experiments/02_killed.ipynb: the kernel died' in msg, msg
    status = {j['key']: j['status'] for j in json.loads((root / 'reports' / 'x' / 'index.json').read_text())['jobs']}
    assert status == {'first': 'ok', 'killed': 'failed', 'after': 'ok'}
    assert (root / 'reports' / 'x' / '01_first.ipynb').is_file() and not list((root / 'reports' / 'x').glob('.running-*'))


def test_a_cell_past_the_stage_timeout_fails_the_stage(tmp_path, monkeypatch):
    root = _tiny_project(tmp_path / 'p', {'slow': 'import time\ntime.sleep(60)'}, timeout=3)
    monkeypatch.setenv('FMNIST_ROOT', str(root))
    lines = []
    with pytest.raises(PipelineError, match='stage.*slow failed'):
        run('x', echo=lines.append)
    assert 'a cell ran past the stage timeout' in '\n'.join(lines), lines


# --- bad input, each before anything runs -------------------------------------------------------
@pytest.mark.parametrize('kw, message', [
    (dict(profile='tiny'), "profile: expected one of smoke, default, full, found 'tiny'"),
    (dict(profile='smoke', overrides={'epoch': 3}), "unknown parameter 'epoch': no selected stage"),
    (dict(profile='smoke', overrides={'epochs': 'five'}), "parameter epochs expects int, found 'five' (str)"),
    (dict(profile='smoke', overrides={'train.cnn-s0.widths': 16}), "stage train run cnn-s0: parameter widths expects list, found 16 (int)"),
    (dict(profile='smoke', overrides={'train.cnn-s9.epochs': 1}), "override for run 'cnn-s9'"),
    (dict(profile='smoke', stages=['evaluat']), "stage: expected one of data_report, train, ensemble, evaluate, fairness, explain, robustness, serve, monitor, retrain, active, found 'evaluat'"),
    (dict(profile='smoke', overrides={'train.cnn-s0.epochs': -1}), "stage train:cnn-s0: epochs: expected a positive integer, found -1"),
    (dict(profile='smoke', overrides={'ensemble.members': ['cnn-s0', 'no-such-run']}), "stage ensemble: members names ['no-such-run'], which are not runs"),
    (dict(profile='smoke', overrides={'fairness.model_run': 'cnn-s9'}), "stage fairness: model_run names ['cnn-s9']"),
    (dict(profile='smoke', overrides={'evaluate.cv_folds': 1}), "stage evaluate: cv_folds: expected 0 (off) or at least 2 folds, found 1"),
    (dict(profile='smoke', overrides={'robustness.tta': 'all'}), "stage robustness: tta: expected one of none, flip, flip+shift, found 'all'"),
    (dict(profile='smoke', overrides={'explain.n_images': 0}), "stage explain: n_images: expected a positive integer, found 0"),
])
def test_bad_plans_fail_before_running(kw, message, project_copy):
    before = sorted(p.name for p in (project_copy / 'reports' / 'smoke').rglob('*'))
    with pytest.raises(PipelineError) as e:
        run(**kw, echo=lambda s: None)
    assert message in str(e.value)
    assert sorted(p.name for p in (project_copy / 'reports' / 'smoke').rglob('*')) == before


def test_missing_stage_notebook(project_copy):
    (project_copy / 'nbs' / 'experiments' / '03_ensemble.ipynb').unlink()
    with pytest.raises(PipelineError, match=r'stage ensemble: expected the notebook .*NN_ensemble.ipynb, found none'):
        plan('smoke')


def fmnist(*args, root):
    return subprocess.run([str(BIN / 'fmnist'), *args], check=False, capture_output=True, text=True, timeout=600,
                          env=os.environ | {'FMNIST_ROOT': str(root)})


def test_cli_malformed_params_yaml(project_copy, tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('epochs: [1, 2\n')
    r = fmnist('run', '--profile', 'smoke', '-f', str(bad), root=project_copy)
    assert r.returncode == 1
    assert r.stderr.startswith(f'fmnist: error: params file {bad}: expected valid YAML, found')
    lst = tmp_path / 'list.yaml'
    lst.write_text('- epochs\n')
    r = fmnist('run', '--profile', 'smoke', '-f', str(lst), root=project_copy)
    assert r.returncode == 1 and 'expected a mapping of parameter names to values, found list' in r.stderr


def test_cli_params_file_and_list(project_copy, tmp_path):
    f = tmp_path / 'p.yaml'
    f.write_text('train:\n  runs:\n    cnn-s0: {epochs: 7}\nval_size: 600\n')
    r = fmnist('run', '--profile', 'smoke', '-f', str(f), '--list', root=project_copy)
    assert r.returncode == 0, r.stderr
    cnn = next(l for l in r.stdout.splitlines() if l.startswith('train:cnn-s0'))
    assert 'epochs=7' in cnn and 'val_size=600' in cnn
    r = fmnist('run', '--profile', 'nope', root=project_copy)
    assert r.returncode == 1 and "found 'nope'" in r.stderr
