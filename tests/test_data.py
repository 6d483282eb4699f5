"""The data path end to end: fetch, verify, cache, validate, and every kind of bad input."""
import dataclasses, gzip, hashlib, socket, struct, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from fmnist_lib import data as D
from conftest import files_under

ROLES = D.ROLES
REAL = D.get_dataset('fashion-mnist')


# --- helpers ---------------------------------------------------------------------------------
def idx(a: np.ndarray, magic: bytes | None = None) -> bytes:
    head = magic if magic is not None else bytes([0, 0, 8, a.ndim])
    return head + struct.pack(f'>{a.ndim}I', *a.shape) + a.astype('u1').tobytes()


def toy_files(folder: Path, n_train=20, n_test=10, **override) -> dict:
    "Write a tiny dataset as IDX .gz files; `override` replaces a role's content. Return {role: content}."
    rng = np.random.default_rng(0)
    contents = {
        'train_images': idx(rng.integers(0, 256, (n_train, 28, 28))),
        'train_labels': idx(np.arange(n_train) % 10),
        'test_images': idx(rng.integers(0, 256, (n_test, 28, 28))),
        'test_labels': idx(np.arange(n_test) % 10),
    } | override
    folder.mkdir(parents=True, exist_ok=True)
    for r, c in contents.items():
        (folder / f"{REAL.files[r].name}.gz").write_bytes(gzip.compress(c))
    return contents


@pytest.fixture
def toy(monkeypatch):
    "Register a dataset 'toy' whose checksums match the given contents, so structural checks are what fail."
    def register(contents: dict):
        files = {r: D.IdxFile(REAL.files[r].name, hashlib.sha256(c).hexdigest()) for r, c in contents.items()}
        spec = D.DatasetSpec('toy', REAL.classes, files)
        monkeypatch.setitem(D.DATASETS, 'toy', spec)
        return spec
    return register


@pytest.fixture
def no_system_copy(monkeypatch):
    "Pretend the Debian package is absent, so fetch has to use the mirror."
    monkeypatch.setitem(D.DATASETS, 'fashion-mnist', dataclasses.replace(REAL, system_dirs=()))


def assert_nothing_written(project: Path):
    assert files_under(project / 'data' / 'processed') == [], "a failed load must cache nothing"
    assert not (project / 'data' / 'raw' / 'toy' / 'manifest.json').exists()
    assert not (project / 'data' / 'raw' / 'fashion-mnist' / 'manifest.json').exists()


# --- the real data -----------------------------------------------------------------------------
def test_fetch_verifies_copies_and_records_lineage(project, official_dir):
    m = D.fetch(data_dir=official_dir, progress=False)
    raw = project / 'data' / 'raw' / 'fashion-mnist'
    assert m['source'] == f'explicit:{official_dir.resolve()}'
    assert {r: m['files'][r]['content_sha256'] for r in ROLES} == {r: REAL.files[r].sha256 for r in ROLES}
    assert sorted(p.name for p in raw.iterdir()) == sorted([f.gz for f in REAL.files.values()] + ['manifest.json'])
    assert D.read_json(raw / 'manifest.json')['checksum'] == m['checksum']
    assert m['fmnist_lib_version'] and m['fetched_at']


def test_load_caches_by_content_hash(project, official_dir):
    d1 = D.load(data_dir=official_dir, val_size=5000)
    cache = project / 'data' / 'processed' / f"fashion-mnist-{d1.checksum[:16]}.npz"
    assert cache.is_file()
    d2 = D.load(val_size=5000)  # now from data/raw + cache
    assert d2.checksum == d1.checksum
    for a in ('x_train', 'y_train', 'x_val', 'y_val', 'x_test', 'y_test'):
        np.testing.assert_array_equal(getattr(d1, a), getattr(d2, a))


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_a_damaged_cache_is_rebuilt(project, official_dir, damage):
    "A half-written or corrupted data/processed/*.npz (BadZipFile, EOFError) is rebuilt from the verified files, not fatal."
    d1 = D.load(data_dir=official_dir, val_size=5000)
    cache = project / 'data' / 'processed' / f"fashion-mnist-{d1.checksum[:16]}.npz"
    good = cache.read_bytes()
    cache.write_bytes({'truncated': good[:len(good) // 2], 'garbage': b'not a zip file at all', 'empty': b''}[damage])
    d2 = D.load(val_size=5000)
    for a in ('x_train', 'y_train', 'x_val', 'y_val', 'x_test', 'y_test'):
        np.testing.assert_array_equal(getattr(d1, a), getattr(d2, a))
    with np.load(cache) as z:  # and the cache is whole again
        assert z['train_images'].shape == (60000, 28, 28)


def test_real_data_schema_balance_and_leakage(project, official_dir):
    d = D.load(data_dir=official_dir, val_size=5000, seed=0)
    assert d.x_train.shape == (55000, 28, 28) and d.x_val.shape == (5000, 28, 28) and d.x_test.shape == (10000, 28, 28)
    assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int64
    rep = D.validate(d)
    for split, n in (('train', 5500), ('val', 500), ('test', 1000)):
        s = rep['splits'][split]
        assert s['label_set'] == list(range(10))
        assert s['class_counts'] == [n] * 10
        assert (s['pixel_min'], s['pixel_max']) == (0, 255)
    assert rep['leakage']['train~test']['pairs'] == 0
    assert len(np.intersect1d(d.train_idx, d.val_idx)) == 0
    assert sorted(np.r_[d.train_idx, d.val_idx].tolist()) == list(range(60000))


def test_validation_split_is_seeded(project, official_dir):
    a = D.load(data_dir=official_dir, val_size=1000, seed=1)
    b = D.load(val_size=1000, seed=1)
    c = D.load(val_size=1000, seed=2)
    np.testing.assert_array_equal(a.val_idx, b.val_idx)
    assert not np.array_equal(a.val_idx, c.val_idx)


def test_duplicates_are_found_across_splits(project, official_dir):
    d = D.load(data_dir=official_dir, test_size=100)
    d.x_test[:3] = d.x_train[[10, 20, 30]]  # plant three train images into the test set
    leak = D.validate(d)['leakage']['train~test']
    assert leak['pairs'] == 3
    assert [p[1] for p in leak['examples']] == [0, 1, 2]


def test_torchvision_loads_the_laid_out_files(project, official_dir):
    import torchvision
    D.fetch(data_dir=official_dir, progress=False)
    ds = torchvision.datasets.FashionMNIST(D.torchvision_root(), train=True, download=False)
    np.testing.assert_array_equal(ds.data.numpy(), D.load().x_train)
    np.testing.assert_array_equal(ds.targets.numpy(), D.load().y_train)


# --- bad input: each names the thing, the expected and the found value, and caches nothing ---
def test_truncated_gz(project, copy_official):
    src = copy_official()
    f = src / 'train-images-idx3-ubyte.gz'
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(D.DataError, match=r'train-images-idx3-ubyte.gz: expected a complete gzip file, found a truncated'):
        D.load(data_dir=src)
    assert_nothing_written(project)


def test_checksum_mismatch_names_file_and_both_checksums(project, copy_official):
    src = copy_official()
    f = src / 't10k-labels-idx1-ubyte.gz'
    content = bytearray(gzip.decompress(f.read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed: still valid IDX, different content
    f.write_bytes(gzip.compress(bytes(content)))
    got = hashlib.sha256(content).hexdigest()
    with pytest.raises(D.ChecksumError) as e:
        D.load(data_dir=src)
    msg = str(e.value)
    assert str(f) in msg and got in msg and REAL.files['test_labels'].sha256 in msg
    assert_nothing_written(project)


def test_missing_file(project, copy_official):
    src = copy_official()
    (src / 't10k-labels-idx1-ubyte.gz').unlink()
    with pytest.raises(D.DataError, match=r'expected the fashion-mnist files t10k-labels-idx1-ubyte.gz'):
        D.load(data_dir=src)
    assert_nothing_written(project)


def test_wrong_magic_number(project, tmp_path, toy):
    bad = idx(np.zeros((20, 28, 28)), magic=bytes([0, 0, 8, 1]))  # declares 1 dimension
    toy(toy_files(tmp_path / 'toy', train_images=bad))
    with pytest.raises(D.DataError, match=r'train-images-idx3-ubyte.gz: magic number 0x00000801 declares 1 dimension\(s\), expected 3'):
        D.load('toy', data_dir=tmp_path / 'toy')
    assert_nothing_written(project)
    garbage = b'\x1f\x8b' + bytes(40)
    toy(toy_files(tmp_path / 'toy2', train_labels=garbage))
    with pytest.raises(D.DataError, match=r'train-labels-idx1-ubyte.gz: wrong magic number 0x1f8b0000'):
        D.load('toy', data_dir=tmp_path / 'toy2')
    assert_nothing_written(project)


def test_image_label_count_mismatch(project, tmp_path, toy):
    toy(toy_files(tmp_path / 'toy', train_labels=idx(np.arange(19) % 10)))
    with pytest.raises(D.DataError, match=r'expected one label per image, found 20 images and 19 labels'):
        D.load('toy', data_dir=tmp_path / 'toy')
    assert_nothing_written(project)


def test_label_outside_class_range(project, tmp_path, toy):
    labels = np.arange(20) % 10
    labels[7] = 12
    toy(toy_files(tmp_path / 'toy', train_labels=idx(labels)))
    with pytest.raises(D.DataError, match=r'labels: expected values 0–9 \(10 classes\), found 12 at index 7'):
        D.load('toy', data_dir=tmp_path / 'toy')
    assert_nothing_written(project)


def test_truncated_idx_inside_valid_gz(project, tmp_path, toy):
    short = idx(np.zeros((20, 28, 28)))[:-784]
    toy(toy_files(tmp_path / 'toy', train_images=short))
    with pytest.raises(D.DataError, match=r'header declares shape \(20, 28, 28\) = 15680 bytes of data, found 14896 bytes \(truncated\)'):
        D.load('toy', data_dir=tmp_path / 'toy')
    assert_nothing_written(project)


def test_gzip_bomb_is_refused_without_filling_memory(project, copy_official):
    "A small .gz that inflates past the IDX size limit stops at the limit with a clear error."
    src = copy_official()
    f = src / 'train-labels-idx1-ubyte.gz'
    with gzip.open(f, 'wb', compresslevel=9) as g:   # ~65 KB on disk, 80 MiB inflated
        for _ in range(80): g.write(bytes(1 << 20))
    assert f.stat().st_size < 1 << 20
    with pytest.raises(D.DataError, match=r'train-labels-idx1-ubyte.gz: expected at most 67,108,864 bytes decompressed, found more'):
        D.load(data_dir=src)
    assert_nothing_written(project)


def test_bad_split_sizes(project, official_dir):
    with pytest.raises(D.DataError, match=r'val_size: expected between 0 and 60000, found 70000'):
        D.load(data_dir=official_dir, val_size=70000)
    with pytest.raises(D.DataError, match=r"val_size: expected a count or a fraction, found '10'"):
        D.load(val_size='10')


# --- downloads, against a loopback server ---------------------------------------------------
def test_download_from_mirror(project, copy_official, http_server, no_system_copy):
    url = http_server(copy_official('mirror'))
    m = D.fetch(mirror=url, progress=False, retries=1)
    assert m['source'] == f'mirror:{url}'
    assert m['file_sources']['train_images'] == url + 'train-images-idx3-ubyte.gz'
    raw = project / 'data' / 'raw' / 'fashion-mnist'
    assert not list(raw.glob('.partial-*'))
    assert D.verify()['checksum'] == m['checksum']


def test_download_of_a_corrupt_file_is_rejected(project, copy_official, http_server, no_system_copy):
    mirror = copy_official('mirror')
    f = mirror / 't10k-images-idx3-ubyte.gz'
    content = bytearray(gzip.decompress(f.read_bytes()))
    content[-1] ^= 0xFF
    f.write_bytes(gzip.compress(bytes(content)))
    url = http_server(mirror)
    with pytest.raises(D.ChecksumError) as e:
        D.fetch(mirror=url, progress=False, retries=1)
    assert url + 't10k-images-idx3-ubyte.gz' in str(e.value)
    assert hashlib.sha256(content).hexdigest() in str(e.value) and REAL.files['test_images'].sha256 in str(e.value)
    assert files_under(project / 'data') == [], "nothing from a bad download may stay"


def test_download_over_the_size_cap_is_refused(project, tmp_path, http_server):
    (tmp_path / 'big').mkdir(); (tmp_path / 'big' / 'f.gz').write_bytes(bytes(5000))
    url = http_server(tmp_path / 'big')
    with pytest.raises(D.DownloadError, match=rf'{url}f.gz: expected at most 1,000 bytes, found a file of 5,000'):
        D.download(url + 'f.gz', project / 'f.gz', retries=3, progress=False, max_bytes=1000)
    assert files_under(project) == [], "no partial file stays"


def test_download_past_its_deadline_gives_up(project):
    "A server that trickles bytes forever is abandoned at the overall deadline, not retried without end."
    import http.server, threading, time

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header('Content-Length', '10000000'); self.end_headers()
            try:
                for _ in range(50):  # 1 kB every 0.2 s: never silent long enough for the per-read timeout
                    self.wfile.write(b'x' * 1000); self.wfile.flush(); time.sleep(0.2)
            except OSError: pass
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Trickle)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f'http://127.0.0.1:{srv.server_address[1]}/f.gz'
        with pytest.raises(D.DownloadError, match=rf'{url}: expected the download within 1 s'):
            D.download(url, project / 'f.gz', timeout=5, retries=3, progress=False, max_bytes=1 << 30, deadline_s=1)
    finally:
        srv.shutdown(); srv.server_close()
    assert files_under(project) == []


def test_unreachable_mirror(project, no_system_copy):
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/'
    with pytest.raises(D.DownloadError, match=rf'{url}train-images-idx3-ubyte.gz: could not download after 2 tries'):
        D.fetch(mirror=url, progress=False, retries=2, timeout=2)
    assert files_under(project / 'data') == []


def test_mirror_without_the_file(project, copy_official, http_server, no_system_copy):
    mirror = copy_official('mirror')
    (mirror / 't10k-labels-idx1-ubyte.gz').unlink()
    url = http_server(mirror)
    with pytest.raises(D.DownloadError, match=r't10k-labels-idx1-ubyte.gz: expected the file, the server answered HTTP 404'):
        D.fetch(mirror=url, progress=False, retries=1)
    assert files_under(project / 'data') == []


# --- the command line -------------------------------------------------------------------------
def fmnist(*args, env=None):
    exe = Path(sys.executable).parent / 'fmnist'
    return subprocess.run([str(exe), *args], check=False, capture_output=True, text=True, env=env, timeout=300)


def test_cli_verify_passes_then_fails_on_corruption(project, copy_official):
    import os
    src = copy_official()
    env = os.environ | {'FMNIST_ROOT': str(project)}
    r = fmnist('data', 'verify', '--data-dir', str(src), env=env)
    assert r.returncode == 0, r.stderr
    assert 'all 4 files match the published checksums' in r.stdout
    f = src / 'train-labels-idx1-ubyte.gz'
    content = bytearray(gzip.decompress(f.read_bytes()))
    content[-1] = (content[-1] + 1) % 10
    f.write_bytes(gzip.compress(bytes(content)))
    r = fmnist('data', 'verify', '--data-dir', str(src), env=env)
    assert r.returncode == 1
    assert r.stderr.count('\n') == 1 and r.stderr.startswith('fmnist: error: ')
    assert 'train-labels-idx1-ubyte.gz: SHA-256 of the decompressed content is' in r.stderr


def test_cli_fetch_and_info(project, official_dir):
    import os, json
    env = os.environ | {'FMNIST_ROOT': str(project)}
    r = fmnist('data', 'fetch', '--data-dir', str(official_dir), '--quiet', env=env)
    assert r.returncode == 0, r.stderr
    assert (project / 'data' / 'raw' / 'fashion-mnist' / 'manifest.json').is_file()
    r = fmnist('data', 'info', '--json', env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info['train'] == [60000, 28, 28] and info['test_class_counts'] == [1000] * 10
    assert info['checksum'] == D.verify()['checksum']
