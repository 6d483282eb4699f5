"""The alerting files (deploy/prometheus/): Prometheus' config and alert rules pass promtool, the rules' unit tests pass
`promtool test rules` and a wrong expectation fails them, Alertmanager's config passes amtool, every address is loopback,
and every metric the rules read is one the server or the monitor exposes."""
import re, shutil, subprocess
from pathlib import Path
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / 'deploy' / 'prometheus'
PACKAGE = {'promtool': 'prometheus', 'amtool': 'prometheus-alertmanager'}


def tool(name: str) -> str:
    exe = shutil.which(name)
    assert exe, (f"{name} is not installed: `make test` installs it (Debian package {PACKAGE[name]}, in the Makefile's "
                 f"DEB_TEST), or run `apt-get install --no-install-recommends {PACKAGE[name]}`")
    return exe


def run(*cmd, cwd=PROM):
    return subprocess.run([tool(cmd[0]), *map(str, cmd[1:])], check=False, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_rules_pass_promtool_check():
    r = run('promtool', 'check', 'rules', PROM / 'rules.yml')
    assert r.returncode == 0 and 'SUCCESS: 4 rules found' in r.stdout, r.stdout + r.stderr


def test_rules_unit_tests_pass():
    r = run('promtool', 'test', 'rules', PROM / 'rules_test.yml')
    assert r.returncode == 0, r.stdout + r.stderr


def test_rules_unit_tests_check_every_alert_firing_and_not_firing():
    "Each alert has a case where it fires and one where it must not (an empty exp_alerts)."
    rules = [r['alert'] for g in yaml.safe_load((PROM / 'rules.yml').read_text())['groups'] for r in g['rules']]
    cases = [c for t in yaml.safe_load((PROM / 'rules_test.yml').read_text())['tests'] for c in t['alert_rule_test']]
    fires = {c['alertname'] for c in cases if c.get('exp_alerts')}
    quiet = {c['alertname'] for c in cases if c.get('exp_alerts') == []}
    assert set(rules) == {'FmnistDriftDetected', 'FmnistAccuracyDrop', 'FmnistHighErrorRate', 'FmnistLatencyP95High'}
    assert fires == set(rules) and quiet == set(rules), (fires, quiet)
    assert all('for' in r for g in yaml.safe_load((PROM / 'rules.yml').read_text())['groups'] for r in g['rules']), \
        "every alert holds its condition with for:"


WRONG = {  # a changed expectation -> promtool must exit 1
    'a different severity on the firing drift alert': ('exp_labels: {severity: warning, detector: ks', 'exp_labels: {severity: critical, detector: ks'),
    'the latency alert expected on the fast series': ('- eval_time: 4m\n        alertname: FmnistLatencyP95High\n        exp_alerts: []',
                                                      '- eval_time: 4m\n        alertname: FmnistLatencyP95High\n        exp_alerts:\n          - exp_labels: {severity: warning}'),
    'the drift alert firing after a single low window': ('- eval_time: 10s       # first low window: pending, not firing\n        alertname: FmnistDriftDetected\n        exp_alerts: []',
                                                         '- eval_time: 10s\n        alertname: FmnistDriftDetected\n        exp_alerts:\n          - exp_labels: {severity: warning, detector: ks, job: fmnist-drift}'),
}


@pytest.mark.parametrize('what', WRONG)
def test_a_wrong_expectation_fails_the_rules_unit_tests(tmp_path, what):
    old, new = WRONG[what]
    text = (PROM / 'rules_test.yml').read_text()
    assert text.count(old) >= 1, f"rules_test.yml no longer contains {old!r}: update this test"
    shutil.copy(PROM / 'rules.yml', tmp_path / 'rules.yml')
    (tmp_path / 'rules_test.yml').write_text(text.replace(old, new, 1))
    r = run('promtool', 'test', 'rules', tmp_path / 'rules_test.yml', cwd=tmp_path)
    assert r.returncode == 1, f"promtool accepted {what}:\n{r.stdout}{r.stderr}"
    assert 'FAILED' in r.stdout + r.stderr, r.stdout + r.stderr


def test_prometheus_config_passes_promtool_and_stays_on_loopback():
    from fmnist_lib.monitor import DRIFT_PORT
    r = run('promtool', 'check', 'config', PROM / 'prometheus.yml')
    assert r.returncode == 0 and 'SUCCESS' in r.stdout, r.stdout + r.stderr
    cfg = yaml.safe_load((PROM / 'prometheus.yml').read_text())
    assert cfg['rule_files'] == ['rules.yml']
    jobs = {j['job_name']: [t for s in j['static_configs'] for t in s['targets']] for j in cfg['scrape_configs']}
    assert jobs == {'fmnist-serve': ['127.0.0.1:8000'], 'fmnist-drift': [f'127.0.0.1:{DRIFT_PORT}']}, jobs
    am = [t for a in cfg['alerting']['alertmanagers'] for s in a['static_configs'] for t in s['targets']]
    assert am and all(t.startswith('127.0.0.1:') for t in am), am


def test_alertmanager_config_passes_amtool_and_posts_to_a_loopback_webhook():
    r = run('amtool', 'check-config', PROM / 'alertmanager.yml')
    assert r.returncode == 0 and 'SUCCESS' in r.stdout, r.stdout + r.stderr
    cfg = yaml.safe_load((PROM / 'alertmanager.yml').read_text())
    hooks = [w for rc in cfg['receivers'] for w in rc.get('webhook_configs', [])]
    assert hooks and all(w['url'].startswith('http://127.0.0.1:') and w['send_resolved'] is True for w in hooks), hooks
    assert cfg['route']['receiver'] in {rc['name'] for rc in cfg['receivers']}


def test_amtool_refuses_a_broken_config(tmp_path):
    "The check can fail: a route to a receiver that does not exist."
    bad = tmp_path / 'alertmanager.yml'
    bad.write_text((PROM / 'alertmanager.yml').read_text().replace('receiver: fmnist-webhook', 'receiver: nobody', 1))
    r = run('amtool', 'check-config', bad, cwd=tmp_path)
    assert r.returncode != 0 and 'nobody' in r.stdout + r.stderr, r.stdout + r.stderr


def exposed_names() -> set:
    "Every series name the server (fmnist_lib/serve.py's metrics) and the monitor (DriftMetrics) expose."
    from fmnist_lib.monitor import DriftMetrics
    names = set()
    for kind, name in re.findall(r"\b(Counter|Histogram|Gauge)\('(fmnist_\w+)'", (REPO / 'fmnist_lib' / 'serve.py').read_text()):
        names |= {f'{name}_total'} if kind == 'Counter' else {f'{name}_bucket', f'{name}_sum', f'{name}_count'} if kind == 'Histogram' else {name}
    dm = DriftMetrics()
    dm.p_value.labels('ks').set(0.5); dm.accuracy.set(0.9); dm.window_size.set(100)
    names |= {l.split('{')[0].split()[0] for l in dm.text().splitlines() if l and not l.startswith('#')}
    return names


def test_every_metric_the_rules_read_is_exposed():
    exprs = [r['expr'] for g in yaml.safe_load((PROM / 'rules.yml').read_text())['groups'] for r in g['rules']]
    used = {n for e in exprs for n in re.findall(r'\bfmnist_\w+', e)}
    have = exposed_names()
    assert {'fmnist_request_duration_seconds_bucket', 'fmnist_requests_total', 'fmnist_drift_p_value',
            'fmnist_estimated_accuracy', 'fmnist_window_size'} <= have, have
    assert used and used <= have, f"the rules read metrics nobody exposes: {sorted(used - have)}"
