import pytest

from hvt_jax import xla_flags


def test_user_flags_win_and_only_missing_ones_are_added():
  (name, value), = xla_flags.CPU_FLAGS.items()
  assert xla_flags.missing_flags('') == [f'{name}={value}']
  assert xla_flags.missing_flags(f'--xla_dump_to=/tmp/x {name}=MINE') == []


@pytest.mark.parametrize('platforms, applies', [('cpu', True), ('cuda', False), ('tpu,cpu', False)])
def test_flags_only_for_the_cpu_and_appended(monkeypatch, platforms, applies):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/x')
  monkeypatch.delenv('HVT_JAX_NO_XLA_FLAGS', raising=False)
  monkeypatch.setattr(xla_flags, '_jaxlib_version', lambda: xla_flags.MEASURED_JAXLIB[0] + '9')
  added = xla_flags.use_cpu_flags()
  assert bool(added) == applies
  expected = ' '.join(['--xla_dump_to=/tmp/x'] + added)
  assert xla_flags.os.environ['XLA_FLAGS'] == expected


def test_unmeasured_jaxlib_or_opt_out_adds_nothing(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setattr(xla_flags, '_jaxlib_version', lambda: '99.0.0')
  assert xla_flags.use_cpu_flags() == []
  monkeypatch.setattr(xla_flags, '_jaxlib_version', lambda: xla_flags.MEASURED_JAXLIB[0] + '9')
  monkeypatch.setenv('HVT_JAX_NO_XLA_FLAGS', '1')
  assert xla_flags.use_cpu_flags() == []
