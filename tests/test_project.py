"""Project hygiene: notebooks are the source and are clean, the library matches them, dependency lists agree."""
import configparser, json, shutil, subprocess, sys
from pathlib import Path
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (REPO / 'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
EXPERIMENTS = sorted((REPO / 'nbs' / 'experiments').glob('*.ipynb'))
BIN = Path(sys.executable).parent


def settings():
    c = configparser.ConfigParser(delimiters=['='])
    c.read(REPO / 'settings.ini')
    return c['DEFAULT']


def test_there_are_notebooks():
    assert (REPO / 'nbs' / '00_core.ipynb') in NBS and EXPERIMENTS


@pytest.mark.parametrize('nb', NBS, ids=lambda p: str(p.relative_to(REPO)))
def test_notebooks_are_committed_without_outputs(nb):
    cells = json.loads(nb.read_text())['cells']
    dirty = [i for i, c in enumerate(cells) if c['cell_type'] == 'code' and (c.get('outputs') or c.get('execution_count'))]
    assert not dirty, f"{nb.name}: cells {dirty} carry outputs; clear them (nbs/ notebooks are sources, reports hold outputs)"


@pytest.mark.parametrize('nb', EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_notebooks_have_one_commented_parameters_cell(nb):
    import papermill as pm
    cells = json.loads(nb.read_text())['cells']
    tagged = [c for c in cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(tagged) == 1, f"{nb.name}: expected exactly one cell tagged 'parameters', found {len(tagged)}"
    params = pm.inspect_notebook(str(nb))
    assert params, f"{nb.name}: the parameters cell declares nothing papermill can read"
    for name, p in params.items():
        assert p['inferred_type_name'] not in ('None', ''), f"{nb.name}: parameter {name} has no type annotation"
        assert p['help'], f"{nb.name}: parameter {name} has no comment saying what it is"


def test_environment_yml_matches_settings_ini():
    s = settings()
    wanted = s['requirements'].split() + s['dev_requirements'].split()
    env = yaml.safe_load((REPO / 'environment.yml').read_text())
    pip = next(d['pip'] for d in env['dependencies'] if isinstance(d, dict) and 'pip' in d)
    assert pip == wanted, "environment.yml's pip list must equal settings.ini's requirements + dev_requirements, in order"


def test_settings_keep_cell_tags():
    s = settings()
    assert s['clear_all'] == 'False', "clear_all = True wipes cell tags (papermill's parameters)"
    assert 'tags' in s['allowed_cell_metadata_keys'].split()


def test_checksum_manifest_matches_registry():
    from fmnist_lib.data import get_dataset
    spec = get_dataset('fashion-mnist')
    lines = (REPO / 'data' / 'SHA256SUMS').read_text().split('\n')
    listed = dict(reversed(l.split('  ')) for l in lines if l.strip())
    assert listed == {f.name: f.sha256 for f in spec.files.values()}


def test_library_matches_notebooks_and_notebooks_are_clean(tmp_path):
    """What nbdev CI checks: `nbdev_export` would not change fmnist_lib/, `nbdev_clean` would not change a notebook.
    Run in a copy, so a developer's uncommitted work is never touched."""
    work = tmp_path / 'copy'
    def ignore(folder, names):  # checkpoints and anything that is not a plain file, folder or link (sockets)
        import stat
        return [n for n in names if n == '.ipynb_checkpoints' or not (stat.S_ISREG((Path(folder) / n).lstat().st_mode)
                or stat.S_ISDIR((Path(folder) / n).lstat().st_mode) or (Path(folder) / n).is_symlink())]
    shutil.copytree(REPO / 'nbs', work / 'nbs', symlinks=True, ignore=ignore)
    (work / 'fmnist_lib').mkdir()
    shutil.copy(REPO / 'fmnist_lib' / '__init__.py', work / 'fmnist_lib' / '__init__.py')
    for f in ('settings.ini', 'setup.py', 'README.md'):
        shutil.copy(REPO / f, work / f)
    for cmd in ('nbdev_export', 'nbdev_clean'):
        r = subprocess.run([str(BIN / cmd)], cwd=work, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd} failed: {r.stderr[-2000:]}"
    lib = {p.name: p.read_text() for p in (REPO / 'fmnist_lib').glob('*.py')}
    fresh = {p.name: p.read_text() for p in (work / 'fmnist_lib').glob('*.py')}
    assert sorted(fresh) == sorted(lib), "fmnist_lib/ has modules no notebook exports, or misses exported ones: run nbdev_export"
    stale = [n for n in lib if lib[n] != fresh[n]]
    assert not stale, f"fmnist_lib/{stale} differ from what the notebooks export: edit the notebook, run nbdev_export, commit both"
    unclean = [str(p.relative_to(REPO)) for p in NBS if p.read_bytes() != (work / p.relative_to(REPO)).read_bytes()]
    assert not unclean, f"{unclean} change under nbdev_clean: run nbdev_clean and commit"
