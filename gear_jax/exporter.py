"""Serialising a `gear_jax.Recommender`'s scoring function as a `jax.export` program
with its vocabulary sidecar (the library behind ``python -m gear_jax.export``; the
files are described there). `gear_jax.serving.load` reads them with jax and numpy only.
"""

from __future__ import annotations

import json
import os
import time

from gear_jax import serving
from gear_jax.errors import Interrupted

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def export_recommender(rec, path: str, *, k: int = 100,
                       platforms: tuple[str, ...] = ('cpu', 'cuda'), stop=None) -> dict:
  """Serialises `rec`'s scoring function (a `gear_jax.Recommender`) to `path` and its
  sidecar; returns the sidecar's content. `stop` (a `cli.GracefulStop`) is checked
  before anything is written; once writing starts, both files are completed."""
  import jax
  import jax.numpy as jnp
  from gear_jax import atomic, steps
  k = rec.clamp_k(k)
  params, model = rec.params, rec.model

  def serve(items, behaviors, gaps, exclude):
    batch = dict(items=items, behaviors=behaviors, gaps=gaps, exclude=exclude)
    return steps.recommend_step(params, batch, model=model, k=k)

  b, h = jax.export.symbolic_shape('b, h')
  window = jax.ShapeDtypeStruct((b, rec.vocab.max_len), jnp.int32)
  exported = jax.export.export(jax.jit(serve), platforms=platforms)(
      window, window, window, jax.ShapeDtypeStruct((b, h), jnp.int32))
  data = bytes(exported.serialize())
  info = dict(
      format=serving.FORMAT, artifact=os.path.basename(path),
      artifact_digest=serving.digest(data), k=k, platforms=list(exported.platforms),
      inputs=dict(items='[B, L] int32 dense item ids, 0 = padding',
                  behaviors='[B, L] int32 behavior ids, the last one the target',
                  gaps='[B, L] int32 seconds since the previous interaction',
                  exclude='[B, H] int32 item ids not to return, 0 = none'),
      outputs=dict(scores='[B, k] float32, descending', items='[B, k] int32 dense ids'),
      vocab=rec.vocab.to_json(),
      source=dict(workdir=os.path.abspath(rec.workdir), checkpoint=rec.step,
                  epoch=rec.meta.get('epoch'), data_path=rec.config.data.path,
                  data_key=rec.data.key),
      created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      jax_version=jax.__version__)
  if stop is not None and stop.requested:
    raise Interrupted(stop.signum, f'interrupted: {path} was not written')
  # the artifact first: a crash between the two leaves a sidecar whose hash refuses it
  with atomic.atomic_write(path) as f:
    f.write(data)
  with atomic.atomic_write(serving.sidecar_path(path), 'w') as f:
    json.dump(info, f)
  return info
