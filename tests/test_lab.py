"""JupyterLab as the workbench: `make lab` serves on 127.0.0.1, prints its URL with a token, and serves the project's
settings overrides (no news pop-up, the notebook's kernel started by itself). A library notebook and an executed smoke
report are opened and run through JupyterLab's own UI in headless Chromium: every cell runs in the project's kernel and
none shows an error or anything on stderr.

Run All is clicked only once the notebook shows all its cells and the status bar reads the kernel as connected and idle.
The toolbar's execution indicator is no such sign: it reads 'idle' before the notebook has a kernel. Clicked then (a cold
clone, a slow first kernel start), Run All starts a second kernel beside the one JupyterLab is starting by itself, the
first kernel's connection is dropped, and the run stops after at most one cell."""
import json, os, re, shutil, socket, subprocess, time
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which('chromium') or '/usr/bin/chromium', shutil.which('chromedriver') or '/usr/bin/chromedriver'
KERNEL = 'Python 3 (fmnist)'   # the display name `make setup` gives the venv's kernel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "`make lab` on a free port with an empty $HOME; the URL and token are read from what it prints."
    port = _free_port()
    home = tmp_path_factory.mktemp('home')
    log = open(tmp_path_factory.mktemp('lab') / 'lab.log', 'w+')
    # the test's own user settings: render every cell, not only those in view, so that the test can read each prompt;
    # no autosave, so that the notebooks run in the UI are never written back (nbs/ is the library's source)
    for rel, value in (('notebook-extension/tracker', {'windowingMode': 'none'}), ('docmanager-extension/plugin', {'autosave': False})):
        f = home / 'lab-settings' / '@jupyterlab' / f'{rel}.jupyterlab-settings'
        f.parent.mkdir(parents=True, exist_ok=True); f.write_text(json.dumps(value))
    env = {k: v for k, v in os.environ.items() if not k.startswith(('JUPYTER', 'FMNIST_ROOT'))} | {
        'HOME': str(home), 'JUPYTERLAB_SETTINGS_DIR': str(home / 'lab-settings')}
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


@pytest.fixture(scope='module')
def chrome(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    assert Path(CHROMIUM).exists() and Path(DRIVER).exists(), "Chromium and ChromeDriver come from `make test` (Debian chromium, chromium-driver)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
              '--no-first-run', '--disable-sync', '--disable-dev-shm-usage', '--window-size=1366,900',
              f'--user-data-dir={tmp_path_factory.mktemp("chromium")}'):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


# What the UI shows of the notebook in front: its code cells' prompts, the status bar's kernel item ('<kernel> | <status>',
# the session's own display status: 'Idle' only once the kernel is connected and idle), open dialogs, and outputs.
_UI_STATE = """
const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
const cells = nb ? Array.from(nb.querySelectorAll('.jp-Notebook .jp-CodeCell')) : [];
const items = Array.from(document.querySelectorAll('#jp-main-statusbar .jp-StatusBar-TextItem')).map(e => e.innerText.trim());
const out = t => nb ? Array.from(nb.querySelectorAll(`.jp-OutputArea-output[data-mime-type="${t}"]`)).map(e => e.innerText.slice(0, 500)) : [];
return {prompts: cells.map(c => { const p = c.querySelector('.jp-InputPrompt'); return p ? p.innerText.trim() : '?'; }),
        kernel: items.find(t => / \\| /.test(t)) || '',
        dialogs: Array.from(document.querySelectorAll('.jp-Dialog')).map(e => e.innerText.slice(0, 300)),
        stderr: out('application/vnd.jupyter.stderr'), stdout: out('application/vnd.jupyter.stdout')};
"""


def _menu(driver, menu: str, item: str):
    "Click `item` in the menu bar's `menu`, as a user would."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    top = [e for e in driver.find_elements(By.CSS_SELECTOR, '.lm-MenuBar-item') if e.text.strip() == menu]
    assert top, f'the {menu} menu is missing'
    top[0].click()
    found = WebDriverWait(driver, 30).until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, '.lm-Menu-item')
                                                      if e.is_displayed() and e.text.strip().startswith(item)])
    found[0].click()


def _run_all_in_the_ui(driver, url: str, token: str, path: str, timeout: float = 240) -> dict:
    "Open `path` in JupyterLab; once its kernel is ready, clear the outputs and run every cell from the Run menu; return what the UI shows."
    from selenium.webdriver.support.ui import WebDriverWait
    n = sum(c['cell_type'] == 'code' for c in json.loads((REPO / path).read_text())['cells'])
    driver.get(f'{url}/lab/tree/{path}?token={token}&reset')
    seen = {}
    def ui(d):
        seen.update(d.execute_script(_UI_STATE)); return seen
    def wait(what, until, secs=timeout):
        try:
            return WebDriverWait(driver, secs, poll_frequency=0.5).until(lambda d: until(ui(d)))
        except Exception as e:   # say what the UI showed instead of selenium's empty message
            raise AssertionError(f"{path}: {what}; the UI showed {seen}") from e
    # a kernel that is connected and idle, all cells shown, no dialog in the way (the first kernel start may take a while)
    wait('the kernel should be ready and every cell shown',
         lambda s: s['kernel'].endswith('| Idle') and len(s['prompts']) == n and not s['dialogs'])
    _menu(driver, 'Edit', 'Clear Outputs of All Cells')   # a report comes with numbered prompts; start from none
    wait('clearing the outputs should leave no numbered prompt', lambda s: not any(re.search(r'\d', p) for p in s['prompts']), 60)
    _menu(driver, 'Run', 'Run All Cells')
    # done: nothing queued or running, the kernel idle, and every cell numbered or an error shown (which stops the run)
    wait('every cell should run', lambda s: not any('*' in p for p in s['prompts']) and s['kernel'].endswith('| Idle')
         and (all(re.fullmatch(r'\[\d+\]:', p) for p in s['prompts']) or s['stderr']))
    return dict(seen)


@pytest.fixture(scope='module')
def smoke_report():
    "The data report of the smoke profile, executed by papermill (`make test` has run the smoke profile already)."
    path = 'reports/smoke/01_data_report.ipynb'
    if not (REPO / path).is_file():
        from fmnist_lib.pipeline import run
        run('smoke', stages=['data_report'], root=REPO, echo=lambda s: None)
    return path


def test_the_library_and_a_report_run_top_to_bottom_in_jupyterlab(lab, chrome, smoke_report):
    url, token, _ = lab
    for path in ('nbs/00_core.ipynb', smoke_report):
        r = _run_all_in_the_ui(chrome, url, token, path)
        # a fresh kernel runs the cells one after the other: 1, 2, 3, ... (a cell left out or run twice breaks the row)
        assert r['prompts'] == [f'[{i}]:' for i in range(1, len(r['prompts']) + 1)], f"{path}: every code cell should have run once, in order: {r['prompts']}"
        assert r['stderr'] == [], f"{path}: error or stderr output in JupyterLab: {r['stderr']}"
        assert r['kernel'].startswith(f'{KERNEL} |'), f"{path}: expected the project's kernel, found {r['kernel']!r}"
    news = chrome.find_elements('xpath', "//*[contains(text(), 'official Jupyter news')]")
    assert not news, "the project's JupyterLab overrides (.jupyter/overrides.json, installed by make) should keep the news pop-up away"


def test_an_error_in_a_cell_is_seen_and_the_kernel_is_the_projects(lab, chrome):
    "The check above is live: a notebook whose second cell raises shows the error and never runs its third; its kernel is the venv's."
    url, token, _ = lab
    d = REPO / 'build' / f'lab-test-{os.getpid()}'   # not under a hidden folder such as .cache: JupyterLab does not open those
    d.mkdir(parents=True, exist_ok=True)
    cell = lambda src: {'cell_type': 'code', 'execution_count': None, 'metadata': {}, 'outputs': [], 'source': src}
    nb = {'cells': [cell('import sys; print(sys.prefix)'), cell("raise ValueError('on purpose')"), cell('y = 2')],
          'nbformat': 4, 'nbformat_minor': 5,
          'metadata': {'kernelspec': {'name': 'python3', 'display_name': KERNEL, 'language': 'python'}}}
    (d / 'broken.ipynb').write_text(json.dumps(nb))
    try:
        r = _run_all_in_the_ui(chrome, url, token, str((d / 'broken.ipynb').relative_to(REPO)))
    finally:
        shutil.rmtree(d, ignore_errors=True)
        if not any(d.parent.iterdir()): d.parent.rmdir()
    assert r['prompts'][:2] == ['[1]:', '[2]:'] and r['prompts'][2] in ('[ ]:', '[]:', ''), r['prompts']
    assert any('on purpose' in e for e in r['stderr']), r
    assert [Path(o.strip()).resolve() for o in r['stdout']] == [(REPO / '.venv').resolve()], f"the kernel should be the project's venv: {r}"
