"""The console script: help everywhere, a version, exit codes scripts can trust."""
import subprocess, sys
from pathlib import Path
import pytest

EXE = Path(sys.executable).parent / 'fmnist'


def run(*args):
    return subprocess.run([str(EXE), *args], check=False, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('args', [[], ['data'], ['data', 'fetch'], ['data', 'verify'], ['data', 'info'], ['run'], ['book'],
                                  ['bench'], ['sweep'], ['tune']])
def test_help_everywhere(args):
    r = run(*args, '--help')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('usage: fmnist')


def test_version():
    from fmnist_lib import __version__
    r = run('--version')
    assert r.returncode == 0 and r.stdout.strip() == f'fmnist {__version__}'


@pytest.mark.parametrize('args', [['frobnicate'], ['data'], ['data', 'fetch', '--retries', 'many']])
def test_usage_errors_exit_2(args):
    r = run(*args)
    assert r.returncode == 2
    assert 'usage: fmnist' in r.stderr


def test_unknown_dataset_exits_1_with_one_line():
    r = run('data', 'verify', '--dataset', 'cifar')
    assert r.returncode == 1
    assert r.stderr == "fmnist: error: dataset: expected one of fashion-mnist, mnist, found 'cifar'\n"
