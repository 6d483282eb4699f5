"""Shared fixtures: an isolated project root per test, the real Fashion-MNIST files, a loopback HTTP server."""
import functools, http.server, shutil, threading
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')


def _official_dir() -> Path | None:
    "A folder holding the official Fashion-MNIST .gz files: the project's data/raw, else the Debian package's."
    for d in (REPO / 'data' / 'raw' / 'fashion-mnist', DEBIAN_DIR):
        if all((d / f'{n}.gz').is_file() for n in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                                                   't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')):
            return d
    return None


@pytest.fixture(scope='session')
def official_dir() -> Path:
    d = _official_dir()
    if d is None:
        pytest.fail("the real Fashion-MNIST files are needed: run `make data` (or `fmnist data fetch`) first")
    return d


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    "An empty project root: everything fmnist writes during the test lands under it."
    root = tmp_path / 'project'
    root.mkdir()
    monkeypatch.setenv('FMNIST_ROOT', str(root))
    for v in ('FMNIST_DATA', 'FMNIST_MIRROR'):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv('FMNIST_RETRY_DELAY', '0')
    return root


@pytest.fixture
def copy_official(official_dir, tmp_path):
    "Copy the official files into a fresh folder and return it (tests corrupt their copy, never the original)."
    def make(name='src') -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in official_dir.glob('*-ubyte.gz'):
            shutil.copy(f, d / f.name)
        return d
    return make


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def http_server():
    "Start a static file server on 127.0.0.1 for a folder; return its base URL. Stopped after the test."
    servers = []

    def serve(folder: Path) -> str:
        srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(folder)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f'http://127.0.0.1:{srv.server_address[1]}/'
    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def files_under(p: Path) -> list:
    "Every file below `p` (relative paths), for asserting that nothing was written."
    return sorted(str(f.relative_to(p)) for f in p.rglob('*') if f.is_file()) if p.exists() else []


# --- skips are visible and rare ----------------------------------------------------------------------
# `make test` runs pytest with -rs (every skip and its reason is printed) and a skip whose reason is not
# below fails the session: a missing precondition must not pass silently. The list is empty on purpose;
# add a reason only with a comment saying why skipping there is right.
ALLOWED_SKIP_REASONS: tuple = ()
_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    bad = [(n, r) for n, r in _skipped if not any(a in r for a in ALLOWED_SKIP_REASONS)]
    if bad and exitstatus == 0:
        print(f"\n{len(bad)} test(s) skipped for a reason not on tests/conftest.py's ALLOWED_SKIP_REASONS:")
        for n, r in bad: print(f"  {n}: {r}")
        session.exitstatus = 1
