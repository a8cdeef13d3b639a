"""The Colab notebooks: stored clean, and each runs top to bottom in its small CPU setting.

The notebooks run in a Jupyter kernel of this Python with HVT_NOTEBOOK_SMALL=1 (random or tiny
models, a few steps, nothing downloaded), in a temporary working directory; TFDS data and
compiled XLA programs go where conftest.py points them. A failing cell fails its test with the
cell's traceback.
"""
import os
import re

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
import pytest

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


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_stored_clean_with_badge_install_and_small_switch(name):
  nb = read(name)
  nbformat.validate(nb)
  badge = f'https://colab.research.google.com/github/hvt-jax/hvt_jax/blob/main/colab/{name}.ipynb'
  assert nb.cells[0].cell_type == 'markdown' and badge in nb.cells[0].source
  install, settings = nb.cells[1], nb.cells[2]
  assert "'google.colab' in sys.modules" in install.source
  assert '!pip install -q git+https://github.com/hvt-jax/hvt_jax' in install.source
  assert SMALL_SWITCH in settings.source
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, f'{name}: clear the outputs'
  assert nb.metadata.kernelspec.name == 'python3'


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_runs_top_to_bottom_in_small_mode(name, tmp_path, monkeypatch):
  monkeypatch.setenv('HVT_NOTEBOOK_SMALL', '1')
  # The kernel's own inline backend, whatever the surrounding shell set, so plots are captured.
  monkeypatch.delenv('MPLBACKEND', raising=False)
  assert os.environ['TFDS_DATA_DIR']  # conftest: a temporary TFDS dir per test worker
  nb = read(name)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}})
  try:
    client.execute()
  except CellExecutionError as e:  # the failing cell's source and traceback, in plain text
    pytest.fail(f'{name}.ipynb: a cell failed\n{ANSI_CODES.sub("", str(e))}', pytrace=False)
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]
  plots = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(plots) == NOTEBOOKS[name], f'{name}: {len(plots)} plots shown'
  assert (tmp_path / 'hvt_work').is_dir()  # wrote into its working directory, not the checkout
