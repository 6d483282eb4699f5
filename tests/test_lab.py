"""JupyterLab as the workbench: `make lab` serves on 127.0.0.1 with a token; a library notebook and an experiment
notebook with the smoke parameters are opened and run through JupyterLab's own UI in headless Chromium, and no cell
shows an error or anything on stderr."""
import json, os, re, shutil, socket, subprocess, time
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which('chromium') or '/usr/bin/chromium', shutil.which('chromedriver') or '/usr/bin/chromedriver'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "`make lab` with a known port and token, and an empty $HOME (JupyterLab keeps its state in the project's venv and .cache)."
    from fmnist_lib.pipeline import run
    if not (REPO / 'reports' / 'smoke' / 'index.json').is_file():
        run('smoke', echo=lambda s: None)
    port = _free_port()
    home = tmp_path_factory.mktemp('home')
    log = open(tmp_path_factory.mktemp('lab') / 'lab.log', 'w+')
    settings = home / 'lab-settings' / '@jupyterlab' / 'notebook-extension'
    settings.mkdir(parents=True)   # render every cell (not only those in view) so that the test can read each prompt
    (settings / 'tracker.jupyterlab-settings').write_text('{"windowingMode": "none"}')
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


def test_lab_listens_on_loopback_only(lab):
    import psutil
    url, _, _ = lab
    port = int(url.rsplit(':', 1)[1])
    socks = [c for c in psutil.net_connections(kind='inet') if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert socks and all(c.laddr.ip in ('127.0.0.1', '::ffff:127.0.0.1') for c in socks), socks


def _run_all_in_the_ui(driver, url: str, token: str, path: str, timeout: float = 300) -> dict:
    "Open `path` in JupyterLab, run every cell from the Run menu, wait for the kernel; return prompts and outputs."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(f'{url}/lab/tree/{path}?token={token}&reset')
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell'))
    status = lambda d: d.execute_script(
        "const e = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');"
        "return e ? e.getAttribute('data-status') : null;")
    wait.until(lambda d: status(d) == 'idle')
    run_menu = [e for e in driver.find_elements(By.CSS_SELECTOR, '.lm-MenuBar-item') if e.text.strip() == 'Run']
    assert run_menu, 'the Run menu is missing'
    run_menu[0].click()
    items = WebDriverWait(driver, 30).until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, '.lm-Menu-item')
                                                      if e.text.strip().startswith('Run All Cells')])
    items[0].click()
    WebDriverWait(driver, timeout, poll_frequency=1).until(lambda d: status(d) == 'idle' and not any(
        '[*]' in p.text for p in d.find_elements(By.CSS_SELECTOR, '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')))
    return driver.execute_script("""
        const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
        const cells = Array.from(nb.querySelectorAll('.jp-CodeCell'));
        return {prompts: cells.map(c => c.querySelector('.jp-InputPrompt').innerText.trim()),
                stderr: Array.from(nb.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')).map(e => e.innerText.slice(0, 500)),
                kernel: (nb.querySelector('.jp-KernelName') || {innerText: ''}).innerText};""")


@pytest.mark.parametrize('path', ['nbs/00_core.ipynb', 'reports/smoke/01_data_report.ipynb'])
def test_a_notebook_runs_top_to_bottom_in_jupyterlab(lab, chrome, path):
    url, token, _ = lab
    r = _run_all_in_the_ui(chrome, url, token, path)
    assert r['prompts'] and all(re.fullmatch(r'\[\d+\]:', p) for p in r['prompts']), f"{path}: every code cell should have run: {r['prompts']}"
    assert r['stderr'] == [], f"{path}: error or stderr output in JupyterLab: {r['stderr']}"
    assert 'fmnist' in r['kernel'], f"{path}: expected the project kernel, found {r['kernel']!r}"
    news = chrome.find_elements('xpath', "//*[contains(text(), 'official Jupyter news')]")
    assert not news, "the project's JupyterLab overrides (.jupyter/overrides.json, installed by make) should keep the news pop-up away"


def test_an_error_in_a_cell_is_seen(lab, chrome):
    "The check above is live: a notebook whose second cell raises shows the error and never runs its third cell."
    url, token, _ = lab
    d = REPO / '.cache' / 'lab-test'
    d.mkdir(parents=True, exist_ok=True)
    cell = lambda src: {'cell_type': 'code', 'execution_count': None, 'metadata': {}, 'outputs': [], 'source': src}
    nb = {'cells': [cell('x = 1'), cell("raise ValueError('on purpose')"), cell('y = 2')], 'nbformat': 4, 'nbformat_minor': 5,
          'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'Python 3 (fmnist)', 'language': 'python'}}}
    (d / 'broken.ipynb').write_text(json.dumps(nb))
    try:
        r = _run_all_in_the_ui(chrome, url, token, '.cache/lab-test/broken.ipynb')
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert r['prompts'][:2] == ['[1]:', '[2]:'] and r['prompts'][2] in ('[ ]:', '[]:', ''), r['prompts']
    assert any('on purpose' in e for e in r['stderr']), r
