"""Every experiment notebook runs on the smoke profile (the habit of running every experiment config fast)."""
import json
from pathlib import Path
import papermill as pm

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / 'nbs' / 'experiments'


def test_data_report_runs_and_writes_results(tmp_path, official_dir):
    out = tmp_path / 'smoke'
    out.mkdir()
    pm.execute_notebook(str(EXP / '01_data_report.ipynb'), str(out / '01_data_report.ipynb'),
                        parameters=dict(profile='smoke', out_dir=str(out), val_size=500, samples_per_class=3),
                        progress_bar=False, cwd=str(EXP))
    res = json.loads((out / 'data_report.json').read_text())
    from fmnist_lib.data import get_dataset
    assert res['provenance']['profile'] == 'smoke' and res['provenance']['parameters']['val_size'] == 500
    assert res['provenance']['data_checksum'] == res['validation']['checksum']
    assert res['provenance']['hardware']['cores'] >= 1 and 'commit' in res['provenance']['git']
    assert res['metrics']['n_val'] == 500 and res['metrics']['n_train'] == 59500
    assert res['validation']['splits']['val']['class_counts'] == [50] * 10
    assert {r: f['content_sha256'] for r, f in res['manifest']['files'].items()} == \
        {r: f.sha256 for r, f in get_dataset('fashion-mnist').files.items()}
    nb = json.loads((out / '01_data_report.ipynb').read_text())
    images = sum('image/png' in o.get('data', {}) for c in nb['cells'] for o in c.get('outputs', []))
    assert images >= 3, "the report should show the sample grid, the class balance and the mean images"
