"""An Evidently data-drift report of the monitoring day, as one self-contained HTML file.

Run by the monitor stage (fmnist_lib.stream.evidently_report) with the interpreter of .venv-evidently, the
environment `make evidently` creates from requirements.txt beside this file; it never imports fmnist_lib.

    .venv-evidently/bin/python deploy/evidently/report.py IN.npz OUT.html

IN.npz holds `classes` (class names), `reference` (the reference probabilities, n × classes: the served model's
validation outputs, the monitor's reference), `current` (the probabilities of the stream's windows compared with
it, m × classes), `window` (each current row's window index) and `phase` (each current row's phase). The report
is Evidently's DataDriftPreset over one column per class probability and the predicted class; OUT.html is
replaced atomically. One JSON line on stdout summarises Evidently's verdicts for the result file.
"""
import json, os, sys, tempfile, time
from pathlib import Path


def frames(z):
    "The reference and current tables: one column per class probability, and the predicted class."
    import numpy as np, pandas as pd
    classes = [str(c) for c in z['classes']]
    cols = [f"p({c})" for c in classes]
    def table(p):
        p = np.asarray(p, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(classes) or len(p) < 2:
            raise SystemExit(f"report.py: expected probabilities (n >= 2, {len(classes)}), found shape {p.shape}")
        df = pd.DataFrame(p, columns=cols)
        df['predicted class'] = pd.Categorical([classes[i] for i in p.argmax(1)], categories=classes)
        return df
    return table(z['reference']), table(z['current']), cols


def main(argv):
    if len(argv) != 3:
        raise SystemExit("usage: report.py IN.npz OUT.html")
    src, out = Path(argv[1]), Path(argv[2])
    t0 = time.perf_counter()
    import numpy as np
    from evidently import DataDefinition, Dataset, Report, __version__
    from evidently.presets import DataDriftPreset
    with np.load(src, allow_pickle=False) as z:
        ref, cur, cols = frames(z)
        windows = sorted({int(w) for w in z['window']})
        phases = sorted({str(p) for p in z['phase']})
    dd = DataDefinition(numerical_columns=cols, categorical_columns=['predicted class'])
    snap = Report([DataDriftPreset()]).run(Dataset.from_pandas(cur, data_definition=dd), Dataset.from_pandas(ref, data_definition=dd))
    # save_html(file object) writes nothing in Evidently 0.7.23 (only a path is handled): write its HTML ourselves
    html = snap.get_html_str(as_iframe=False)
    if '</html>' not in html[-2000:]:
        raise SystemExit(f"report.py: expected a whole HTML document from Evidently, found {len(html)} characters")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f'.{out.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(html)
            f.flush(); os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    columns, count = {}, None
    for m in snap.dict()['metrics']:
        cfg = m.get('config', {})
        if cfg.get('type', '').endswith(':DriftedColumnsCount'):
            count = m['value']
        elif cfg.get('type', '').endswith(':ValueDrift'):
            method, thr, v = cfg.get('method') or '', cfg.get('threshold'), m['value']
            # a p-value method drifts below its threshold, a distance method at or above it
            columns[cfg['column']] = {'method': method, 'threshold': thr, 'value': v,
                                      'drift': None if thr is None else bool(v < thr if 'p_value' in method else v >= thr)}
    print(json.dumps({'evidently': __version__, 'reference_rows': len(ref), 'current_rows': len(cur), 'windows': windows,
                      'phases': phases, 'drifted_columns': count, 'columns': columns,
                      'seconds': round(time.perf_counter() - t0, 2)}))


if __name__ == '__main__':
    main(sys.argv)
