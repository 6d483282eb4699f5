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
        r = subprocess.run([str(BIN / cmd)], check=False, cwd=work, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd} failed: {r.stderr[-2000:]}"
    lib = {p.name: p.read_text() for p in (REPO / 'fmnist_lib').glob('*.py')}
    fresh = {p.name: p.read_text() for p in (work / 'fmnist_lib').glob('*.py')}
    assert sorted(fresh) == sorted(lib), "fmnist_lib/ has modules no notebook exports, or misses exported ones: run nbdev_export"
    stale = [n for n in lib if lib[n] != fresh[n]]
    assert not stale, f"fmnist_lib/{stale} differ from what the notebooks export: edit the notebook, run nbdev_export, commit both"
    unclean = [str(p.relative_to(REPO)) for p in NBS if p.read_bytes() != (work / p.relative_to(REPO)).read_bytes()]
    assert not unclean, f"{unclean} change under nbdev_clean: run nbdev_clean and commit"


def test_train_notebook_parameters_are_trainconfig_defaults():
    "One set of training defaults: the train stage's parameters cell declares every TrainConfig field with its default."
    import dataclasses, ast
    import papermill as pm
    from fmnist_lib.train import TrainConfig
    declared = pm.inspect_notebook(str(REPO / 'nbs' / 'experiments' / '02_train.ipynb'))
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    missing = sorted(set(defaults) - set(declared))
    assert not missing, f"02_train.ipynb does not declare {missing}"
    differ = {k: (ast.literal_eval(declared[k]['default']), v) for k, v in defaults.items() if ast.literal_eval(declared[k]['default']) != v}
    assert not differ, f"02_train.ipynb's defaults differ from TrainConfig's (notebook, TrainConfig): {differ}"


@pytest.mark.parametrize('nb', EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_notebooks_define_nothing(nb):
    "Experiment notebooks call the library; functions and classes live in nbs/NN_*.ipynb where nbdev_test runs them."
    import ast
    for i, c in enumerate(json.loads(nb.read_text())['cells']):
        if c['cell_type'] != 'code': continue
        tree = ast.parse(''.join(c['source']))
        defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defs, f"{nb.name} cell {i} defines {defs}: move them into the library"


def _module_order() -> dict:
    "{module: the number of the notebook that exports it}."
    out = {}
    for nb in (REPO / 'nbs').glob('[0-9]*.ipynb'):
        src = ''.join(json.loads(nb.read_text())['cells'][0]['source'])
        if src.startswith('#| default_exp '):
            num = nb.name.split('_')[0]
            out[src.split()[-1]] = (int(num.rstrip('abcdefghijklmnopqrstuvwxyz')), num)
    return out


def test_imports_follow_the_notebook_order_and_stay_public():
    "No module imports a later-numbered module or another module's private names (the nbdev habit)."
    import ast
    order, bad = _module_order(), []
    for mod, (num, label) in order.items():
        tree = ast.parse((REPO / 'fmnist_lib' / f'{mod}.py').read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module:
                other = n.module.split('.')[0]
                if other in order and order[other][1] > label and other != mod:
                    bad.append(f"{mod} ({label}) imports {other} ({order[other][1]})")
                bad += [f"{mod} imports private {other}.{a.name}" for a in n.names if a.name.startswith('_')]
            elif isinstance(n, ast.ImportFrom) and (n.module or '').startswith('fmnist_lib.') and mod != 'cli':
                # cli imports each subcommand's module when it runs, so `fmnist --help` never imports torch
                bad.append(f"{mod}: absolute import of {n.module} inside a function (late or circular import)")
    assert not bad, bad


def _public_functions():
    "(qualified name, function) for every public function and method the library exports."
    import importlib, inspect, pkgutil
    import fmnist_lib
    for m in pkgutil.iter_modules(fmnist_lib.__path__):
        if m.name.startswith('_'): continue
        mod = importlib.import_module(f'fmnist_lib.{m.name}')
        for name in getattr(mod, '__all__', []):
            obj = getattr(mod, name)
            if inspect.isfunction(obj) and obj.__module__ == mod.__name__: yield f"{m.name}.{name}", obj
            elif inspect.isclass(obj) and obj.__module__ == mod.__name__:
                for k, v in vars(obj).items():
                    f = v.__func__ if isinstance(v, (classmethod, staticmethod)) else v
                    if inspect.isfunction(f) and not k.startswith('_'): yield f"{m.name}.{name}.{k}", f


def test_public_functions_document_parameters_and_returns():
    "The fastcore habit: docments on every public function with two or more parameters, the return value included."
    import inspect
    from fastcore.docments import docments
    lacking, n = [], 0
    for name, f in _public_functions():
        sig = inspect.signature(f)
        ps = [p for p in sig.parameters.values() if p.name not in ('self', 'cls') and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if len(ps) < 2: continue
        n += 1
        d = docments(f, full=True)
        miss = [p.name for p in ps if not d[p.name]['docment']]
        if sig.return_annotation is not inspect.Signature.empty and not d['return']['docment']: miss.append('return')
        if miss: lacking.append(f"{name}: {miss}")
    assert n > 80, f"only {n} public multi-parameter functions found: the scan is broken"
    assert not lacking, f"{len(lacking)} functions lack docments: {lacking}"


@pytest.mark.parametrize('nb', EXPERIMENTS, ids=lambda p: p.name)
def test_nbval_ignores_only_what_varies_and_says_why(nb):
    "nbval compares every output of a re-executed report except cells tagged to vary; each such cell says why in its first line."
    cells = [c for c in json.loads(nb.read_text())['cells'] if 'nbval-ignore-output' in c.get('metadata', {}).get('tags', [])]
    assert len(cells) <= 1, f"{nb.name}: {len(cells)} cells skip nbval's comparison; keep it to the one that prints times"
    for c in cells:
        first = ''.join(c['source']).splitlines()[0]
        assert first.startswith('# nbval-ignore-output: '), f"{nb.name}: an ignored cell must open with '# nbval-ignore-output: <reason>'"


@pytest.mark.parametrize('nb', EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_code_is_collapsed_on_the_site_except_the_parameters(nb):
    "Readers see findings and figures first: every code cell but the parameters cell carries Jupyter Book's hide-input tag (or remove-input: the findings call)."
    cells = [c for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
    hidden = lambda c: bool({'hide-input', 'remove-input'} & set(c['metadata'].get('tags', [])))
    wrong = [c['source'][:1] for c in cells if ('parameters' in c['metadata'].get('tags', [])) == hidden(c)]
    assert not wrong, f"{nb.name}: expected hide-input on every code cell except the parameters cell, found {wrong}"
