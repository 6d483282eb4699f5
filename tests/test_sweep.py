"""Sweeps and search on Ray. Every Ray-using test runs in a fresh network namespace (`unshare -n`), where Ray
talks over 127.0.0.1 only; Ray keeps its files in a short temp folder and sends no usage statistics."""
import csv, json, os, shutil, socket, subprocess, sys, textwrap
from pathlib import Path
import pytest
from fmnist_lib.sweep import SweepError, _check_address, load_spec, points
from conftest import files_under

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def netns():
    "The Ray tests need root, `unshare` and `ip` for a loopback-only network namespace: a failure in CI, a skip elsewhere."
    missing = [w for w, ok in (('root', os.geteuid() == 0), ('unshare', shutil.which('unshare')), ('ip (iproute2)', shutil.which('ip'))) if not ok]
    if missing:
        msg = f"the Ray tests need {', '.join(missing)} for a loopback-only network namespace (make test installs iproute2; run as root)"
        if os.environ.get('CI'): pytest.fail(msg)
        pytest.skip(msg)  # on purpose, outside CI only: conftest still fails the session on it unless the reason is allowed


needs_root = pytest.mark.usefixtures('netns')


def make_project(dest: Path) -> Path:
    from test_pipeline import make_project as mp
    return mp(dest)


def in_netns(script: str, root: Path, timeout=600, token=False) -> subprocess.CompletedProcess:
    "Run a bash script in a new network namespace with only loopback up, the venv on PATH, FMNIST_ROOT set (`token`: Ray's session token, as users run it)."
    home = root.parent / 'home'   # an empty $HOME: the tests check nothing lands there
    home.mkdir(exist_ok=True)
    env = os.environ | {'HOME': str(home), 'FMNIST_ROOT': str(root), 'PATH': f"{BIN}:{os.environ['PATH']}", 'RAY_USAGE_STATS_ENABLED': '0',
                        'RAY_AUTH_MODE': 'disabled', 'FMNIST_RAY_TMP': str(Path('/tmp') / f'fmr-{root.parent.name[-12:]}')}
    env.pop('RAY_ADDRESS', None)
    if token: env.pop('RAY_AUTH_MODE')   # fmnist then starts its embedded Ray with a per-session token (sweep.ray_env)
    return subprocess.run(['unshare', '-n', 'bash', '-c', 'set -e; ip link set lo up; ' + script], env=env, check=False, capture_output=True,
                          text=True, timeout=timeout, cwd=root)


@pytest.fixture
def project(tmp_path, official_dir, monkeypatch):
    from fmnist_lib.data import fetch
    fetch(progress=False)
    root = make_project(tmp_path / 'p')
    monkeypatch.setenv('FMNIST_ROOT', str(root))
    return root


def summary_rows(root: Path, name: str) -> list:
    with open(root / 'reports' / 'sweeps' / name / 'summary.csv') as f:
        return list(csv.DictReader(f))


@needs_root
def test_smoke_sweep_runs_each_point_as_a_ray_task_and_skips_completed_ones(project):
    spec = project / 'nbs' / 'experiments' / 'sweeps' / 'smoke-cnn.yaml'
    r = in_netns(f'fmnist sweep {spec} --max-parallel 2', project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = summary_rows(project, 'smoke-cnn')
    assert [row['point'] for row in rows] == ['lr-0.2_epochs-2', 'lr-0.2_epochs-4', 'lr-0.4_epochs-2', 'lr-0.4_epochs-4']
    assert all(row['status'] == 'ok' and float(row['val_acc']) > 0.3 for row in rows)
    out = project / 'reports' / 'sweeps' / 'smoke-cnn'
    assert all((out / f"{row['point']}.ipynb").is_file() for row in rows)
    assert (out / 'summary.ipynb').is_file() and (out / 'summary.json').is_file()
    assert {row['node_ip'] for row in rows} == {'127.0.0.1'}
    s = json.loads((out / 'summary.json').read_text())   # test accuracy of the chosen point only, labelled as such
    assert not [k for row in rows for k in row if k.startswith('test_')] and not [k for p in s['points'] for k in p if k.startswith('test_')]
    best = max(rows, key=lambda row: (float(row['val_acc']), [-ord(c) for c in row['point']]))
    assert s['chosen']['point'] == best['point'] and 0 < s['chosen']['test_acc'] <= 1 and 'val_acc' in s['chosen']['note']
    r = in_netns(f'fmnist sweep {spec}', project)
    assert r.returncode == 0 and '4 already complete, 0 to run' in r.stdout
    assert files_under(project.parent / 'home') == [], "a sweep (Ray, papermill, training) wrote into $HOME"


@needs_root
def test_a_sweep_asking_for_more_than_any_node_has_fails_fast(project):
    "Ray would queue such a task forever; the sweep refuses it at once, naming what it asked for and what the cluster has."
    spec = project / 'big.yaml'
    spec.write_text(textwrap.dedent('''
        name: too-big
        stage: train
        profile: smoke
        run: cnn-s0
        grid: {lr: [0.1]}
        resources: {num_cpus: 64}
    '''))
    r = in_netns(f'fmnist sweep {spec} --num-cpus 2', project, timeout=180)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'sweep too-big: resources: expected a node with 64 CPUs and 0 GPUs for one task, found 2 CPUs and 0 GPUs' in r.stderr, r.stderr[-2000:]


@needs_root
def test_a_failing_point_is_recorded_and_the_others_complete(project):
    spec = project / 'fail.yaml'
    spec.write_text(textwrap.dedent('''
        name: with-a-bad-point
        stage: train
        profile: smoke
        run: cnn-s0
        grid: {optimizer: [sgd, lion]}
        fixed: {epochs: 1, threads: 1, tracking: disabled}
        resources: {num_cpus: 1}
    '''))
    r = in_netns(f'fmnist sweep {spec}', project)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {row['point']: row for row in summary_rows(project, 'with-a-bad-point')}
    assert rows['optimizer-sgd']['status'] == 'ok'
    assert rows['optimizer-lion']['status'] == 'failed'
    assert "optimizer: expected one of sgd, adamw, found 'lion'" in rows['optimizer-lion']['error']
    assert (project / 'reports' / 'sweeps' / 'with-a-bad-point' / 'failed' / 'optimizer-lion.ipynb').is_file()


@needs_root
def test_sweep_on_a_two_node_cluster_by_address(project):
    "A Ray head and a second node on 127.0.0.1, a sweep through --address, points on both nodes, then both stopped."
    spec = project / 'nbs' / 'experiments' / 'sweeps' / 'smoke-cnn.yaml'
    tmp = Path('/tmp') / f'fmc-{project.parent.name[-10:]}'
    script = f'''
        export RAY_TMPDIR={tmp}
        trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
        ray start --head --node-ip-address=127.0.0.1 --port=6399 --num-cpus=1 --include-dashboard=false --temp-dir={tmp} --disable-usage-stats >/dev/null
        ray start --address=127.0.0.1:6399 --node-ip-address=127.0.0.1 --num-cpus=1 --disable-usage-stats >/dev/null
        python -c "import ray; ray.init(address='127.0.0.1:6399', log_to_driver=False); print('NODES', sum(n['Alive'] for n in ray.nodes()))"
        fmnist sweep {spec} --address 127.0.0.1:6399
    '''
    r = in_netns(script, project, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'NODES 2' in r.stdout
    s = json.loads((project / 'reports' / 'sweeps' / 'smoke-cnn' / 'summary.json').read_text())
    assert all(p['status'] == 'ok' for p in s['points'])
    assert len({p['node_id'] for p in s['points']}) == 2, "the points should have run on both nodes"
    shutil.rmtree(tmp, ignore_errors=True)


@needs_root
def test_tune_smoke_writes_the_best_configuration(project):
    spec = project / 'nbs' / 'experiments' / 'sweeps' / 'tune-smoke.yaml'
    r = in_netns(f'fmnist tune {spec}', project, timeout=900, token=True)   # Ray must be imported after connect() set the token, or it never connects
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = project / 'reports' / 'tune' / 'tune-smoke'
    s = json.loads((out / 'summary.json').read_text())
    assert len(s['trials']) == 6 and s['best']['completed']
    # completed means the trial ran its 4 epochs; ASHA stopped the others earlier (Ray's own `done` would mark them all)
    assert all(t['epochs'] == 4 for t in s['trials'] if t['completed'])
    assert any(not t['completed'] and t['epochs'] < 4 for t in s['trials']), 'ASHA (grace 1, factor 2) should stop some trial early'
    import math
    import numpy as np
    trial_runs = sorted((out / 'ray').rglob('run/metrics.json'))
    assert len(trial_runs) == sum(t['completed'] for t in s['trials']) > 0, "every completed trial writes its run folder"
    for f in trial_runs:  # the trials never received test images: nothing could score them
        assert math.isnan(json.loads(f.read_text())['test_acc']), f"{f}: a trial scored the test set"
        with np.load(f.parent / 'predictions.npz') as z:
            assert z['test'].shape[0] == 0 and z['val'].shape[0] == 500, f"{f.parent}: a trial predicted test images"
    assert files_under(project.parent / 'home') == [], "tune (Ray Tune, W&B, training) wrote into $HOME"
    import yaml
    best = yaml.safe_load((out / 'best.yaml').read_text())
    assert set(s['best_params']) == {'lr', 'weight_decay', 'label_smoothing'}
    # include_default: the smoke run's own configuration is the first trial, kept as `default` with its validation accuracy
    base_trials = [t for t in s['trials'] if all(t[k] == s['base'][k] for k in s['best_params'])]
    assert len(base_trials) == 1 and s['default'] == base_trials[0] and s['default']['completed'], (s['base'], s['trials'])
    assert s['best']['val_acc'] >= s['default']['val_acc']
    assert s['provenance']['data_checksum'] and s['provenance']['hardware']['cores'] >= 1 and 'commit' in s['provenance']['git']
    assert best['train']['runs']['cnn-s0']['lr'] == pytest.approx(s['best_params']['lr'])
    from fmnist_lib.pipeline import plan
    jobs = plan('smoke', ['train'], overrides=best)   # best.yaml is a valid -f overlay
    assert next(j for j in jobs if j.run == 'cnn-s0').params['lr'] == pytest.approx(s['best_params']['lr'])


# --- bad input, no Ray needed ----------------------------------------------------------------
@pytest.mark.parametrize('text, message', [
    ('name: x\nstage: train\nprofile: smoke\ngrid: {lr: [0.1\n', 'expected valid YAML'),
    ('- a list\n', 'expected a mapping, found list'),
    ('name: x\nstage: train\nprofile: smoke\ngrid: {lr: []}\n', 'grid.lr: expected a non-empty list of values, found []'),
    ('name: x\nstage: train\nprofile: smoke\n', 'expected a non-empty grid or random section, found neither'),
    ('name: x\nstage: train\nprofile: smoke\ngird: {lr: [1]}\n', "unknown keys ['gird']"),
    ('name: x\nstage: train\nprofile: smoke\nrandom: {n: 2, params: {lr: {gauss: [0, 1]}}}\n', 'random.params.lr: expected one of choice'),
])
def test_malformed_specs(text, message, tmp_path):
    f = tmp_path / 's.yaml'
    f.write_text(text)
    with pytest.raises(SweepError, match=message.replace('[', r'\[').replace(']', r'\]').replace('(', r'\(')):
        load_spec(f)


def test_a_parameter_the_notebook_does_not_declare(tmp_path):
    f = tmp_path / 's.yaml'
    f.write_text('name: x\nstage: train\nprofile: smoke\nrun: cnn-s0\ngrid: {learning_rate: [0.1, 0.2]}\n')
    with pytest.raises(SweepError, match="parameter 'learning_rate' is not declared by 02_train.ipynb"):
        points(load_spec(f))


def test_a_value_of_the_wrong_type(tmp_path):
    f = tmp_path / 's.yaml'
    f.write_text('name: x\nstage: train\nprofile: smoke\nrun: cnn-s0\ngrid: {epochs: [1, two]}\n')
    with pytest.raises(Exception, match="parameter epochs expects int, found 'two'"):
        points(load_spec(f))


def test_an_unreachable_cluster_address_fails_fast():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    with pytest.raises(SweepError, match=f'Ray address 127.0.0.1:{port}: expected a running Ray cluster there, found none'):
        _check_address(f'127.0.0.1:{port}', timeout=2)
    with pytest.raises(SweepError, match="expected host:port, found 'nowhere'"):
        _check_address('nowhere')


def test_an_embedded_ray_listens_on_loopback_only_with_a_token_and_writes_nothing_to_home(tmp_path):
    """Ray as `fmnist sweep` and `fmnist tune` start it (`connect`), on this machine's real network (no namespace):
    every socket its processes listen on is loopback, token authentication is on, and $HOME stays empty."""
    home = tmp_path / 'home'
    home.mkdir()
    script = textwrap.dedent('''
        import json, os, psutil
        from fmnist_lib.sweep import connect
        ray = connect(num_cpus=1)
        @ray.remote
        def twice(x): return 2 * x
        assert ray.get(twice.remote(21)) == 42
        procs = [psutil.Process()] + psutil.Process().children(recursive=True)
        socks = sorted({(p.name(), c.laddr.ip) for p in procs for c in p.net_connections(kind='inet') if c.status == psutil.CONN_LISTEN})
        print(json.dumps({'sockets': socks, 'auth': os.environ.get('RAY_AUTH_MODE'), 'processes': len(procs)}))
        ray.shutdown()
    ''')
    env = {k: v for k, v in os.environ.items() if not k.startswith('RAY_')} | {
        'HOME': str(home), 'FMNIST_RAY_TMP': str(Path('/tmp') / f'fml-{tmp_path.name[-12:]}')}
    r = subprocess.run([sys.executable, '-c', script], env=env, check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    names = {n for n, _ in out['sockets']}
    assert {'gcs_server', 'raylet'} <= names, f"expected Ray's servers among the listening processes, found {out}"
    exposed = [s for s in out['sockets'] if s[1] not in ('127.0.0.1', '::ffff:127.0.0.1', '::1')]
    assert exposed == [], f"Ray listens beyond loopback: {exposed}"
    assert out['auth'] == 'token'
    assert files_under(home) == [], "Ray wrote into $HOME"
    shutil.rmtree(env['FMNIST_RAY_TMP'], ignore_errors=True)


def test_a_second_sweep_of_the_same_spec_fails_fast_naming_the_holder(project, monkeypatch):
    "Another process holds the sweep's lock as run_sweep does (core.file_lock on reports/sweeps/<name>/.lock): a second sweep stops before Ray."
    from fmnist_lib import sweep
    from fmnist_lib.core import FmnistError
    spec = project / 'nbs' / 'experiments' / 'sweeps' / 'smoke-cnn.yaml'
    lock = project / 'reports' / 'sweeps' / 'smoke-cnn' / '.lock'
    hold = f"import time\nfrom fmnist_lib.core import file_lock\nwith file_lock({str(lock)!r}, 'sweep smoke-cnn'):\n    print('held', flush=True); time.sleep(300)"
    def no_ray(*a, **k): raise AssertionError("the sweep went on to start Ray")
    monkeypatch.setattr(sweep, 'connect', no_ray)
    holder = subprocess.Popen([sys.executable, '-c', hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(FmnistError, match=rf"sweep smoke-cnn: expected to be the only writer, found it in use by pid {holder.pid} \("):
            sweep.run_sweep(spec, root=project, echo=lambda s: None)
    finally:
        holder.kill(); holder.wait()
    with pytest.raises(AssertionError, match='went on to start Ray'):   # the holder gone, the lock is free again
        sweep.run_sweep(spec, root=project, echo=lambda s: None)
