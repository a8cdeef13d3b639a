"""RandAugment in JAX: spec parsing, every op against PIL (what timm runs) and its intended
effect, and the random choice of ops, magnitudes and signs against timm's distributions."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from hvt_jax.data import image_ops as ops
from hvt_jax.data import randaugment as ra
from hvt_jax.errors import UserError

FILL = (124, 116, 104)


def _noise(shape=(24, 20, 3), lo=0, hi=256, seed=0):
  return np.random.default_rng(seed).integers(lo, hi, size=shape, dtype=np.uint8)


def _textured(seed=0):
  """Noise with regions of different ranges, so each op changes something."""
  x = _noise((24, 20, 3), 40, 180, seed)
  x[3:10, 2:15] = _noise((7, 13, 3), 0, 256, seed + 1)
  x[15:20, 5:9] = 250
  return x


def _smooth(height=32, width=28):
  """Gradients: interpolation differences stay small, wrong directions do not."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([8 * x, 7 * y, 4 * (x + y)], -1).clip(0, 255).astype(np.uint8)


def _key(i):
  return jax.random.fold_in(jax.random.key(17), i)


def _keys(count, salt=0):
  return jax.random.split(jax.random.key(salt), count)


# ---- spec parsing ----

@pytest.mark.parametrize('spec, expected', [
    ('rand-m9-mstd0.5-inc1', dict(num_ops=2, magnitude=9, magnitude_std=0.5, magnitude_max=10,
                                  prob=0.5, increasing=True)),
    ('rand', dict(num_ops=2, magnitude=10, magnitude_std=0, prob=0.5, increasing=False)),
    ('rand-n3-m5-mmax12-p0.7-inc0', dict(num_ops=3, magnitude=5, magnitude_max=12, prob=0.7,
                                         increasing=False)),
])
def test_parse_spec_reads_timm_syntax(spec, expected):
  cfg = ra.parse_spec(spec)
  assert {k: cfg[k] for k in expected} == expected
  assert isinstance(cfg['num_ops'], int) and isinstance(cfg['increasing'], bool)


@pytest.mark.parametrize('spec', [
    '', 'rnd-m9', 'augmix-m3', 'rand-m9-x1', 'rand-m', 'rand-mfoo', 'rand-inc2', 'rand-p1.5',
    'rand-n1.5', 'rand-w0', 'rand-m9-mstd0.5.1', 'rand-mmax0', 'rand--m9',
])
def test_bad_spec_is_a_user_error_with_a_fix(spec):
  with pytest.raises(UserError) as info:
    ra.parse_spec(spec)
  message = str(info.value)
  assert repr(spec) in message and 'rand-m9-mstd0.5-inc1' in message and '\n' not in message
  with pytest.raises(ra.RandAugmentSpecError):
    ra.rand_augment(_noise(), _key(0), spec)


# ---- pixel ops: identical to PIL's ----

def _pil_solarize_add(img, add):
  return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)


PIL_CASES = (
    [('invert', lambda x: ops.invert(x), ImageOps.invert),
     ('auto_contrast', ops.auto_contrast, ImageOps.autocontrast),
     ('equalize', ops.equalize, ImageOps.equalize)]
    + [(f'posterize{b}', lambda x, b=b: ops.posterize(x, b),
        lambda p, b=b: ImageOps.posterize(p, b)) for b in (1, 3, 4, 7, 8)]
    + [(f'solarize{t}', lambda x, t=t: ops.solarize(x, t),
        lambda p, t=t: ImageOps.solarize(p, t)) for t in (0, 26, 128, 256)]
    + [(f'solarize_add{a}', lambda x, a=a: ops.solarize_add(x, a),
        lambda p, a=a: _pil_solarize_add(p, a)) for a in (0, 40, 110)]
    + [(f'{name}{f}', lambda x, fn=fn, f=f: fn(x, f),
        lambda p, cls=cls, f=f: cls(p).enhance(f))
       for name, fn, cls in [('color', ops.color, ImageEnhance.Color),
                             ('contrast', ops.contrast, ImageEnhance.Contrast),
                             ('brightness', ops.brightness, ImageEnhance.Brightness),
                             ('sharpness', ops.sharpness, ImageEnhance.Sharpness)]
       for f in (0.1, 0.55, 1.0, 1.6, 1.9)])


@pytest.mark.parametrize('name, op, pil_op', PIL_CASES, ids=[c[0] for c in PIL_CASES])
def test_pixel_op_matches_pil(name, op, pil_op):
  for seed in (0, 1):
    image = _textured(seed)
    np.testing.assert_array_equal(np.asarray(op(image)), np.asarray(pil_op(Image.fromarray(image))))


def test_invert_and_posterize_bit_semantics():
  x = _noise()
  np.testing.assert_array_equal(ops.invert(x), 255 - x)
  for bits in range(9):
    mask = (0xFF << (8 - bits)) & 0xFF
    np.testing.assert_array_equal(ops.posterize(x, bits), x & mask)


def test_auto_contrast_stretches_a_narrow_range_monotonically():
  x = _noise((30, 30, 3), 100, 141)
  x[..., 2] = 77  # a flat channel has nothing to stretch
  out = np.asarray(ops.auto_contrast(x))
  np.testing.assert_array_equal(out[..., :2].min(axis=(0, 1)), [0, 0])
  assert np.all(out[..., :2].max(axis=(0, 1)) >= 254)  # PIL's double arithmetic may say 254
  np.testing.assert_array_equal(out[..., 2], x[..., 2])
  order = np.argsort(x[..., 0], axis=None, kind='stable')
  assert np.all(np.diff(out[..., 0].ravel()[order].astype(int)) >= 0)


def test_equalize_flattens_the_histogram():
  rng = np.random.default_rng(3)
  x = np.clip(rng.normal(128, 8, size=(64, 64, 3)), 0, 255).astype(np.uint8)
  out = np.asarray(ops.equalize(x)).astype(float)
  for c in range(3):
    quartiles = np.percentile(out[..., c], [25, 50, 75])
    np.testing.assert_allclose(quartiles, [64, 128, 192], atol=16)
    assert out[..., c].max() - out[..., c].min() > 220 > np.ptp(x[..., c])


# ---- geometric ops ----

def test_rotate_by_0_is_identity_and_by_90_is_rot90():
  x = _noise((17, 17, 3))
  np.testing.assert_array_equal(ops.rotate(x, 0.0, FILL), x)
  np.testing.assert_array_equal(ops.rotate(x, 90.0, FILL), np.rot90(x))  # anticlockwise
  y = _noise((12, 19, 3))
  np.testing.assert_array_equal(ops.rotate(y, 180.0, FILL), y[::-1, ::-1])


def test_translate_moves_a_pattern_and_fills_with_fill():
  x = np.zeros((16, 20, 3), np.uint8)
  x[5:8, 8:11] = 255
  moved = np.asarray(ops.translate_x(x, 4.0, FILL))  # PIL's convention: positive moves left
  expected = np.zeros_like(x)
  expected[5:8, 4:7] = 255
  expected[:, -4:] = FILL
  np.testing.assert_array_equal(moved, expected)
  moved = np.asarray(ops.translate_y(x, -3.0, FILL))
  expected = np.zeros_like(x)
  expected[8:11, 8:11] = 255
  expected[:3] = FILL
  np.testing.assert_array_equal(moved, expected)


def _pil_affine(coeffs):
  return lambda img: img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                   fillcolor=FILL)


def _pil_rotate(degrees):
  return lambda img: img.rotate(degrees, resample=Image.BILINEAR, fillcolor=FILL)


GEOMETRIC_CASES = [
    ('shear_x', lambda x: ops.shear_x(x, 0.2, FILL), _pil_affine((1, 0.2, 0, 0, 1, 0))),
    ('shear_y', lambda x: ops.shear_y(x, -0.25, FILL), _pil_affine((1, 0, 0, -0.25, 1, 0))),
    ('translate_x', lambda x: ops.translate_x(x, 3.5, FILL), _pil_affine((1, 0, 3.5, 0, 1, 0))),
    ('translate_y', lambda x: ops.translate_y(x, -2.0, FILL), _pil_affine((1, 0, 0, 0, 1, -2))),
    ('rotate20', lambda x: ops.rotate(x, 20.0, FILL), _pil_rotate(20.0)),
    ('rotate-35', lambda x: ops.rotate(x, -35.0, FILL), _pil_rotate(-35.0)),
]


@pytest.mark.parametrize('name, op, pil_op', GEOMETRIC_CASES, ids=[c[0] for c in GEOMETRIC_CASES])
def test_geometric_op_follows_pil_conventions(name, op, pil_op):
  x = _smooth()
  out = np.asarray(op(x)).astype(int)
  reference = np.asarray(pil_op(Image.fromarray(x))).astype(int)
  # Both interpolate bilinearly but treat the border differently; a wrong sign, centre or
  # fill would be off by tens of levels on these gradients.
  assert np.abs(out - reference).mean() < 1.5
  assert np.median(np.abs(out - reference)) <= 1


# ---- magnitude -> argument, as timm's level functions ----

@pytest.mark.parametrize('name, magnitude, sign, expected', [
    ('Rotate', 10, -1, lambda x: ops.rotate(x, -30.0, FILL)),
    ('Rotate', 5, 1, lambda x: ops.rotate(x, 15.0, FILL)),
    ('Posterize', 9, 1, lambda x: ops.posterize(x, int(9 / 10 * 4))),
    ('PosterizeIncreasing', 9, 1, lambda x: ops.posterize(x, 4 - int(9 / 10 * 4))),
    ('PosterizeIncreasing', 10, 1, lambda x: np.zeros_like(x)),
    ('Solarize', 9, 1, lambda x: ops.solarize(x, int(9 / 10 * 256))),
    ('SolarizeIncreasing', 9, -1, lambda x: ops.solarize(x, 256 - int(9 / 10 * 256))),
    ('SolarizeIncreasing', 0, 1, lambda x: x),
    ('SolarizeAdd', 9, 1, lambda x: ops.solarize_add(x, int(9 / 10 * 110))),
    ('Color', 9, -1, lambda x: ops.color(x, 9 / 10 * 1.8 + 0.1)),
    ('ColorIncreasing', 9, -1, lambda x: ops.color(x, 1 - 9 / 10 * 0.9)),
    ('ContrastIncreasing', 7, 1, lambda x: ops.contrast(x, 1 + 7 / 10 * 0.9)),
    ('BrightnessIncreasing', 9, 1, lambda x: ops.brightness(x, 1 + 9 / 10 * 0.9)),
    ('SharpnessIncreasing', 9, -1, lambda x: ops.sharpness(x, 1 - 9 / 10 * 0.9)),
    ('Sharpness', 3, 1, lambda x: ops.sharpness(x, 3 / 10 * 1.8 + 0.1)),
    ('ShearX', 9, -1, lambda x: ops.shear_x(x, -9 / 10 * 0.3, FILL)),
    ('ShearY', 9, 1, lambda x: ops.shear_y(x, 9 / 10 * 0.3, FILL)),
    ('TranslateXRel', 10, 1, lambda x: ops.translate_x(x, 0.45 * x.shape[1], FILL)),
    ('TranslateYRel', 10, -1, lambda x: ops.translate_y(x, -0.45 * x.shape[0], FILL)),
    ('Invert', 3, -1, lambda x: 255 - x),
])
def test_apply_op_maps_magnitude_like_timm(name, magnitude, sign, expected):
  x = _textured()
  out = np.asarray(ra.apply_op(x, name, magnitude, sign, FILL))
  np.testing.assert_array_equal(out, np.asarray(expected(x)))


def test_every_listed_transform_has_an_op():
  assert set(ra.RAND_TRANSFORMS) | set(ra.RAND_INCREASING_TRANSFORMS) <= set(ra.OPS)
  assert len(ra.RAND_TRANSFORMS) == len(ra.RAND_INCREASING_TRANSFORMS) == 15


# ---- the random policy ----

def _draws(spec, count):
  cfg = ra.parse_spec(spec)
  draws = jax.jit(jax.vmap(lambda k: ra.layer_params(k, cfg, 15)))(_keys(count, salt=5))
  return [np.asarray(v) for v in draws]


def _within_binomial(hits, n, p, sigmas=4.5):
  """|hits - n p| within `sigmas` binomial standard deviations."""
  return abs(hits - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_layer_draws_follow_timm_distributions():
  n = 15000
  index, applied, magnitude, sign = _draws('rand-m9-mstd0.5-inc1', n)
  counts = np.bincount(index, minlength=15)
  assert len(counts) == 15 and all(_within_binomial(c, n, 1 / 15) for c in counts), counts
  assert _within_binomial(applied.sum(), n, 0.5) and _within_binomial((sign > 0).sum(), n, 0.5)
  assert set(np.unique(sign)) == {-1.0, 1.0}
  # timm: random.gauss(9, 0.5), clipped to [0, 10]; against a large NumPy sample of the same.
  reference = np.random.default_rng(0).normal(9, 0.5, 10**6).clip(0, 10)
  assert abs(magnitude.mean() - reference.mean()) < 4.5 * reference.std() / np.sqrt(n)
  assert abs(magnitude.std() - reference.std()) < 4.5 * reference.std() / np.sqrt(2 * n)
  assert magnitude.max() == 10 and _within_binomial((magnitude == 10).sum(), n,
                                                    (reference == 10).mean())
  _, applied, magnitude, _ = _draws('rand-m11-mstd2-mmax12-p0.8', n)
  assert _within_binomial(applied.sum(), n, 0.8)
  assert magnitude.max() == 12 and (magnitude > 10).mean() > 0.2
  _, applied, magnitude, _ = _draws('rand-m7', 50)
  assert np.all(magnitude == 7)
  _, applied, _, _ = _draws('rand-m7-p1', 500)
  assert applied.all()


def _candidates(image, names, magnitude):
  return {(name, sign): np.asarray(ra.apply_op(image, name, magnitude, sign, FILL))
          for name in names for sign in (-1, 1)}


def _augment(images, keys, spec):
  """rand_augment of each image with its key, jitted and vmapped as the train step runs it."""
  return np.asarray(jax.jit(jax.vmap(functools.partial(ra.rand_augment, spec=spec)))(images, keys))


@pytest.mark.parametrize('inc, names', [(1, ra.RAND_INCREASING_TRANSFORMS),
                                        (0, ra.RAND_TRANSFORMS)])
def test_one_layer_applies_exactly_one_op_from_the_list(inc, names):
  image = _textured()
  spec = f'rand-n1-m9-mstd0-p1-inc{inc}'
  candidates = _candidates(image, names, 9)
  outs = _augment(np.broadcast_to(image, (300,) + image.shape), _keys(300, salt=1), spec)
  hits = dict.fromkeys(names, 0)
  for out in outs:
    matches = {name for (name, _), c in candidates.items() if np.array_equal(out, c)}
    assert matches, 'output is not one op of the list applied once'
    for name in matches:
      hits[name] += 1
  assert min(hits.values()) >= 5, hits  # 20 expected each


def test_drawn_magnitudes_reach_the_ops():
  """With magnitude noise, each output is its drawn op at its drawn magnitude and sign."""
  image = _textured()
  spec = 'rand-n1-m5-mstd3-p1'
  keys = _keys(40, salt=2)
  outs = _augment(np.broadcast_to(image, (40,) + image.shape), keys, spec)
  cfg = ra.parse_spec(spec)
  at_spec_magnitude = 0
  for key, out in zip(keys, outs):
    index, _, magnitude, sign = ra.layer_params(jax.random.split(key, 1)[0], cfg, 15)
    name = ra.RAND_TRANSFORMS[int(index)]
    expected = np.asarray(ra.apply_op(image, name, magnitude, sign, FILL)).astype(int)
    # Drawn magnitudes map to the op's argument in float32 in both programs, which XLA may
    # round differently (fused multiply-adds in the sampling coordinates): a level at most.
    diff = np.abs(out.astype(int) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (name, float(magnitude))
    at_spec_magnitude += np.array_equal(out, _candidates(image, [name], 5)[name, int(sign)])
  # Only the ops that ignore the magnitude (AutoContrast, Equalize, Invert: 3 of 15) and
  # draws that round to the same argument give what the spec's magnitude 5 gives.
  assert at_spec_magnitude < 20


def test_rand_augment_is_deterministic_per_key_and_varies_across_keys():
  image = _textured()
  spec = 'rand-m9-mstd0.5-inc1'
  keys = jax.vmap(_key)(jnp.arange(80))
  outs = _augment(np.broadcast_to(image, (80,) + image.shape), keys, spec)
  for i in (0, 5):
    np.testing.assert_array_equal(np.asarray(ra.rand_augment(image, _key(i), spec)), outs[i])
  assert outs.dtype == np.uint8 and outs.shape[1:] == image.shape
  # About a quarter are untouched: neither of the two ops passes its p=0.5 draw.
  changed = [o.tobytes() for o in outs if not np.array_equal(o, image)]
  assert 0.6 < len(changed) / len(outs) < 0.9
  # Repeats are expected: AutoContrast, Equalize, Invert and most Posterize draws ignore the
  # sampled magnitude and sign.
  assert len(set(changed)) > 0.6 * len(changed)


def test_a_vmapped_batch_matches_calls_one_image_at_a_time():
  images = np.stack([_textured(s) for s in range(6)])
  spec = 'rand-m9-mstd0.5-inc1'
  keys = _keys(6, salt=3)
  batched = _augment(images, keys, spec)
  for image, key, out in zip(images, keys, batched):
    np.testing.assert_array_equal(out, np.asarray(ra.rand_augment(image, key, spec)))


def test_zero_ops_or_zero_probability_leave_the_image_alone():
  image = _textured()
  for spec in ('rand-n0-m9', 'rand-m9-p0'):
    np.testing.assert_array_equal(np.asarray(ra.rand_augment(image, _key(1), spec)), image)


def test_rand_augment_rejects_non_uint8():
  with pytest.raises(TypeError, match='uint8'):
    ra.rand_augment(np.zeros((4, 4, 3), np.float32), _key(0), 'rand-m9')
