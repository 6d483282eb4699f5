"""Serving for real: ONNX against torch on the whole test set, `fmnist serve` (uvicorn) on 127.0.0.1 as a subprocess,
bad input that leaves the server up, promotion and rollback under load with no failed request, the A/B decision,
schemathesis against /openapi.json, batch prediction, and a runtime that never imports torch."""
import gzip, io, json, os, socket, struct, subprocess, sys, threading, time
from pathlib import Path
import httpx
import numpy as np
import pytest
from PIL import Image
from fmnist_lib.data import Split
from fmnist_lib.export import ensure_onnx
from fmnist_lib.serve import OnnxModel, read_log
from fmnist_lib.store import onnx_file, register
from fmnist_lib.train import TrainConfig, train

BIN = Path(sys.executable).parent
SPLIT = Split(val_size=500, train_size=2000, test_size=1000)


def fmnist(*args, env=None, timeout=300):
    return subprocess.run([str(BIN / 'fmnist'), *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy())


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    "A model store with two trained smoke CNNs (cnn v1, v2: different seeds), v1 the champion, both exported."
    root = tmp_path_factory.mktemp('serving')
    data = SPLIT.load()
    for seed in (0, 1):
        cfg = TrainConfig(model='cnn', widths=[16, 32], convs=[1, 1], epochs=3, batch_size=64, lr=0.4, tta='none', seed=seed, **SPLIT.__dict__)
        r = train(cfg, root / f'run{seed}', data=data, progress=False)
        v = register(root / f'run{seed}' / 'model', 'cnn', {'metrics': {'val_acc': r.metrics.val_acc}, 'val_split': 'smoke',
                                                              'params': {**cfg.__dict__}}, store_dir=root / 'store')
        ensure_onnx(v)
    assert fmnist('promote', 'cnn:v1', '--store', str(root / 'store')).returncode == 0
    return root / 'store'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


class Served:
    "`fmnist serve` as a subprocess on loopback."
    def __init__(self, store, tmp, *args):
        self.port, self.log_dir = free_port(), tmp / f'log{time.monotonic_ns()}'
        self.proc = subprocess.Popen([str(BIN / 'fmnist'), 'serve', '--store', str(store), '--port', str(self.port),
                                      '--log-dir', str(self.log_dir), '--max-batch', '300', '--threads', '1', *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f'http://127.0.0.1:{self.port}'
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited: {self.proc.stdout.read()}"
            try:
                if self.client.get('/readyz').status_code == 200: return
            except httpx.TransportError: pass
            time.sleep(0.2)
        raise AssertionError("the server did not become ready in 120 s")

    def stop(self):
        self.client.close(); self.proc.terminate()
        try: self.proc.wait(20)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()


@pytest.fixture(scope='module')
def server(store, tmp_path_factory):
    s = Served(store, tmp_path_factory.mktemp('srv'), '--model', 'cnn:v1')
    yield s
    s.stop()


@pytest.fixture(scope='module')
def test_images():
    d = SPLIT.load()
    return d.x_test, d.y_test


def png(a) -> bytes:
    b = io.BytesIO(); Image.fromarray(np.asarray(a, np.uint8)).save(b, format='PNG'); return b.getvalue()


def npy(a) -> bytes:
    b = io.BytesIO(); np.save(b, np.asarray(a)); return b.getvalue()


# --- export ---------------------------------------------------------------------------------------
def test_onnx_matches_torch_on_the_whole_test_set(store):
    from fmnist_lib.models import Model
    x, y = Split(val_size=500).load().x_test, Split(val_size=500).load().y_test
    assert len(x) == 10_000
    for tta in ('none', 'flip'):
        v = store / 'cnn' / 'v1'
        ensure_onnx(v, tta)
        zt, zo = Model.load(v).logits(x, tta=tta).numpy(), OnnxModel(v, tta).logits(x)
        assert np.abs(zt - zo).max() < 1e-3, f"tta {tta}: logits differ by {np.abs(zt - zo).max():.2g}"
        agree = (zt.argmax(1) == zo.argmax(1)).mean()
        assert agree >= 0.999, f"tta {tta}: classes agree on {agree:.4%} of images"
        assert abs((zt.argmax(1) == y).mean() - (zo.argmax(1) == y).mean()) <= 0.0005


def test_int8_is_calibrated_on_validation_and_keeps_most_classes(store):
    r = fmnist('export', 'cnn:v1', '--int8', '--store', str(store))
    assert r.returncode == 0, r.stderr
    q = onnx_file(store / 'cnn' / 'v1', int8=True)
    meta = json.loads(q.with_suffix('.json').read_text())
    assert meta['int8'] and meta['calibration_images'] == 500, "calibrated on the model's 500 validation images"
    x = Split(val_size=500, test_size=1000).load().x_test
    agree = (OnnxModel(store / 'cnn' / 'v1', int8=True).logits(x).argmax(1) == OnnxModel(store / 'cnn' / 'v1').logits(x).argmax(1)).mean()
    assert agree >= 0.95, f"int8 and fp32 agree on {agree:.1%} of test images"


# --- online ---------------------------------------------------------------------------------------
def test_every_input_format_gives_the_models_prediction_and_is_logged(server, store, test_images):
    x, _ = test_images
    want = OnnxModel(store / 'cnn' / 'v1').predict_proba(x[:8]).argmax(1).tolist()
    c = server.client
    answers = [c.post('/v1/predict', content=png(x[0]), headers={'content-type': 'image/png'}),
               c.post('/v1/predict', files={'file': ('a.png', png(x[0]), 'image/png')}),
               c.post('/v1/predict', json={'image': x[0].tolist()})]
    for r in answers:
        assert r.status_code == 200, r.text
        p = r.json()
        assert (p['model'], p['version'], p['variant']) == ('cnn', 'v1', 'champion')
        assert p['predictions'][0]['class'] == want[0] and p['predictions'][0]['label'] == SPLIT.load().classes[want[0]]
        assert abs(sum(p['predictions'][0]['probabilities']) - 1) < 1e-3
    r = c.post('/v1/predict', content=npy(x[:8]), headers={'content-type': 'application/x-npy'})
    assert [q['class'] for q in r.json()['predictions']] == want
    rid = r.json()['request_id']
    logged = [e for e in read_log(server.log_dir) if e['request_id'] == rid]
    assert [e['item'] for e in logged] == list(range(8)) and [e['class'] for e in logged] == want
    assert {'time', 'variant', 'model', 'version', 'confidence', 'probs', 'input_sha256'} <= set(logged[0])


def big_png(w, h) -> bytes:
    "A valid PNG header claiming w × h pixels with a tiny body: refused from the header, never decoded."
    import zlib
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0)) + chunk(b'IDAT', zlib.compress(b'\0' * 100)) + chunk(b'IEND', b'')


BAD = [
    ('non-image bytes', dict(content=b'hello, I am not an image', headers={'content-type': 'image/png'}), 422, 'expected a PNG or JPEG'),
    ('truncated PNG', dict(content=None, headers={'content-type': 'image/png'}), 422, 'expected a PNG or JPEG'),
    ('20,000 × 20,000 image', dict(content=big_png(20_000, 20_000), headers={'content-type': 'image/png'}), 413, 'at most 40,000,000 pixels'),
    ('JSON of the wrong shape', dict(json={'image': [[1, 2, 3]]}), 422, 'found (1, 3)'),
    ('out-of-range values', dict(json={'image': [[300] * 28] * 28}), 422, 'pixel values 0-255, found 300'),
    ('NaN', dict(content=b'{"image": [[NaN]]}', headers={'content-type': 'application/json'}), 422, 'expected shape'),
    ('NaN in a full image', dict(content=('{"image": [' + ','.join(['[' + ','.join(['NaN'] * 28) + ']'] * 28) + ']}').encode(),
                                 headers={'content-type': 'application/json'}), 422, 'NaN'),
    ('empty body', dict(content=b'', headers={'content-type': 'image/png'}), 422, 'empty body'),
    ('batch over the limit', dict(content=None, headers={'content-type': 'application/x-npy'}), 413, 'at most 300 images'),
    ('unknown content type', dict(content=b'x', headers={'content-type': 'text/plain'}), 415, 'found text/plain'),
    ('body over the limit', dict(content=b'\0' * (8 * 2**20 + 1), headers={'content-type': 'image/png'}), 413, 'body limit'),
]


@pytest.mark.parametrize('name,req,status,says', BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error_and_the_server_serves_the_next_request(server, test_images, name, req, status, says):
    x, _ = test_images
    if name == 'truncated PNG': req = {**req, 'content': png(x[0])[:60]}
    if name == 'batch over the limit': req = {**req, 'content': npy(np.zeros((301, 28, 28), np.uint8))}
    r = server.client.post('/v1/predict', **req)
    assert r.status_code == status, r.text
    assert says in r.json()['detail'], r.json()
    assert server.client.post('/v1/predict', json={'image': x[1].tolist()}).status_code == 200, "the server stays up"


def test_feedback_for_an_unknown_request_is_refused_and_known_feedback_is_stored(server, test_images):
    x, y = test_images
    r = server.client.post('/v1/feedback', json={'request_id': 'no-such-request', 'label': 1})
    assert r.status_code == 404 and 'no-such-request' in r.json()['detail']
    rid = server.client.post('/v1/predict', json={'image': x[2].tolist()}).json()['request_id']
    assert server.client.post('/v1/feedback', json={'request_id': rid, 'label': 42}).status_code == 422
    assert server.client.post('/v1/feedback', json={'request_id': rid, 'label': int(y[2])}).status_code == 200
    assert [f['label'] for f in read_log(server.log_dir, 'feedback') if f['request_id'] == rid] == [int(y[2])]


def test_metrics_count_requests_latency_and_predictions(server, test_images):
    x, _ = test_images
    before = server.client.get('/metrics').text
    count = lambda text, line: float(next((ln.split()[-1] for ln in text.splitlines() if ln.startswith(line)), 0))
    series = 'fmnist_requests_total{route="/v1/predict",status="200"}'
    server.client.post('/v1/predict', content=npy(x[:5]), headers={'content-type': 'application/x-npy'})
    after = server.client.get('/metrics').text
    assert count(after, series) == count(before, series) + 1
    assert count(after, 'fmnist_request_duration_seconds_count{route="/v1/predict",variant="champion"}') >= 1
    preds = sum(float(ln.split()[-1]) for ln in after.splitlines() if ln.startswith('fmnist_predictions_total{'))
    assert preds >= 5 and 'variant="champion"' in after


def test_docs_work_offline_and_the_schema_is_served(server):
    html = server.client.get('/docs').text
    assert '/openapi.json' in html and 'http://' not in html and 'https://' not in html, "no script from a CDN"
    paths = server.client.get('/openapi.json').json()['paths']
    assert {'/v1/predict', '/v1/feedback', '/v1/models', '/healthz', '/readyz', '/metrics'} <= set(paths)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    r = subprocess.run([str(BIN / 'schemathesis'), 'run', f'{server.url}/openapi.json', '--checks',
                        'not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance',
                        '--max-examples', '30', '--seed', '1', '--report', 'junit', '--report-dir', str(tmp_path)],
                       check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:]
    assert 'generated' in r.stdout, "schemathesis ran test cases"
    assert server.client.get('/readyz').status_code == 200


def test_a_bad_model_stops_the_server_at_start_with_a_clear_error(store, tmp_path):
    import shutil
    bad = tmp_path / 'bad'; shutil.copytree(store / 'cnn' / 'v1', bad)
    g = onnx_file(bad); g.write_bytes(g.read_bytes()[: len(g.read_bytes()) // 2])
    cases = [(str(bad), 'damaged or replaced'), ('cnn:v99', 'found v99'), (str(tmp_path / 'nothing'), 'found neither')]
    empty = tmp_path / 'empty'; (empty).mkdir(); (empty / 'model.json').write_text('{"kind": "cnn"}')
    cases.append((str(empty), 'expected model.safetensors'))
    for spec, says in cases:
        r = fmnist('serve', '--model', spec, '--store', str(store), '--port', str(free_port()), '--log-dir', str(tmp_path / 'l'), timeout=120)
        assert r.returncode == 1 and says in r.stderr, (spec, r.returncode, r.stderr[-800:])


# --- champion and challenger ----------------------------------------------------------------------
def test_promotion_and_rollback_under_load_fail_no_request(store, tmp_path, test_images):
    x, _ = test_images
    s = Served(store, tmp_path, '--model', 'champion')
    failures, seen, stop = [], [], threading.Event()

    def load():
        with httpx.Client(base_url=s.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                try:
                    r = c.post('/v1/predict', content=npy(x[i % 100]), headers={'content-type': 'application/x-npy'})
                    if r.status_code != 200: failures.append(r.status_code)
                    else: seen.append(r.json()['version'])
                except httpx.HTTPError as e: failures.append(repr(e))
                i += 1

    def wait_for(version):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if s.client.get('/v1/models').json()['variants']['champion']['version'] == version: return
            time.sleep(0.1)
        raise AssertionError(f"the server did not switch to {version}")
    threads = [threading.Thread(target=load) for _ in range(3)]
    try:
        for t in threads: t.start()
        time.sleep(1)
        assert fmnist('promote', 'cnn:v2', '--store', str(store), '--reason', 'test').returncode == 0
        wait_for('v2'); n_at_v2 = len(seen); time.sleep(1)
        assert fmnist('rollback', '--store', str(store)).returncode == 0
        wait_for('v1'); time.sleep(1)
    finally:
        stop.set()
        for t in threads: t.join()
        s.stop()
    assert failures == [], f"failed requests: {failures[:5]}"
    assert 'v2' in seen[:n_at_v2 + 200] and seen[-1] == 'v1' and len(seen) > 100
    events = json.loads((store / 'champions.json').read_text())['fashion-mnist']['events']
    assert [e['action'] for e in events][-2:] == ['promote', 'rollback']


def test_challenger_split_is_sticky_and_ab_reads_log_and_feedback(store, tmp_path, test_images):
    x, y = test_images
    s = Served(store, tmp_path, '--model', 'cnn:v1', '--challenger', 'cnn:v2', '--challenger-weight', '0.5')
    try:
        got = {}
        for i in range(200):
            cid = f'client-{i % 20}'
            r = s.client.post('/v1/predict', content=npy(x[i]), headers={'content-type': 'application/x-npy', 'x-client-id': cid}).json()
            got.setdefault(cid, set()).add(r['variant'])
            s.client.post('/v1/feedback', json={'request_id': r['request_id'], 'label': int(y[i])})
        assert all(len(v) == 1 for v in got.values()), "each client always lands on one variant"
        assert {v for vs in got.values() for v in vs} == {'champion', 'challenger'}
        assert 'fmnist_request_duration_seconds_count{route="/v1/predict",variant="challenger"}' in s.client.get('/metrics').text
    finally:
        s.stop()
    r = fmnist('ab', '--log-dir', str(s.log_dir), '--json')
    rep = json.loads(r.stdout)
    assert rep['variants']['champion']['n'] + rep['variants']['challenger']['n'] == 200
    assert rep['variants']['champion']['model'] == 'cnn:v1' and rep['variants']['challenger']['model'] == 'cnn:v2'
    assert rep['decision'] == 'keep' and 'needs 200 labelled' in rep['reason'], "100 labels each: below the rule's minimum"
    text = fmnist('ab', '--log-dir', str(s.log_dir), '--min-labels', '50').stdout
    assert 'rule: promote the challenger' in text and 'decision:' in text


# --- batch ----------------------------------------------------------------------------------------
def test_predict_reads_folders_idx_npy_and_reports_failed_inputs(store, tmp_path, test_images):
    x, _ = test_images
    d = tmp_path / 'in'; (d / 'photos').mkdir(parents=True)
    for i in range(3): Image.fromarray(x[i]).save(d / 'photos' / f'{i}.png')
    Image.fromarray(x[3]).resize((300, 300)).convert('RGB').save(d / 'photos' / 'big.jpg')
    np.save(d / 'batch.npy', x[4:10])
    (d / 'imgs-idx3-ubyte.gz').write_bytes(gzip.compress(struct.pack('>HBBIII', 0, 8, 3, 5, 28, 28) + x[10:15].tobytes()))
    (d / 'photos' / 'broken.png').write_bytes(png(x[0])[:50])
    out = tmp_path / 'preds.csv'
    r = fmnist('predict', str(d), '--model', 'cnn:v1', '--store', str(store), '-o', str(out), '-q')
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert 'broken.png' in r.stderr and 'images/s' in r.stdout
    import pandas as pd
    df = pd.read_csv(out)
    assert len(df) == 3 + 1 + 6 + 5 + 1 and df['error'].notna().sum() == 1
    model = OnnxModel(store / 'cnn' / 'v1')
    idx = df[df.source.str.endswith('.gz')].sort_values('index')
    assert idx['class'].tolist() == model.predict_proba(x[10:15]).argmax(1).tolist()
    ok = fmnist('predict', str(d / 'batch.npy'), '--model', 'cnn:v1', '--store', str(store), '-o', str(tmp_path / 'p.parquet'), '-q')
    assert ok.returncode == 0 and len(pd.read_parquet(tmp_path / 'p.parquet')) == 6


def test_the_serving_runtime_never_imports_torch(store, tmp_path):
    code = f"""
import sys, numpy as np
from fastapi.testclient import TestClient
from fmnist_lib.serve import Server, ServeConfig, create_app
with TestClient(create_app(Server(ServeConfig(model='cnn:v1', store_dir={str(store)!r}, log_dir={str(tmp_path)!r})))) as c:
    import time
    while c.get('/readyz').status_code != 200: time.sleep(0.05)
    assert c.post('/v1/predict', json={{'image': np.zeros((28, 28), int).tolist()}}).status_code == 200
print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))
"""
    r = subprocess.run([sys.executable, '-c', code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == '[]', f"torch was imported: {r.stdout[:300]}"


def test_concurrent_promotions_take_turns(tmp_path):
    "Four processes force-promote ten versions each at the same moment: champions.json stays valid JSON and records all 40 changes as one chain."
    from fmnist_lib.store import champion
    store = tmp_path / 'store'
    names = [f'w{w}v{i}' for w in range(4) for i in range(10)]
    for v in names:
        (store / 'm' / v).mkdir(parents=True)
        (store / 'm' / v / 'card.json').write_text(json.dumps({'name': 'm', 'version': v, 'metrics': {'val_acc': 0.5}, 'val_split': 's'}))
    script = ("import sys, time\nfrom fmnist_lib.store import promote\nw, store, start = sys.argv[1], sys.argv[2], float(sys.argv[3])\n"
              "while time.time() < start: time.sleep(0.001)\n"
              "for i in range(10): assert promote('t', f'{store}/m/w{w}v{i}', store, force=True, reason=f'w{w} {i}')\n")
    start = time.time() + 3   # every process starts promoting at once (a rendezvous, not a timing assertion)
    env = os.environ | {'FMNIST_LOG_LEVEL': 'ERROR'}
    procs = [subprocess.Popen([sys.executable, '-c', script, str(w), str(store), str(start)], env=env) for w in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    c = champion('t', store)   # read_json: valid JSON
    ev = c['events']
    assert sorted(e['to'] for e in ev) == sorted(f'm:{v}' for v in names), "a promotion was lost"
    assert ev[0]['from'] is None and all(a['to'] == b['from'] for a, b in zip(ev, ev[1:])), "the history is not one chain"
    assert [f"{p['name']}:{p['version']}" for p in c['previous']] == [e['to'] for e in ev[:-1]]
    assert f"m:{c['version']}" == ev[-1]['to']
    for w in range(4):   # each process's promotions in its own order
        assert [e['to'] for e in ev if e['to'].startswith(f'm:w{w}')] == [f'm:w{w}v{i}' for i in range(10)]
