"""Models and training: shapes, capacity, determinism, resume, save/load, tracking, bad parameters."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np
import pytest
import torch, torch.nn.functional as F
from fmnist_lib.core import FmnistError
from fmnist_lib.data import load
from fmnist_lib.models import Model, to_input
from fmnist_lib.train import TrainConfig, resumable, train

KINDS = {'noskill': {}, 'centroid': {}, 'logreg': {}, 'cnn': {'widths': [16, 32], 'convs': [1, 1]}, 'classic': {},
         'vit': {'dim': 32, 'depth': 2, 'heads': 2, 'patch': 4}}
ENSEMBLE = {'members': [{'kind': 'logreg'}, {'kind': 'cnn', 'arch': {'widths': [8]}}], 'weights': [0.3, 0.7]}
SMOKE = dict(val_size=500, train_size=2000, test_size=1000, batch_size=64, lr=0.4)


@pytest.fixture(scope='module')
def smoke_data():
    "The smoke profile's data: 2,000 training, 500 validation and 1,000 test images, stratified."
    return load(val_size=500, train_size=2000, test_size=1000)


def smoke_cfg(**kw):
    return TrainConfig(**(SMOKE | {'model': 'cnn', 'widths': [16, 32], 'convs': [1, 1], 'epochs': 3} | kw))


@pytest.mark.parametrize('kind', list(KINDS) + ['ensemble'])
def test_output_shapes_and_save_load_round_trip(kind, tmp_path):
    m = Model(kind, ENSEMBLE if kind == 'ensemble' else KINDS[kind])
    x = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    p = m.predict_proba(x)
    assert p.shape == (7, 10) and np.allclose(p.sum(1), 1, atol=1e-5)
    m.save(tmp_path)
    np.testing.assert_array_equal(Model.load(tmp_path).predict_proba(x), p)


@pytest.mark.parametrize('kind', list(KINDS))
def test_each_model_fits_a_tiny_batch(kind, smoke_data):
    "Capacity check: every model that learns reaches 100 % on 20 images (no-skill by definition cannot)."
    x, y = smoke_data.x_train[:20], torch.from_numpy(smoke_data.y_train[:20])
    torch.manual_seed(0)
    m = Model(kind, KINDS[kind])
    net, xin = m.module, to_input(x)
    if kind == 'noskill':
        net.fit(xin, y)
        assert np.allclose(m.predict_proba(x)[0], np.bincount(y.numpy(), minlength=10) / 20)
        return
    if getattr(net, 'closed_form', False):
        net.fit(xin, y)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        net.train()
        for _ in range(150):
            opt.zero_grad(); F.cross_entropy(net(xin), y).backward(); opt.step()
    acc = (m.predict(x) == y.numpy()).mean()
    if kind == 'centroid':  # one mean per class cannot separate every image; it must still beat chance by far
        assert acc >= 0.7
    else:
        assert acc == 1.0, f"{kind} could not fit 20 images ({acc:.2f})"


def test_smoke_cnn_beats_no_skill_by_far(smoke_data, tmp_path):
    cnn = train(smoke_cfg(epochs=4), tmp_path / 'cnn', data=smoke_data, progress=False)
    noskill = train(smoke_cfg(model='noskill'), tmp_path / 'ns', data=smoke_data, progress=False)
    assert noskill.metrics.test_acc == pytest.approx(0.1, abs=0.01)
    assert cnn.metrics.test_acc > noskill.metrics.test_acc + 0.55
    assert cnn.metrics.val_acc > 0.6


def test_same_seed_same_metrics(smoke_data, tmp_path):
    a = train(smoke_cfg(seed=3), tmp_path / 'a', data=smoke_data, progress=False)
    b = train(smoke_cfg(seed=3), tmp_path / 'b', data=smoke_data, progress=False)
    c = train(smoke_cfg(seed=4), tmp_path / 'c', data=smoke_data, progress=False)
    strip = lambda r: [{k: v for k, v in h.items() if k != 'train_time_s'} for h in r.metrics.history]
    assert strip(a) == strip(b) and a.metrics.test_acc == b.metrics.test_acc
    assert strip(a) != strip(c)


@pytest.mark.parametrize('extra', [{}, {'ema': 0.9, 'whiten': True, 'pool': 'early'}], ids=['plain', 'ema-whiten'])
def test_resume_after_interruption_equals_uninterrupted_run(extra, smoke_data, tmp_path):
    "The weight average (EMA) and the fitted whitening layer are part of what a checkpoint must carry."
    cfg = lambda **kw: smoke_cfg(**(extra | kw))
    full = train(cfg(), tmp_path / 'full', data=smoke_data, progress=False)

    def interrupt(epoch, rec):
        if epoch == 2: raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(cfg(), tmp_path / 'cut', data=smoke_data, progress=False, on_epoch_end=interrupt)
    assert not (tmp_path / 'cut' / 'metrics.json').exists()
    assert resumable(cfg(), tmp_path / 'cut') and not resumable(cfg(), tmp_path / 'full'), \
        "only an unfinished run of the same parameters resumes"
    assert not resumable(cfg(lr=0.3), tmp_path / 'cut')
    resumed = train(cfg(), tmp_path / 'cut', data=smoke_data, progress=False, resume=True)
    strip = lambda r: [{k: v for k, v in h.items() if k != 'train_time_s'} for h in r.metrics.history]
    assert strip(resumed) == strip(full)
    assert resumed.metrics.test_acc == full.metrics.test_acc
    x = smoke_data.x_test[:50]
    np.testing.assert_array_equal(Model.load(tmp_path / 'cut' / 'model').predict_proba(x),
                                  Model.load(tmp_path / 'full' / 'model').predict_proba(x))


def test_resume_refuses_a_checkpoint_of_other_parameters(smoke_data, tmp_path):
    train(smoke_cfg(epochs=1), tmp_path / 'r', data=smoke_data, progress=False)
    with pytest.raises(FmnistError, match='expected a checkpoint of the same parameters'):
        train(smoke_cfg(epochs=1, lr=0.05), tmp_path / 'r', data=smoke_data, progress=False, resume=True)


@pytest.mark.parametrize('bad, message', [
    ({'model': 'resnet'}, "model: expected one of noskill, centroid, logreg, cnn, classic, vit, found 'resnet'"),
    ({'epochs': 0}, 'epochs: expected a positive integer, found 0'),
    ({'epochs': -2}, 'epochs: expected a positive integer, found -2'),
    ({'optimizer': 'lion'}, "optimizer: expected one of sgd, adamw, found 'lion'"),
    ({'lr': 0}, 'lr: expected a positive finite number, found 0'),
    ({'widths': [16, 32], 'convs': [1]}, 'convs: expected a list of 2 positive integers'),
])
def test_bad_parameters_fail_before_any_work(bad, message, tmp_path, monkeypatch):
    import fmnist_lib.train as T
    monkeypatch.setattr(T.Split, 'load', lambda *a, **k: pytest.fail('data was loaded before the parameters were checked'))
    with pytest.raises(FmnistError) as e:
        train(TrainConfig(**bad), tmp_path / 'run', progress=False)
    assert message in str(e.value)
    assert not (tmp_path / 'run').exists()


def test_unknown_parameter_name():
    with pytest.raises(FmnistError, match=r"unknown \['epoch'\]"):
        TrainConfig.from_dict({'epoch': 3})


def wandb_records(path: Path) -> list:
    "The protobuf records of an offline W&B run file (a ':W&B' header, then the LevelDB log format: 32 KiB blocks of chunks)."
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b':W&B', f"{path} is not a W&B run file"
    pos, block, buf, out = 7, 32768, b'', []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block; continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0: continue
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST continue it
        if kind in (1, 4):
            r = pb.Record(); r.ParseFromString(buf); out.append(r); buf = b''
    return out


def wandb_records_complete(path: Path, deadline_s: float = 60) -> list:
    """The records of a run file once W&B's service has written all of it (through the exit record).
    `run.finish()` returns before the service's writer has flushed the file, so a reader polls, up to a deadline."""
    end = time.monotonic() + deadline_s
    while True:
        recs = wandb_records(path)
        if any(r.WhichOneof('record_type') == 'exit' for r in recs) or time.monotonic() > end: break
        time.sleep(0.2)
    assert recs and recs[-1].WhichOneof('record_type') == 'exit', \
        f"{path}: W&B's run file has no exit record {deadline_s:.0f} s after finish ({len(recs)} records)"
    return recs


def test_wandb_offline_run_is_written_inside_the_project(smoke_data, tmp_path, monkeypatch):
    root = tmp_path / 'project'
    monkeypatch.setenv('FMNIST_ROOT', str(root))
    for k in ('WANDB_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR', 'WANDB_CONFIG_DIR', 'WANDB_MODE'):
        monkeypatch.delenv(k, raising=False)
    home = Path.home()
    before = set(home.iterdir()) if home.is_dir() else set()
    r = train(smoke_cfg(epochs=2, lr=0.123), tmp_path / 'run', data=smoke_data, progress=False, tracking='offline')
    t = json.loads((tmp_path / 'run' / 'tracking.json').read_text())
    run_dir = Path(t['run_dir'])
    assert run_dir.is_relative_to(root / 'wandb') and run_dir.name.startswith('offline-run-')
    recs = wandb_records_complete(next(run_dir.glob('*.wandb')))
    kind = lambda k: [getattr(x, k) for x in recs if x.WhichOneof('record_type') == k]
    config = {i.key: json.loads(i.value_json) for i in kind('run')[0].config.update}
    assert config['lr'] == 0.123 and config['model'] == 'cnn' and config['epochs'] == 2, "every parameter is the run's config"
    steps = [{(i.key or '/'.join(i.nested_key)): json.loads(i.value_json) for i in h.item} for h in kind('history')]
    assert [s['val_acc'] for s in steps] == pytest.approx([h['val_acc'] for h in r.metrics.history]), "per-epoch metrics"
    summary = {(i.key or '/'.join(i.nested_key)): i.value_json for s in kind('summary') for i in s.update}
    assert json.loads(summary['test_acc']) == pytest.approx(r.metrics.test_acc)
    assert [(a.name, a.type) for a in kind('artifact')] == [('cnn-model', 'model')], "the model is logged as an artifact"
    new = (set(home.iterdir()) if home.is_dir() else set()) - before
    assert not [p for p in new if 'wandb' in p.name.lower()], f"W&B wrote into $HOME: {new}"


def test_training_with_tracking_writes_nothing_to_home(smoke_data, tmp_path, monkeypatch):
    "W&B offline, torch and the training loop keep every file inside the project: an empty $HOME stays empty, recursively."
    from conftest import files_under
    home = tmp_path / 'home'; home.mkdir()
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.setenv('FMNIST_ROOT', str(tmp_path / 'project'))
    for k in ('WANDB_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR', 'WANDB_CONFIG_DIR', 'WANDB_MODE', 'XDG_CACHE_HOME', 'XDG_CONFIG_HOME'):
        monkeypatch.delenv(k, raising=False)
    train(smoke_cfg(epochs=1), tmp_path / 'run', data=smoke_data, progress=False, tracking='offline')
    assert (tmp_path / 'project' / 'wandb').is_dir(), "the W&B run went somewhere else"
    assert files_under(home) == [], f"training wrote into $HOME: {files_under(home)}"


def test_wandb_mode_in_the_environment_does_not_override_the_tracking_parameter(smoke_data, tmp_path, monkeypatch):
    """README: the `tracking` parameter decides the mode; WANDB_MODE=online in the environment does not override it.
    No API key, no netrc (an empty $HOME) and a W&B server nobody listens on: an online run could not start here."""
    root, home = tmp_path / 'project', tmp_path / 'home'
    home.mkdir()
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.setenv('FMNIST_ROOT', str(root))
    for k in ('WANDB_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR', 'WANDB_CONFIG_DIR', 'WANDB_API_KEY', 'NETRC', 'XDG_CONFIG_HOME'):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('WANDB_MODE', 'online')
    monkeypatch.setenv('WANDB_BASE_URL', 'http://127.0.0.1:9')
    monkeypatch.setenv('WANDB_INIT_TIMEOUT', '20')
    train(smoke_cfg(epochs=1), tmp_path / 'run', data=smoke_data, progress=False, tracking='offline')
    run_dir = Path(json.loads((tmp_path / 'run' / 'tracking.json').read_text())['run_dir'])
    assert run_dir.is_relative_to(root / 'wandb') and run_dir.name.startswith('offline-run-'), run_dir
    assert [p.name for p in (root / 'wandb').glob('wandb/run-*')] == [], "an online run folder was made too"
    assert [r.WhichOneof('record_type') for r in wandb_records_complete(next(run_dir.glob('*.wandb')))][-1] == 'exit'


def test_kill_9_mid_training_then_resume_ends_like_an_uninterrupted_run(smoke_data, tmp_path):
    "A real training process killed with SIGKILL (no cleanup runs) resumes from its last checkpoint to the same result."
    cfg = dict(SMOKE | {'model': 'cnn', 'widths': [16, 32], 'convs': [1, 1], 'epochs': 6})
    script = textwrap.dedent(f"""
        from fmnist_lib.train import TrainConfig, train
        def say(epoch, rec): print('epoch', epoch, flush=True)
        train(TrainConfig(**{cfg!r}), {str(tmp_path / 'cut')!r}, progress=False, on_epoch_end=say)
    """)
    p = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.strip() == 'epoch 2': break
    os.kill(p.pid, signal.SIGKILL)   # the next epoch is under way
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (tmp_path / 'cut' / 'metrics.json').exists() and resumable(TrainConfig(**cfg), tmp_path / 'cut')
    resumed = train(TrainConfig(**cfg), tmp_path / 'cut', data=smoke_data, progress=False, resume=True)
    full = train(TrainConfig(**cfg), tmp_path / 'full', data=smoke_data, progress=False)
    strip = lambda r: [{k: v for k, v in h.items() if k != 'train_time_s'} for h in r.metrics.history]
    assert resumed.metrics.epochs_run == 6 and strip(resumed) == strip(full)
    assert resumed.metrics.test_acc == full.metrics.test_acc
    assert not list((tmp_path / 'cut').rglob('*.tmp')), "temp files of the killed process stayed behind"


@pytest.mark.parametrize('damage', ['weights', 'json'])
def test_a_damaged_model_file_is_a_clear_error(tmp_path, damage):
    Model('cnn', KINDS['cnn']).save(tmp_path)
    f = tmp_path / ('model.safetensors' if damage == 'weights' else 'model.json')
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(FmnistError, match=rf"{f.name}: expected .*, found (an unreadable file|invalid JSON)"):
        Model.load(tmp_path)


def test_a_damaged_checkpoint_is_a_clear_error(smoke_data, tmp_path):
    train(smoke_cfg(epochs=1), tmp_path / 'r', data=smoke_data, progress=False)
    ckpt = tmp_path / 'r' / 'checkpoint.pt'
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(FmnistError, match=r"checkpoint.pt: expected a training checkpoint, found an unreadable file"):
        train(smoke_cfg(epochs=2), tmp_path / 'r', data=smoke_data, progress=False, resume=True)
