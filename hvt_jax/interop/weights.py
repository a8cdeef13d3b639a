"""The official release's weights by name: downloaded once, checked, converted and cached.

  model, params = hvt_jax.load('hvt-s-1')
  python -m hvt_jax.predict --model=hvt-s-1 cat.jpg

Every reader of model paths (`loading.resolve`, behind `hvt_jax.load`,
`--config.init_from`, predict and export) passes the path through
`local_path`: a published name that is not an existing path becomes the cached
model dir. The cache (`$HVT_JAX_CACHE`, default `~/.cache/hvt_jax`) holds

  downloads/v1.0/hvt_ti_1.pth        the release's file, as published
  downloads/v1.0/hvt_ti_1.pth.json   its sha256, size and source URL
  models/hvt-ti-1/                   the converted model dir (model.json records the sha256)

A download goes to a temporary file in the same folder and is kept only once it
is complete, its sha256 agrees with any earlier download of the same file, and
it converts to a model with the published parameter count. A cached file that
changes afterwards is reported, never silently used. `$HVT_JAX_WEIGHTS_URL`
replaces the release's URL prefix (a mirror holding `v1.0/...` and `v1.1/...`). The names, files
and scores are the table in `hvt_jax/published.py`.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request

import tqdm

from hvt_jax import model as model_lib
from hvt_jax import model_dir
from hvt_jax.errors import UserError
from hvt_jax.interop import convert
from hvt_jax.published import PUBLISHED, RELEASE_URL

_CHUNK = 1 << 20


class WeightsError(UserError):
  """Published weights could not be downloaded, checked or converted; the message says what to do."""


def cache_dir() -> str:
  return os.path.abspath(os.path.expanduser(os.environ.get('HVT_JAX_CACHE') or '~/.cache/hvt_jax'))


def url(name: str) -> str:
  prefix = os.environ.get('HVT_JAX_WEIGHTS_URL') or RELEASE_URL
  return f'{prefix.rstrip("/")}/{PUBLISHED[name].file}'


def download_path(name: str) -> str:
  """Where the release's file lives in the cache (and where to put it by hand when offline)."""
  return os.path.join(cache_dir(), 'downloads', *PUBLISHED[name].file.split('/'))


def model_path(name: str) -> str:
  return os.path.join(cache_dir(), 'models', name)


def local_path(path):
  """`path`, or for a published name that is not an existing path, its cached model dir."""
  if isinstance(path, (str, os.PathLike)):
    name = os.fspath(path).lower()
    if name in PUBLISHED and not os.path.exists(path):
      return fetch(name)
  return path


def fetch(name: str) -> str:
  """The cached model dir of a published model; downloads and converts it on first use."""
  pth, out = download_path(name), model_path(name)
  if model_dir.is_model_dir(out):
    _check_unchanged(name, pth, out)
    return out
  if os.path.exists(pth):  # an earlier download whose conversion did not finish, or put by hand
    _convert(name, pth, _sha256(pth), source=f'{url(name)} (file in the cache)')
    return out
  os.makedirs(os.path.dirname(pth), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(pth) + '.', suffix='.part',
                             dir=os.path.dirname(pth))
  try:
    with os.fdopen(fd, 'wb') as f:
      sha = _download(name, f)
    _convert(name, tmp, sha, source=url(name), keep_as=pth)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


def _download(name: str, f) -> str:
  """Streams the release's file into `f` with a progress bar; returns its sha256."""
  source = url(name)
  where = f'put the file at {download_path(name)} by hand and run again'
  digest, got, total = hashlib.sha256(), 0, None
  try:
    with urllib.request.urlopen(source, timeout=60) as response:
      total = int(response.headers.get('Content-Length') or 0) or None
      with tqdm.tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, file=sys.stderr,
                     desc=f'downloading {name}') as bar:
        while chunk := response.read(_CHUNK):
          f.write(chunk)
          digest.update(chunk)
          got += len(chunk)
          bar.update(len(chunk))
  except urllib.error.HTTPError as e:
    raise WeightsError(f'cannot download {source} (HTTP {e.code} {e.reason}); check '
                       f'$HVT_JAX_WEIGHTS_URL, or {where}.') from None
  except urllib.error.URLError as e:
    raise WeightsError(f'cannot download {source} ({e.reason}); without network, {where}.') from None
  except (OSError, http.client.HTTPException) as e:  # reset, timeout, server gone mid-body
    raise WeightsError(f'the download of {source} failed after {got:,} bytes '
                       f'({type(e).__name__}: {e}); nothing was kept. Run again, or {where}.') from None
  if total is not None and got != total:
    raise WeightsError(f'the download of {source} ended after {got:,} of {total:,} bytes; nothing '
                       f'was kept. Run again, or {where}.')
  return digest.hexdigest()


def _convert(name: str, pth: str, sha: str, *, source: str, keep_as: str | None = None) -> None:
  """Checks the file against the release and writes the model dir; `keep_as` keeps a download."""
  published = PUBLISHED[name]
  shown = keep_as or pth
  record = _read_record(shown)
  if record and record['sha256'] != sha:
    what = f'the file at {url(name)} changed' if keep_as else f'{pth} changed'
    raise WeightsError(f'{what} since it was first downloaded (sha256 {record["sha256"]}, now '
                       f'{sha}); if that is intended, remove {shown}.json and run again.')
  origin, remedy = ((f'the file from {url(name)}', 'check $HVT_JAX_WEIGHTS_URL; nothing was kept')
                    if keep_as else (pth, f'replace or remove {pth}'))
  try:
    model, params = convert.read(pth, progress=True)
  except UserError as e:
    raise WeightsError(f'{origin} is not {name}\'s published weights ({e}); {remedy}.') from None
  count = model_lib.param_count(params)
  if count != published.params:
    raise WeightsError(f'{origin} holds a model of {count:,} parameters, but {name} has '
                       f'{published.params:,}; {remedy}.')
  if keep_as:
    os.replace(pth, keep_as)
  _write_record(keep_as or pth, dict(sha256=sha, url=url(name)))
  print(f'{name}: saving the converted model to {model_path(name)}', file=sys.stderr)
  try:
    convert.save(model_path(name), model, params, source=source, sha256=sha, published_name=name,
                 published_accuracy=dict(top1=published.top1, top5=published.top5))
  except model_dir.CheckpointError:
    if not model_dir.is_model_dir(model_path(name)):
      raise  # else another process converted the same file meanwhile


def _check_unchanged(name: str, pth: str, out: str) -> None:
  """A damaged model dir, or a cached file that no longer matches the model converted from it,
  is an error."""
  try:
    converted = model_dir.read(out).meta.get('sha256')
  except model_dir.CheckpointError as e:
    source = 'the downloaded file' if os.path.exists(pth) else url(name)
    raise WeightsError(f'the cached model is damaged ({e}); remove {out} and it is converted '
                       f'again from {source}.') from None
  if not os.path.exists(pth):
    return  # removed to save space: the model dir is what is used
  record = _read_record(pth)
  stat = os.stat(pth)
  if record and (record.get('bytes'), record.get('mtime_ns')) == (stat.st_size, stat.st_mtime_ns):
    return  # unchanged since it was hashed, without reading it again
  sha = _sha256(pth)
  if sha != converted:
    raise WeightsError(f'{pth} changed since it was converted into {out} (sha256 {converted}, now '
                       f'{sha}); remove {out} to convert the new file, or remove {pth} to keep '
                       'the converted model.')
  _write_record(pth, dict(record or {}, sha256=sha, url=url(name)))


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _read_record(pth: str) -> dict | None:
  try:
    with open(pth + '.json') as f:
      return json.load(f)
  except (FileNotFoundError, ValueError):
    return None


def _write_record(pth: str, record: dict) -> None:
  stat = os.stat(pth)
  tmp = f'{pth}.json.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(dict(record, bytes=stat.st_size, mtime_ns=stat.st_mtime_ns), f, indent=2,
              sort_keys=True)
  os.replace(tmp, pth + '.json')
