"""Makefile targets that change the user's files: `make clean` removes only what is cheap to rebuild."""
import shutil, subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_clean_keeps_the_model_store_and_searches(tmp_path):
    shutil.copy(REPO / 'Makefile', tmp_path / 'Makefile')
    keep = ['reports/models/cnn/v1/model.json', 'reports/models/champions.json', 'reports/sweeps/s/summary.json',
            'reports/tune/t/best.yaml', 'reports/bench/default/benchmark.json', 'reports/README.md', 'data/raw/fashion-mnist/x.gz']
    gone = ['reports/smoke/index.json', 'reports/default/runs/cnn-s0/metrics.json', 'data/processed/c.npz', 'book/_build/html/index.html']
    for f in keep + gone:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True); (tmp_path / f).write_text('x')
    r = subprocess.run(['make', 'clean'], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [f for f in keep if not (tmp_path / f).exists()] == [], "make clean removed what it must keep"
    assert [f for f in gone if (tmp_path / f).exists()] == [], "make clean left generated files"
    r = subprocess.run(['make', 'clean-models'], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (tmp_path / 'reports' / 'models').exists()
    assert (tmp_path / 'reports' / 'sweeps' / 's' / 'summary.json').exists()
