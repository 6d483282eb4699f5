"""JupyterLab as the workbench: `make lab` serves on 127.0.0.1, prints its URL with a token, and serves the project's
settings overrides (no news pop-up, the notebook's kernel started by itself)."""
import json, os, re, socket, subprocess, time
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "`make lab` on a free port with an empty $HOME; the URL and token are read from what it prints."
    port = _free_port()
    home = tmp_path_factory.mktemp('home')
    log = open(tmp_path_factory.mktemp('lab') / 'lab.log', 'w+')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('JUPYTER', 'FMNIST_ROOT'))} | {'HOME': str(home)}
    proc = subprocess.Popen(['make', '--no-print-directory', 'lab', f'LAB_ARGS=--port={port}'],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = re.compile(rf'http://127\.0\.0\.1:{port}/lab\?token=([0-9a-f]{{32,}})')
    deadline, m = time.time() + 180, None
    while time.time() < deadline and proc.poll() is None and not m:
        time.sleep(0.5); log.seek(0); m = url.search(log.read())
    log.seek(0); text = log.read()
    assert proc.poll() is None, f"make lab exited: {text[-3000:]}"
    assert m, f"make lab should print the loopback URL with its token: {text[-3000:]}"
    token = m.group(1)
    yield f'http://127.0.0.1:{port}', token, text
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


def test_lab_listens_on_loopback_only(lab):
    import psutil
    url, _, _ = lab
    port = int(url.rsplit(':', 1)[1])
    socks = [c for c in psutil.net_connections(kind='inet') if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert socks and all(c.laddr.ip in ('127.0.0.1', '::ffff:127.0.0.1') for c in socks), socks


def test_lab_serves_the_project_settings_overrides(lab):
    "JupyterLab's settings API answers with the values of .jupyter/overrides.json, which make installed into the venv."
    import urllib.request
    url, token, _ = lab
    want = json.loads((REPO / '.jupyter' / 'overrides.json').read_text())
    for plugin, values in want.items():
        with urllib.request.urlopen(f'{url}/lab/api/settings/{plugin}?token={token}', timeout=30) as r:
            schema = json.loads(r.read())['schema']   # the server folds overrides into the schema's defaults
            composite = {k: v.get('default') for k, v in schema['properties'].items()}
        assert {k: composite.get(k) for k in values} == values, (plugin, composite)
