import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvt_jax import model as model_lib
from hvt_jax.model import layers
from hvt_jax.model.attention import attention_weights, padded_attention, softmax_attention
from hvt_jax.model.gelu import gelu
from hvt_jax.model.settings import attention_implementation, scans_blocks
from tests.helpers import TINY_MODEL

# Published parameter counts and the tokens entering blocks after each pooling
# (docs/architecture.md).
PUBLISHED = {
    'hvt-ti-1': (5_735_656, [97]),
    'hvt-s-0': (22_049_896, []),
    'hvt-s-1': (22_087_144, [97]),
    'hvt-s-2': (22_105_576, [97, 48]),
    'hvt-s-3': (22_114_408, [97, 48, 23]),
    'hvt-s-4': (22_118_632, [97, 48, 23, 11]),
}


def params_formula(d, depth, classes, pooled, p=16, n0=196):
  """docs/architecture.md's closed form, independent of the module code."""
  return d * (3 * p * p + 1) + n0 * d + depth * (12 * d * d + 13 * d) + d * sum(pooled) + 2 * d + (d + 1) * classes


@pytest.mark.parametrize('name', PUBLISHED)
def test_published_param_counts_and_tokens(name):
  count, pooled = PUBLISHED[name]
  model = model_lib.create(name)
  params = model_lib.abstract_params(model)
  assert model_lib.param_count(params) == count
  assert count == params_formula(model.num_heads * 64, 12, 1000, pooled)
  counts = model.tokens_per_block()
  assert counts[0] == 196
  after_pool = [counts[i + 1] for i in range(12) if model_lib.pools_at(i, model.pool_every)]
  assert after_pool == pooled
  # The traced model really carries those shapes: each pooling block's position embedding.
  for i, n in zip([i for i in range(12) if model_lib.pools_at(i, model.pool_every)], pooled):
    assert params[f'blocks_{i}']['pos_embed'].shape == (1, n, model.num_heads * 64)
  logits = jax.eval_shape(lambda p: model.apply({'params': p}, jnp.zeros((2, 224, 224, 3))), params)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32


def test_stage_features_follow_the_token_counts():
  model = model_lib.HVT(**TINY_MODEL)
  params = model_lib.init_params(model, jax.random.key(0))
  feats = model_lib.stage_features(model, params, jnp.ones((3, 32, 32, 3)))
  assert [f.shape for f in feats] == [(3, 64, 16), (3, 31, 16), (3, 15, 16)]
  assert model.tokens_per_block() == [64, 31, 31, 15, 15]


def test_deit_baseline_uses_class_token():
  model = model_lib.HVT(**{**TINY_MODEL, 'pool_every': 0, 'class_token': True})
  params = model_lib.init_params(model, jax.random.key(0))
  assert params['cls_token'].shape == (1, 1, 16)
  assert params['pos_embed'].shape == (1, 65, 16)
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, jnp.ones((2, 32, 32, 3)))
  assert logits.shape == (2, 5)


def test_eval_is_deterministic_and_train_uses_the_rng():
  model = model_lib.HVT(**TINY_MODEL, drop_path=0.5, dropout=0.1)
  params = model_lib.init_params(model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  apply = jax.jit(lambda p, x, train, key: model.apply({'params': p}, x, train=train,
                                                      rngs={'dropout': key}), static_argnums=2)
  e1, e2 = apply(params, x, False, jax.random.key(2)), apply(params, x, False, jax.random.key(3))
  np.testing.assert_array_equal(e1, e2)  # eval ignores the rng
  t1, t1b = apply(params, x, True, jax.random.key(2)), apply(params, x, True, jax.random.key(2))
  t2 = apply(params, x, True, jax.random.key(3))
  np.testing.assert_array_equal(t1, t1b)  # same key, same result
  assert not np.allclose(t1, t2)  # the key matters in training
  assert not np.allclose(t1, e1)  # training mode is stochastic


def test_gradients_reach_every_parameter():
  model = model_lib.HVT(**TINY_MODEL, drop_path=0.1)
  params = model_lib.init_params(model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  labels = jnp.arange(4) % 5

  def loss(p):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(5)})
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

  grads = jax.jit(jax.grad(loss))(params)
  norms = {jax.tree_util.keystr(k): float(jnp.abs(g).sum())
           for k, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert "['blocks_0']['pos_embed']" in norms and "['blocks_2']['pos_embed']" in norms
  assert not [k for k, n in norms.items() if n == 0.0]


def test_bfloat16_computes_in_bf16_with_float32_params():
  config = dict(TINY_MODEL)
  fp32 = model_lib.HVT(**config)
  bf16 = model_lib.HVT(**config, dtype='bfloat16')
  params = model_lib.init_params(bf16, jax.random.key(0))
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  logits = jax.jit(lambda p, x: bf16.apply({'params': p}, x))(params, x)
  assert logits.dtype == jnp.float32
  assert {f.dtype for f in model_lib.stage_features(bf16, params, x)} == {jnp.dtype(jnp.bfloat16)}
  ref = jax.jit(lambda p, x: fp32.apply({'params': p}, x))(params, x)
  np.testing.assert_allclose(logits, ref, atol=0.1)
  assert not np.array_equal(logits, ref)


@pytest.mark.parametrize('settings, message', [
    (dict(image_size=30), 'not divisible by patch size 4'),
    (dict(depth=8, pool_every=1), 'needs at least 3 tokens'),
    (dict(class_token=True), 'class token cannot be max-pooled'),
])
def test_impossible_settings_say_why(settings, message):
  with pytest.raises(model_lib.ConfigError, match=message):  # building the model says why
    model_lib.HVT(**{**TINY_MODEL, **settings})


def test_wrong_input_shape_and_unknown_names_say_why():
  model = model_lib.HVT(**TINY_MODEL)
  with pytest.raises(model_lib.ConfigError, match=r'expected images of shape \(batch, 32, 32, 3\)'):
    model.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(model_lib.ConfigError, match='unknown model'):
    model_lib.variant('hvt-xl')
  with pytest.raises(model_lib.ConfigError, match='unknown model setting'):
    model_lib.variant('hvt-s-1', pool_evry=3)


def _logits_and_grads(model, params, x, train=False):
  labels = jnp.arange(x.shape[0]) % model.num_classes

  def loss(p):
    logits = model.apply({'params': p}, x, train=train, rngs={'dropout': jax.random.key(5)})
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean(), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def _assert_same(a, b, atol):
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, atol=atol, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


# Runs of 2+ plain blocks are what gets scanned: pool_every=3 has runs (1, 2) and (4, 5).
SCANNED = dict(TINY_MODEL, depth=6, pool_every=3)


@pytest.mark.parametrize('settings', [SCANNED, dict(TINY_MODEL, pool_every=0, class_token=True)])
def test_scanned_blocks_match_unrolled_blocks_and_keep_their_names(settings):
  scanned = model_lib.HVT(**settings)
  unrolled = scanned.clone(scan_blocks=False)
  assert scans_blocks(scanned.scan_blocks)  # the default, on CPU
  params = model_lib.init_params(scanned, jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(model_lib.abstract_params(unrolled))
  assert [k for k in params if k.startswith('blocks_')] == [f'blocks_{i}' for i in range(scanned.depth)]
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  logits, grads = _logits_and_grads(scanned, params, x)
  ref_logits, ref_grads = _logits_and_grads(unrolled, params, x)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  _assert_same(grads, ref_grads, atol=1e-5)
  # A gradient for every block, not one shared by the scanned ones.
  assert not np.allclose(grads['blocks_1']['mlp']['fc1']['kernel'], grads['blocks_2']['mlp']['fc1']['kernel'])
  feats = model_lib.stage_features(scanned, params, x)
  ref_feats = model_lib.stage_features(unrolled, params, x)
  assert [f.shape for f in feats] == [f.shape for f in ref_feats]
  _assert_same(feats, ref_feats, atol=1e-5)


@pytest.mark.parametrize('train', [False, True])
def test_stacked_blocks_are_the_same_parameters(train):
  """The train state's layout: each scanned run under one name, its blocks stacked."""
  model = model_lib.HVT(**SCANNED, drop_path=0.2, dropout=0.1)
  assert model.scanned_runs() == [(1, 3), (4, 6)]
  assert model.clone(scan_blocks=False).scanned_runs() == []
  params = model_lib.init_params(model, jax.random.key(0))
  stacked = model_lib.stack_blocks(params, model.scanned_runs())
  assert sorted(k for k in stacked if k.startswith('blocks_')) == [
      'blocks_0', 'blocks_1_to_2', 'blocks_3', 'blocks_4_to_5']
  assert model_lib.stacked_runs(stacked) == model.scanned_runs()
  np.testing.assert_array_equal(stacked['blocks_4_to_5']['mlp']['fc1']['kernel'][1],
                                params['blocks_5']['mlp']['fc1']['kernel'])
  back = model_lib.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  logits, grads = _logits_and_grads(model, params, x, train)
  stacked_logits, stacked_grads = _logits_and_grads(model, stacked, x, train)
  np.testing.assert_allclose(stacked_logits, logits, rtol=1e-6, atol=1e-6)
  _assert_same(model_lib.unstack_blocks(stacked_grads), grads, atol=1e-6)
  # Every parameter-shaped tree in a state converts: here the optimizer's moments.
  import optax
  tx = optax.adamw(1e-3)
  opt = model_lib.stack_blocks(tx.init(params), model.scanned_runs())
  assert jax.tree.structure(opt) == jax.tree.structure(tx.init(stacked))
  assert jax.tree.structure(model_lib.unstack_blocks(opt)) == jax.tree.structure(tx.init(params))


def test_scanned_blocks_are_stochastic_in_training():
  model = model_lib.HVT(**SCANNED, drop_path=0.5, dropout=0.1)
  params = model_lib.init_params(model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  apply = jax.jit(lambda p, key: model.apply({'params': p}, x, train=True, rngs={'dropout': key}))
  np.testing.assert_array_equal(apply(params, jax.random.key(2)), apply(params, jax.random.key(2)))
  assert not np.allclose(apply(params, jax.random.key(2)), apply(params, jax.random.key(3)))
  # With every rate at zero, training needs no rng and equals eval.
  plain = model.clone(drop_path=0.0, dropout=0.0)
  np.testing.assert_allclose(plain.apply({'params': params}, x, train=True),
                             plain.apply({'params': params}, x), atol=1e-6)


@pytest.mark.parametrize('settings', [
    dict(remat=True), dict(remat=True, scan_blocks=False), dict(attention='xla'), dict(attention='auto'),
    dict(attention='auto', attention_dropout=0.0, scan_blocks=False)])
def test_accelerator_settings_keep_logits_and_gradients(settings):
  """remat and the attention choice change how the step runs, never what it computes (on CPU
  'auto' is XLA's attention)."""
  reference = model_lib.HVT(**SCANNED, attention='xla', scan_blocks=False)
  model = reference.clone(**settings)
  params = model_lib.init_params(model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  logits, grads = _logits_and_grads(model, params, x, train=True)
  ref_logits, ref_grads = _logits_and_grads(reference, params, x, train=True)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  _assert_same(grads, ref_grads, atol=1e-5)


def test_attention_dropout_still_trains_with_every_attention_setting():
  model = model_lib.HVT(**SCANNED, attention_dropout=0.3, attention='auto')
  params = model_lib.init_params(model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  train = lambda key: model.apply({'params': params}, x, train=True, rngs={'dropout': key})
  assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))
  np.testing.assert_array_equal(model.apply({'params': params}, x),
                                model.apply({'params': params}, x))


def test_cudnn_attention_without_a_supported_gpu_says_what_to_use():
  if jax.default_backend() == 'gpu':
    pytest.skip('a GPU is present: cudnn may be valid here')
  model = model_lib.HVT(**TINY_MODEL, attention='cudnn')
  with pytest.raises(model_lib.ConfigError, match="attention=cudnn needs an NVIDIA GPU.*use attention='auto' or 'xla'"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(model_lib.ConfigError, match='attention=.flash.: choose one of auto, xla, cudnn'):
    model_lib.HVT(**TINY_MODEL, attention='flash').init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_auto_dtype_is_float32_on_cpu():
  if jax.default_backend() != 'cpu':
    pytest.skip('auto is bfloat16 on accelerators')
  auto = model_lib.HVT(**TINY_MODEL, dtype='auto')
  params = model_lib.init_params(auto, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  assert {f.dtype for f in model_lib.stage_features(auto, params, x)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_array_equal(auto.apply({'params': params}, x),
                                auto.clone(dtype='float32').apply({'params': params}, x))


class _FakeGPU:
  platform, device_kind, compute_capability = 'gpu', 'NVIDIA H100 80GB HBM3', '9.0'


def test_auto_attention_takes_cudnn_only_for_blocks_it_can_train(monkeypatch):
  """JAX refuses to train cuDNN attention on odd token counts (an H100 run hit it at HVT-S-1's
  97 tokens): 'auto' must pick XLA there; an explicit 'cudnn' pads one masked token."""
  monkeypatch.setattr(jax, 'devices', lambda *a: [_FakeGPU()])
  assert attention_implementation('auto', jnp.bfloat16, 196) == 'cudnn'
  assert attention_implementation('auto', jnp.bfloat16, 97) == 'xla'
  assert attention_implementation('auto', jnp.float32, 196) == 'xla'
  assert attention_implementation('cudnn', jnp.bfloat16, 48) == 'cudnn'
  assert attention_implementation('cudnn', jnp.bfloat16, 97) == 'cudnn-padded'


@pytest.mark.parametrize('tokens', [97, 23])
def test_padding_one_masked_token_keeps_attention_and_its_gradients(tokens):
  """What attention='cudnn' does for odd token counts, here with XLA's kernel underneath."""
  q, k, v = jax.random.normal(jax.random.key(tokens), (3, 2, tokens, 3, 8))
  weight = jax.random.normal(jax.random.key(1), (2, tokens, 3, 8))
  def loss(attention, q, k, v):
    return jnp.sum(attention(q, k, v) * weight)
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.3)
  padded = lambda q, k, v: padded_attention(q, k, v, 0.3, 'xla')
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), atol=1e-6)
  grads = jax.grad(loss, (1, 2, 3))
  for g, ref in zip(grads(padded, q, k, v), grads(plain, q, k, v)):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, ref, atol=1e-5)


@pytest.mark.parametrize('dtype, atol', [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_softmax_attention_gradient_is_autodiffs(dtype, atol):
  """XLA's attention with its hand-written gradient against autodiff of the same formula, and
  in float32 against jax.nn's attention."""
  q, k, v = (jax.random.normal(jax.random.key(0), (3, 2, 3, 23, 8)) * 2).astype(dtype)
  weight = jax.random.normal(jax.random.key(1), (2, 3, 23, 8)).astype(dtype)
  autodiff = lambda q, k, v: attention_weights(q, k, 0.3, q.dtype) @ v
  ours = lambda q, k, v: softmax_attention(q, k, v, 0.3)
  f32 = lambda t: np.asarray(t.astype(jnp.float32))
  np.testing.assert_array_equal(f32(ours(q, k, v)), f32(autodiff(q, k, v)))
  loss = lambda attention, q, k, v: jnp.sum((attention(q, k, v) * weight).astype(jnp.float32))
  grads = jax.grad(loss, (1, 2, 3))
  for g, ref in zip(grads(ours, q, k, v), grads(autodiff, q, k, v)):
    assert g.dtype == dtype
    np.testing.assert_allclose(f32(g), f32(ref), atol=atol * 5, rtol=atol)
  if dtype == jnp.float32:
    to_heads = lambda t: t.swapaxes(1, 2)  # jax.nn takes (B, N, heads, head_dim)
    plain = lambda q, k, v: to_heads(jax.nn.dot_product_attention(
        to_heads(q), to_heads(k), to_heads(v), scale=0.3, implementation='xla'))
    np.testing.assert_allclose(ours(q, k, v), plain(q, k, v), atol=atol)
    for g, ref in zip(grads(ours, q, k, v), grads(plain, q, k, v)):
      np.testing.assert_allclose(g, ref, atol=atol * 5, rtol=atol)


def test_scan_blocks_settings():
  assert scans_blocks('auto') == (jax.default_backend() == 'cpu')
  assert [scans_blocks(v) for v in (True, 'true', 'True', False, 'false', 'FALSE')] == [True] * 3 + [False] * 3
  with pytest.raises(model_lib.ConfigError, match="scan_blocks='sometimes': choose auto, true or false"):
    model_lib.HVT(**TINY_MODEL, scan_blocks='sometimes')


def test_patch_embedding_is_the_official_strided_convolution():
  model = model_lib.HVT(**TINY_MODEL)
  params = model_lib.init_params(model, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  _, state = model.apply({'params': params}, images, capture_intermediates=True)
  tokens = state['intermediates']['patch_embed']['__call__'][0]
  p = model.patch_size
  conv = jax.lax.conv_general_dilated(images, params['patch_embed']['kernel'], (p, p), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  expected = conv.reshape(2, -1, conv.shape[-1]) + params['patch_embed']['bias']
  assert tokens.shape == expected.shape
  np.testing.assert_allclose(tokens, expected, atol=1e-5)


@pytest.mark.parametrize('dtype, atol', [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_gelu_is_the_exact_gelu_with_its_true_gradient(dtype, atol):
  x = (jax.random.normal(jax.random.key(0), (4096,)) * 4).astype(dtype)
  x = jnp.concatenate([x, jnp.array([-30, -4, 0, 4, 30], dtype)])  # both tails, and the clip at 4
  exact = lambda x: jax.nn.gelu(x, approximate=False)
  # Within one float32 step of the value at |x| <= 12 (the erf polynomial's error, ~4e-7 of Phi,
  # times |x|); in bfloat16 within one bfloat16 step.
  np.testing.assert_allclose(gelu(x).astype(np.float32), exact(x).astype(np.float32),
                             atol=atol * 2, rtol=atol / 4 if dtype == jnp.float32 else 1e-2)
  weights = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * weights).astype(jnp.float32))(x)
  np.testing.assert_allclose(grad(gelu).astype(np.float32), grad(exact).astype(np.float32),
                             atol=atol * 10, rtol=atol)


def test_gelu_matches_float64_erf():
  """The erf polynomial behind `gelu` against SciPy's float64 erf, over its whole range."""
  from scipy import special
  x = np.linspace(-12, 12, 100_001, dtype=np.float32)
  x64 = x.astype(np.float64)
  exact = x64 * 0.5 * (1 + special.erf(x64 / np.sqrt(2)))
  ours = np.asarray(jax.jit(gelu)(x))
  np.testing.assert_allclose(ours, exact, atol=1.5e-6, rtol=0)
  # Near zero, where the value is ~x/2, the error is relative.
  small = np.abs(x) < 0.5
  np.testing.assert_allclose(ours[small], exact[small], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('attention_dropout', [0.2, 0.0], ids=['autodiff', 'softmax_attention'])
def test_scanned_blocks_recompute_dropout_masks_for_their_gradients(monkeypatch, attention_dropout):
  """Scanned blocks keep only some activations for the backward pass (`layers.SCAN_SAVES`) and
  recompute the rest, random masks included: the gradients are those of keeping everything,
  on both attention paths (without attention dropout, the hand-written gradient's)."""
  model = model_lib.HVT(**SCANNED, drop_path=0.3, dropout=0.2, attention_dropout=attention_dropout)
  params = model_lib.init_params(model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  logits, grads = _logits_and_grads(model, params, x, train=True)
  monkeypatch.setattr(layers, 'SCAN_SAVES', jax.checkpoint_policies.everything_saveable)
  ref_logits, ref_grads = _logits_and_grads(model.clone(), params, x, train=True)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
  _assert_same(grads, ref_grads, atol=1e-6)


def test_resolved_settings_ask_for_no_device_when_traced(monkeypatch):
  """`resolve_settings` decides the 'auto' settings once, for the devices given: the model built
  from its answer is traced without asking JAX for a device, as a TPU step compiled on a CPU host
  needs. Left 'auto', the trace asks this host."""
  if jax.default_backend() == 'gpu':
    pytest.skip("on a GPU attention stays 'auto', chosen per block when traced (settings.py)")
  fields = {**TINY_MODEL, 'dtype': 'auto', 'attention': 'auto', 'scan_blocks': 'auto'}
  resolved = model_lib.HVT(**model_lib.resolve_settings(fields, jax.devices()))
  unresolved = model_lib.HVT(**fields)
  assert resolved.attention == 'xla' and resolved.scan_blocks in ('true', 'false')
  assert resolved.dtype in ('float32', 'bfloat16')
  key, images = jax.random.key(0), jnp.zeros((1, 32, 32, 3))

  def probe(*args, **kwargs):
    raise AssertionError('the trace asked for a device')
  monkeypatch.setattr(jax, 'devices', probe)
  monkeypatch.setattr(jax, 'default_backend', probe)
  params = jax.eval_shape(lambda k: resolved.init(k, images)['params'], key)
  logits = jax.eval_shape(lambda p: resolved.apply({'params': p}, images, train=True,
                                                   rngs={'dropout': key}), params)
  assert logits.shape == (1, 5)
  with pytest.raises(AssertionError, match='the trace asked for a device'):
    jax.eval_shape(lambda p: unresolved.apply({'params': p}, images), params)
