import pytest

from hvt_jax import model as model_lib
from hvt_jax import summary
from tests.helpers import REPO, TINY_MODEL, run

# Exact per-image MACs in the paper's convention and the table's rounded figures
# (docs/architecture.md).
PUBLISHED_MACS = {
    'hvt-ti-1': 642_396_520, 'hvt-s-0': 4_574_144_488, 'hvt-s-1': 2_402_213_608,
    'hvt-s-2': 1_941_447_016, 'hvt-s-3': 1_620_343_912, 'hvt-s-4': 1_393_897_960,
}
TABLE = {'hvt-ti-1': ('5,735,656', '0.64'), 'hvt-s-0': ('22,049,896', '4.57'),
         'hvt-s-1': ('22,087,144', '2.40'), 'hvt-s-2': ('22,105,576', '1.94'),
         'hvt-s-3': ('22,114,408', '1.62'), 'hvt-s-4': ('22,118,632', '1.39')}


@pytest.mark.parametrize('name', PUBLISHED_MACS)
def test_macs_match_the_paper_exactly(name):
  assert summary.macs(model_lib.create(name)) == PUBLISHED_MACS[name]


def test_cli_prints_the_published_table():
  out = run('summary', check=True).stdout
  rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
  assert set(rows) == set(TABLE)
  for name, (params, gmacs) in TABLE.items():
    assert rows[name][1:3] == [params, gmacs]
  assert rows['hvt-s-4'][3:] == ['196x1', '->', '97x3', '->', '48x3', '->', '23x3', '->', '11x2']


def test_xla_counts_about_two_flops_per_counted_mac():
  model = model_lib.HVT(**{**TINY_MODEL, 'num_heads': 4, 'head_dim': 16})
  ratio = summary.xla_flops(model) / summary.macs(model)
  # XLA also counts LayerNorm, softmax, GELU and adds, which the paper's convention leaves out.
  assert 1.9 < ratio < 2.6, ratio


def test_tokens_per_stage_groups_blocks():
  assert summary.tokens_per_stage(model_lib.HVT(**TINY_MODEL)) == [(64, 1), (31, 2), (15, 1)]


def test_the_docs_table_is_what_the_code_computes():
  text = (REPO / 'docs' / 'architecture.md').read_text()
  rows = [[cell.strip() for cell in line.split('|')[1:-1]] for line in text.splitlines()
          if line.startswith(('| hvt-', '| deit-'))]
  assert [r[0] for r in rows] == [*summary.PUBLISHED, 'deit-ti', 'deit-s']
  for name, _, _, stages, params, gmacs, _ in rows:
    row = summary.describe(name, model_lib.create(name), with_xla=False)
    assert (params, gmacs) == (f'{row["params"]:,}', f'{row["gmacs"]:.2f}')
    assert stages == row['stages'].replace('x', '×').replace(' -> ', ' → ')
