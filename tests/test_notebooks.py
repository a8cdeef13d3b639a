"""The Colab notebooks: stored clean, and each runs top to bottom in its small CPU setting.

The notebooks run in a Jupyter kernel of this Python with HVT_NOTEBOOK_SMALL=1 (random or tiny
models, a few steps, nothing downloaded), in a temporary working directory; TFDS data and
compiled XLA programs go where conftest.py points them. A failing cell fails its test with the
cell's traceback.

.ci/colab_check.sh runs them on a rebuilt Colab runtime instead: it runs each install cell there
first (in $HVT_NOTEBOOK_SETUP_DIR/<name>, which the notebook then runs in) and keeps the executed
notebooks ($HVT_NOTEBOOK_OUTPUTS) to print what they printed.
"""
import os
import pathlib
import re

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
import pytest

from hvt_jax import published
from tests.helpers import REPO

COLAB = REPO / 'colab'
# Each notebook, with the plots (PNG outputs) a run must show: a plot that silently fails to
# render (e.g. a file-only matplotlib backend left switched on) fails the test too.
NOTEBOOKS = {'quickstart': 4, 'train_cifar100': 1, 'load_in_jax': 0}
CELL_TIMEOUT = 300  # seconds; a cold CPU compile of the largest model takes well under a minute
SMALL_SWITCH = "SMALL = os.environ.get('HVT_NOTEBOOK_SMALL') == '1'"
ANSI_CODES = re.compile(r'\x1b\[[0-9;]*m')  # IPython colours its tracebacks


def read(name):
  return nbformat.read(COLAB / f'{name}.ipynb', as_version=4)


def test_the_notebooks_are_all_here():
  assert sorted(p.stem for p in COLAB.glob('*.ipynb')) == sorted(NOTEBOOKS)


# The project publishes under PROJECT; the official HVT release (published.RELEASE_URL) is OFFICIAL.
PROJECT = 'https://github.com/hvt-jax/hvt_jax'
OFFICIAL = 'https://github.com/zhuang-group/HVT'
GITHUB = re.compile(r'https?://github\.com/[\w.-]+/[\w.-]+')


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_stored_clean_with_badge_install_and_small_switch(name):
  nb = read(name)
  nbformat.validate(nb)
  badge = f'https://colab.research.google.com/github/hvt-jax/hvt_jax/blob/main/colab/{name}.ipynb'
  assert nb.cells[0].cell_type == 'markdown' and badge in nb.cells[0].source
  install, settings = nb.cells[1], nb.cells[2]
  assert "'google.colab' in sys.modules" in install.source
  assert f'!pip install -q git+{PROJECT}' in install.source
  # Then the plugin matched to the jax just installed, before the kernel imports jax.
  assert install.source.index('!python -m hvt_jax.colab') > install.source.index('!pip install')
  assert SMALL_SWITCH in settings.source
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, f'{name}: clear the outputs'
  assert nb.metadata.kernelspec.name == 'python3'


def test_one_install_cell_for_all_notebooks():
  """.ci/colab_check.sh runs each notebook's install cell; they are one cell, kept identical."""
  cells = {name: read(name).cells[1].source for name in NOTEBOOKS}
  assert len(set(cells.values())) == 1, 'the install cells differ; make them the same'


def test_github_urls_are_the_project_and_the_official_release():
  assert published.RELEASE_URL.startswith(OFFICIAL + '/')
  texts = {f'{name}.ipynb': ''.join(c.source for c in read(name).cells) for name in NOTEBOOKS}
  texts['README.md'] = (REPO / 'README.md').read_text()
  for where, text in texts.items():
    # Links to other projects (jax, timm, ...) are free; every one to an HVT repository is ours.
    urls = {u.rstrip('.').removesuffix('.git') for u in GITHUB.findall(text)
            if 'hvt' in u.lower()}
    assert urls <= {PROJECT, OFFICIAL}, f'{where}: {sorted(urls - {PROJECT, OFFICIAL})}'
    assert PROJECT in urls and 'monashai' not in text.lower(), where
  assert OFFICIAL in GITHUB.findall(texts['quickstart.ipynb'])


def test_quickstart_loads_official_weights_by_their_published_name():
  settings = read('quickstart').cells[2].source
  name = re.search(r"^WEIGHTS = '([^']*)'", settings, re.M).group(1)
  assert name in published.PUBLISHED
  assert 'hvt_jax.load(MODEL_DIR)' in read('quickstart').cells[4].source


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_runs_top_to_bottom_in_small_mode(name, tmp_path, monkeypatch):
  setup = os.environ.get('HVT_NOTEBOOK_SETUP_DIR')  # .ci/colab_check.sh: a Colab-like runtime
  if setup:
    tmp_path = pathlib.Path(setup) / name  # where its install cell ran (and cloned the configs)
  monkeypatch.setenv('HVT_NOTEBOOK_SMALL', '1')
  # The kernel's own inline backend, whatever the surrounding shell set, so plots are captured.
  monkeypatch.delenv('MPLBACKEND', raising=False)
  assert os.environ['TFDS_DATA_DIR']  # conftest: a temporary TFDS dir per test worker
  nb = read(name)
  # Which hvt_jax the kernel imported: this checkout's (editable) or, on the Colab-like runtime,
  # the one the install cell put into site-packages. Only in this run's copy, never stored.
  nb.cells.append(nbformat.v4.new_code_cell('import hvt_jax; print(hvt_jax.__file__)'))
  client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}})
  try:
    client.execute()
  except CellExecutionError as e:  # the failing cell's source and traceback, in plain text
    pytest.fail(f'{name}.ipynb: a cell failed\n{ANSI_CODES.sub("", str(e))}', pytrace=False)
  if os.environ.get('HVT_NOTEBOOK_OUTPUTS'):
    os.makedirs(os.environ['HVT_NOTEBOOK_OUTPUTS'], exist_ok=True)
    nbformat.write(nb, os.path.join(os.environ['HVT_NOTEBOOK_OUTPUTS'], f'{name}.ipynb'))
  printed = [o.text for o in nb.cells.pop().outputs if o.get('name') == 'stdout']
  imported = pathlib.Path(''.join(printed).strip())
  if setup:
    assert REPO not in imported.parents and 'site-packages' in imported.parts, imported
  else:
    assert imported == REPO / 'hvt_jax' / '__init__.py', imported
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]
  plots = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(plots) == NOTEBOOKS[name], f'{name}: {len(plots)} plots shown'
  assert (tmp_path / 'hvt_work').is_dir()  # wrote into its working directory, not the checkout
